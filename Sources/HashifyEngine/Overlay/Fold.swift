import ErofsImage
import HashifySystem
import SystemPackage

extension Overlay {
    /// Whether overlayfs' index of a generation holds copy-ups (of hard-linked
    /// lower files; names beginning with "#" are its own temporaries).
    static func indexHoldsCopyUps(_ gen: OverlayGuest.Generation) -> Bool {
        guard let names = indexEntries(gen) else { return true }
        return names.contains { $0.bytes.first != 0x23 }
    }

    /// The entries of overlayfs' index of a generation: none when it has no
    /// index, nil when it cannot be listed.
    static func indexEntries(_ gen: OverlayGuest.Generation) -> [FileName]? {
        guard let index = try? gen.work.openDirectory(FileName("index")) else { return [] }
        return try? index.entryNames()
    }

    /// Whether a generation's upper layer holds anything but its root (and
    /// overlayfs' index nothing): then there is nothing to fold.
    static func hasCopyUps(_ gen: OverlayGuest.Generation) -> Bool {
        if let names = try? gen.upper.entryNames(), !names.isEmpty { return true }
        return !(indexEntries(gen) ?? []).isEmpty
    }

    /// Whether an overlay of `gen` is alive somewhere this process cannot
    /// see: a read-only private mount of it is refused with EBUSY (overlayfs
    /// keeps an upper directory to one mount while it has `index=on`).
    static func upperStillInUse(_ guest: OverlayGuest, _ gen: OverlayGuest.Generation, session s: Session) throws
        -> Bool
    {
        do {
            try withPrivateMount(guest, gen, session: s) { _ in }
            return false
        } catch Errno.resourceBusy {
            return true
        }
    }

    /// The fold of `unify`: every unmounted overlay guest's copy-ups are made
    /// shared again. The next generation's description is made from the old
    /// one and what the upper layer changed (read through a private
    /// read-only mount of the generation: overlayfs itself resolves what the
    /// guest sees), and written as its image once; `state` then switches to
    /// it in one rename (`folding` → `active`). A fold killed or failed
    /// before leaves the old generation in force and publishes nothing. A
    /// mounted guest is left for its next start. A generation of an earlier
    /// version (directory layers) becomes an image at its next fold, or with `compact`.
    static func fold(
        _ guest: OverlayGuest, root: FilePath, session s: Session, dryRun: Bool, compact: Bool = false,
        retirer: GenerationRetirer
    ) throws -> OverlayReport.Guest {
        let started = MonotonicInstant.now()
        guard var state = dryRun ? try guest.readState() : try recover(guest), state.phase == .active else {
            return OverlayReport.Guest(root: root.string, action: .notAnOverlayGuest)
        }
        let old = try guest.generation(state.generation)
        var result = OverlayReport.Guest(root: root.string, action: .folded)
        if let action = try reasonNotToFold(guest, old, session: s, dryRun: dryRun, compact: compact) {
            result.action = action
            if action == .inUseElsewhere {
                result.notes.append(
                    "its upper layer is still in use by an overlay mount this namespace does not show (a lazy unmount with files open, or another mount namespace)"
                )
            }
            return result
        }
        let (before, protected) = try beginFold(guest, old, state: &state, root: root)
        do {
            result = try buildGeneration(
                state.generation + 1, of: guest, from: guest, generation: state.generation, session: s)
            // Overlayfs keeps those flags on the upper layer only: they go to the new one.
            result.protectedEntries = try carryProtectedAttributes(
                try protected.value(), from: old.upper, to: try guest.generation(state.generation + 1).upper)
        } catch {
            // Nothing of a fold that failed before its switch is published:
            // the objects it made go, the guest keeps its generation.
            _ = try? protected.value()
            _ = try? recover(guest)
            if error is InputError { throw error }
            throw FoldFailed(root: root, generation: state.generation, underlying: error)
        }
        if !old.isImage { result.notes.append("generation of an earlier version made an image") }
        result.root = root.string
        result.action = .folded
        result.layers = 1
        state.phase = .active
        state.generation += 1
        try guest.writeState(state)
        // The objects made of the old upper layer's files are recorded now that no guest writes it.
        try commitConvertedObjects(
            try guest.generation(state.generation), plain: old.upper, objects: s.objects,
            journal: foldObjectsJournalName)
        // Switched: the guest is the new generation. The old one goes while the next guest folds, then the
        // objects only the fold's guest referenced and no longer does (gc would find them too).
        let after = LayerReferences.read(try guest.generation(state.generation).imageLayer) ?? [:]
        retirer.retire(guest, keeping: state.generation, candidates: Set(before.keys.filter { (after[$0] ?? 0) == 0 }))
        result.seconds = elapsed(since: started)
        return result
    }

    /// The fold's first step, which changes nothing the guest sees: what the
    /// old layers reference is read before they go, then the state says
    /// `folding`. What the guest set immutable or append-only through its
    /// mount (its root's flag too) is read from the old upper layer on
    /// another thread (its own descriptor) while the fold builds: the walk of
    /// a large upper layer then overlaps the build's. Fails named with the guest.
    static func beginFold(
        _ guest: OverlayGuest, _ old: OverlayGuest.Generation, state: inout OverlayGuest.State, root: FilePath
    ) throws -> (before: LayerReferences.Counts, protected: BackgroundResult<[(path: [UInt8], flag: [UInt8])]>) {
        do {
            var before: LayerReferences.Counts = [:]
            for layer in old.layers { before.merge(try LayerReferences.ensure(layer), uniquingKeysWith: +) }
            let rootFlag: [(path: [UInt8], flag: [UInt8])] =
                try old.upper.presentExtendedAttribute("trusted.overlay.protattr").map { [([], $0)] } ?? []
            let upper = try old.upper.openDirectory(FileName("."))
            let protected = BackgroundResult { rootFlag + (try protectedEntries(in: upper)) }
            state.phase = .folding
            try guest.writeState(state)
            return (before, protected)
        } catch let error as InputError {
            throw error
        } catch {
            // Nothing changed yet (a state not written stays the old one).
            throw FoldFailed(root: root, generation: state.generation, underlying: error)
        }
    }

    /// In a generation a fold made: the objects made of the old upper
    /// layer's own files, recorded after the switch (`DataObjects.Reservation`).
    static let foldObjectsJournalName = FileName("fold-objects-journal")

    /// A fold that failed on an error of the system (not of its input): names
    /// the guest and the generation it keeps.
    struct FoldFailed: Error, CustomStringConvertible {
        var root: FilePath
        var generation: Int
        var underlying: any Error
        var description: String {
            "\(root): fold failed, the guest keeps generation \(generation) as it was: \(underlying)"
        }
    }

    /// What a fold does instead of folding (nil: it folds): a mounted guest
    /// is left for its next start; a generation with nothing to fold (an
    /// earlier version's is made an image when `compact` asks); a dry run
    /// only says it would; an overlay of the generation still alive
    /// elsewhere (unmounted lazily with files open, or in another mount
    /// namespace) holds its upper layer, which a fold must publish only
    /// when no one writes it any more (overlayfs then refuses a second
    /// mount of it, EBUSY).
    static func reasonNotToFold(
        _ guest: OverlayGuest, _ old: OverlayGuest.Generation, session s: Session, dryRun: Bool, compact: Bool
    ) throws -> OverlayReport.Action? {
        if OverlayMount.isMounted(old, at: try Directory.open(path: guest.rootPath)) { return .foldAtNextStart }
        if !hasCopyUps(old) && (old.isImage || !compact) { return .nothingToFold }
        if dryRun { return .wouldFold }
        return try upperStillInUse(guest, old, session: s) ? .inUseElsewhere : nil
    }

    /// `hashify overlay fold`: the fold alone, for overlay guests only (what a
    /// container's start hook runs; `unify` does it too, beside hardlink mode).
    public static func fold(_ options: OverlayOptions) throws -> OverlayReport {
        let started = MonotonicInstant.now()
        let s = try session(options, createRecords: false)
        for g in s.guests { _ = try activeGuest(g) }
        var report = OverlayReport(command: "overlay fold", store: s.store.path.string)
        let retirer = GenerationRetirer()
        var folded: [(index: Int, guest: OverlayGuest)] = []
        do {
            for g in s.guests {
                var result: OverlayReport.Guest
                do {
                    result = try fold(
                        g.record!, root: g.root, session: s, dryRun: false, compact: options.compact, retirer: retirer)
                } catch let failed as FoldFailed {
                    // The guest keeps its generation; the others still fold, and the report says each.
                    result = OverlayReport.Guest(root: g.root.string, action: .leftAsItWas)
                    result.notes.append(elided("\(failed)"))
                    report.guests.append(result)
                    continue
                }
                noteMissingData(g.record!, objects: s.objects, in: &result)
                folded.append((report.guests.count, g.record!))
                report.guests.append(result)
            }
        } catch {
            _ = retirer.finish(session: s)
            throw error
        }
        let outcomes = retirer.finish(session: s)
        for (i, g) in folded { outcomes[ObjectIdentifier(g)]?.apply(to: &report.guests[i]) }
        report.seconds = elapsed(since: started)
        return report
    }

    /// The fold step of `unify` for the roots that are overlay guests of the store.
    public static func fold(roots: [FilePath], store: Store, dryRun: Bool) throws -> [OverlayReport.Guest] {
        guard let dataPath = RootValidation.canonical(store.path)?.appending("data") else { return [] }
        let s = Session(store: store, objects: try store.dataObjects(), dataPath: dataPath, guests: [])
        if !dryRun { removeAbandonedReservations(store: store, objects: s.objects) }
        var out: [OverlayReport.Guest] = []
        var folded: [(index: Int, guest: OverlayGuest)] = []
        let retirer = GenerationRetirer()
        for r in roots {
            guard let c = RootValidation.canonical(r),
                let g = try OverlayGuest.open(store: store, canonicalRoot: c, create: false),
                // A root given twice (unify takes repeats) is folded once: its old generation may still be going.
                !folded.contains(where: { $0.guest.id == g.id })
            else { continue }
            do {
                var result = try fold(g, root: c, session: s, dryRun: dryRun, retirer: retirer)
                noteMissingData(g, objects: s.objects, in: &result)
                folded.append((out.count, g))
                out.append(result)
            } catch {
                var failed = OverlayReport.Guest(root: c.string, action: .leftAsItWas)
                failed.notes.append(elided("fold failed: \(error)"))
                out.append(failed)
            }
        }
        let outcomes = retirer.finish(session: s)
        for (i, g) in folded { outcomes[ObjectIdentifier(g)]?.apply(to: &out[i]) }
        return out
    }

    /// The roots among `roots` that are overlay guests: of the store at
    /// `storePath`, or of the store they carry (`GuestStore`).
    public static func overlayGuests(among roots: [FilePath], storePath: FilePath) -> Set<FilePath> {
        var out = Set(roots.filter { GuestStore.of($0) != nil })
        guard let store = try? Store.open(at: storePath, create: false) else { return out }
        for r in roots {
            guard let c = RootValidation.canonical(r),
                let g = try? OverlayGuest.open(store: store, canonicalRoot: c, create: false),
                g.hasState || !g.generationNumbers().isEmpty
            else { continue }
            out.insert(r)
        }
        return out
    }
}
