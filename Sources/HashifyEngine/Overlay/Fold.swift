import HashifySystem
import SystemPackage

extension Overlay {
    /// Where a directory of the merged view stands in the layers of the
    /// generation being folded: the same directory in the upper and in the old
    /// metadata layer, when the path leads there plainly.
    final class FoldContext {
        let upper: Directory?
        let meta: Directory?
        /// The old layer's hard-linked stubs overlayfs has copied up into its
        /// index (`indexedOrigins`): the guest sees their new content under
        /// every name, also where the upper layer holds nothing.
        let indexed: Set<[UInt8]>
        init(upper: Directory?, meta: Directory?, indexed: Set<[UInt8]> = []) {
            self.upper = upper
            self.meta = meta
            self.indexed = indexed
        }

        /// The child context. Below an opaque or redirected upper directory
        /// the old metadata layer at the same path is not what the guest sees,
        /// so nothing below is taken from it unread.
        func child(_ name: FileName) -> FoldContext {
            let u = try? upper?.openDirectory(name)
            if let u,
                u.extendedAttribute("trusted.overlay.opaque") != nil
                    || u.extendedAttribute("trusted.overlay.redirect") != nil
            {
                return FoldContext(upper: u, meta: nil, indexed: indexed)
            }
            if upper != nil, u == nil, (try? upper?.stat(name)) != nil {
                // The upper holds something else under this name (a whiteout, a file).
                return FoldContext(upper: nil, meta: nil, indexed: indexed)
            }
            return FoldContext(upper: u, meta: try? meta?.openDirectory(name), indexed: indexed)
        }

        /// Whether the upper layer surely holds nothing under `name` (no upper
        /// directory here, or no entry of that name; an error counts as holding).
        private func upperLacks(_ name: FileName) -> Bool {
            guard let upper else { return true }
            do {
                _ = try upper.stat(name)
                return false
            } catch Errno.noSuchFileOrDirectory { return true } catch { return false }
        }

        /// The old metadata layer's directory holding `name` as it is, when the
        /// upper layer holds nothing under that name (so the guest sees the old
        /// entry unchanged).
        func unchangedEntry(_ name: FileName) -> Directory? {
            guard let meta, upperLacks(name) else { return nil }
            guard let st = try? meta.stat(name) else { return nil }
            if st.linkCount > 1, !indexed.isEmpty {
                guard let handle = meta.fileHandle(name), !indexed.contains(handle) else { return nil }
            }
            return meta
        }

        /// The object a regular file of the merged view still has from the old
        /// metadata layer, when the upper layer has nothing under its name, the
        /// stub is no hard link (overlayfs keeps copied-up hard links in its
        /// index, not under each name) and the size agrees.
        func unchangedRedirect(_ name: FileName, size: UInt64) -> [UInt8]? {
            guard let meta, upperLacks(name) else { return nil }
            guard let st = try? meta.stat(name), st.isRegular, st.linkCount == 1, st.size == size,
                let stub = try? meta.openFileForReading(name),
                stub.extendedAttribute("trusted.overlay.metacopy") != nil,
                let r = stub.extendedAttribute("trusted.overlay.redirect"), DataObjects.isValidRedirect(r)
            else { return nil }
            return r
        }
    }

    /// The lower files overlayfs' index of a generation holds copy-ups of
    /// (copied-up hard links), as `Directory.fileHandle` gives them: each
    /// index entry is named by the hex of its origin (version, 0xfb, length,
    /// flags, type, the layer's 16-byte UUID, then the handle's bytes). Nil
    /// when an entry is not in that form (then nothing is taken unread).
    static func indexedOrigins(_ gen: OverlayGuest.Generation) -> Set<[UInt8]>? {
        guard let index = try? gen.work.openDirectory(FileName("index")) else { return [] }
        guard let names = try? index.entryNames() else { return nil }
        var out = Set<[UInt8]>()
        // Names beginning with "#" are overlayfs' own temporaries (its shared whiteout among them).
        for name in names where name.bytes.first != 0x23 {
            guard let b = bytesFromHex(name.bytes), b.count > 21, b[1] == 0xfb, Int(b[2]) == b.count else {
                return nil
            }
            out.insert([b[4]] + b[21...])
        }
        return out
    }

    /// Copies a subtree of a metadata layer into an empty directory of the
    /// next one: directories made anew with the old ones' owner, mode, xattrs
    /// (as they are: already in the layer's form) and mtime; every other entry
    /// a hard link of the old one. Returns the entries linked.
    static func linkLayerTree(_ source: Directory, into destination: Directory) throws -> Int {
        var linked = 0
        var traversal = TreeTraversal<Directory>()
        try traversal.run(
            source, context: destination,
            visit: { entry, dest in
                if entry.stat.isDirectory {
                    try dest.makeDirectory(entry.name, mode: 0o700)
                    return .enter(try dest.openDirectory(entry.name))
                }
                try entry.directory.link(entry.name, to: dest, as: entry.name)
                linked += 1
                return .next
            },
            leave: { dir, dest in
                try TreeCopier.copyDirectoryAttributes(of: dir, stat: try dir.stat(), to: dest)
            })
        return linked
    }

    /// Whether a generation's upper layer holds anything but its root (and
    /// overlayfs' index nothing): then there is nothing to fold.
    static func hasCopyUps(_ gen: OverlayGuest.Generation) -> Bool {
        if let names = try? gen.upper.entryNames(), !names.isEmpty { return true }
        if let index = try? gen.work.openDirectory(FileName("index")), let names = try? index.entryNames(),
            !names.isEmpty
        {
            return true
        }
        return false
    }

    /// The fold of `unify`: every unmounted overlay guest's copy-ups are made
    /// shared again. A new generation is built from the merged view (mounted
    /// privately, read-only): files the upper layer does not hold keep their
    /// old stubs' objects unread; the rest are hashed and become stubs of an
    /// existing object or of a new one. `state` then switches to it in one
    /// rename (`folding` → `active`); a fold killed before leaves the old
    /// generation in force. A mounted guest is left for its next start.
    static func fold(_ guest: OverlayGuest, root: FilePath, session s: Session, dryRun: Bool) throws
        -> OverlayReport.Guest
    {
        let started = MonotonicInstant.now()
        guard var state = dryRun ? try guest.readState() : try recover(guest), state.phase == .active else {
            return OverlayReport.Guest(root: root.string, action: .notAnOverlayGuest)
        }
        let old = try guest.generation(state.generation)
        var result = OverlayReport.Guest(root: root.string, action: .folded)
        if OverlayMount.isMounted(old, at: try Directory.open(path: guest.rootPath)) {
            result.action = .foldAtNextStart
            return result
        }
        if !hasCopyUps(old) {
            result.action = .nothingToFold
            return result
        }
        if dryRun {
            result.action = .wouldFold
            return result
        }
        state.phase = .folding
        try guest.writeState(state)
        result = try buildGeneration(
            state.generation + 1, of: guest, from: guest, generation: state.generation, session: s)
        result.root = root.string
        result.action = .folded
        state.phase = .active
        state.generation += 1
        try guest.writeState(state)
        try guest.removeGenerations(except: state.generation)
        result.seconds = elapsed(since: started)
        return result
    }

    /// Builds generation `number` of `guest` from what `source`'s generation
    /// `generation` shows (read through its mount, or a private read-only
    /// one): files its upper layer does not hold keep their objects unread,
    /// the rest are hashed and become stubs of an existing or a new object.
    /// For a fold, `source` is the guest itself; for a clone, the guest cloned.
    static func buildGeneration(
        _ number: Int, of guest: OverlayGuest, from source: OverlayGuest, generation: Int,
        session s: Session
    ) throws -> OverlayReport.Guest {
        var result = OverlayReport.Guest(root: guest.rootPath.string, action: .built)
        let old = try source.generation(generation)
        let next = try guest.makeGeneration(number)
        let filler = StubFiller(objects: s.objects, threads: fillThreads)
        let live = try Directory.open(path: source.rootPath)
        let isLive = OverlayMount.isMounted(old, at: live)
        // A fold of its own stopped guest takes what the upper layer does not
        // touch from the old metadata layer as it is: each unchanged entry a
        // hard link of the old one (whole unchanged subtrees without reading
        // the merged view), so the fold costs about what the guest changed.
        // Not for a clone (its metadata layer must not share inodes with the
        // source's: a guest sees link counts) or a live source. A hard-linked
        // stub overlayfs' index holds a copy-up of shows new content under
        // every name: it is read like a changed file, and whole subtrees are
        // linked only while the index is empty.
        let indexed = source === guest && !isLive ? indexedOrigins(old) : nil
        let linkUnchanged = indexed != nil
        let copier = TreeCopier(
            overlayNames: .escape,
            context: { parent, name in
                (parent as? FoldContext)?.child(name)
            }
        ) { file, dest in
            let size = file.stat.size
            let context = file.context as? FoldContext
            if size > inlineLimit, let r = context?.unchangedRedirect(file.name, size: size), filler.isLive(r) {
                result.filesUnchanged += 1
                result.stubs += 1
                return try makeStub(file.name, in: dest, size: size, redirect: r)
            }
            result.filesHashed += 1
            return try makeEntry(file, in: dest, filler: filler, lease: false, linkSource: false, result: &result)
        }
        if linkUnchanged {
            // Before the merged file is opened: an unchanged entry costs a lookup and a link.
            copier.unchanged = { context, name, dest in
                guard let meta = (context as? FoldContext)?.unchangedEntry(name) else { return false }
                try meta.link(name, to: dest, as: name)
                result.filesUnchanged += 1
                return true
            }
        }
        if indexed?.isEmpty == true {
            copier.subtree = { context, dest in
                guard let child = context as? FoldContext, child.upper == nil, let meta = child.meta else {
                    return false
                }
                result.filesUnchanged += try linkLayerTree(meta, into: dest)
                return true
            }
        }
        let build = { (merged: Directory) throws in
            do {
                try copier.copy(
                    merged, into: next.meta,
                    rootContext: FoldContext(upper: old.upper, meta: old.meta, indexed: indexed ?? []))
            } catch {
                _ = try? filler.finish()
                throw error
            }
            merge(try filler.finish(), into: &result)
            try copyRootAttributes(from: merged, to: next.upper)
            try DataLayerHiding.apply(to: next.meta)
            // What was linked unchanged keeps the old generation's escaped xattrs.
            let carried = (try? old.directory.stat(OverlayGuest.escapedMarker)) != nil && linkUnchanged ? 1 : 0
            try next.markEscapedAttributes(copier.escapedAttributes + carried)
        }
        if isLive {
            copier.skipVanished = true
            try build(live)
        } else {
            try withPrivateMount(source, old, session: s, build)
        }
        try s.objects.sync()
        return result
    }

    /// `hashify overlay fold`: the fold alone, for overlay guests only (what a
    /// container's start hook runs; `unify` does it too, beside hardlink mode).
    public static func fold(_ options: OverlayOptions) throws -> OverlayReport {
        let started = MonotonicInstant.now()
        let s = try session(options, createRecords: false)
        for g in s.guests { _ = try activeGuest(g) }
        var report = OverlayReport(command: "overlay fold", store: s.store.path.string)
        for g in s.guests {
            report.guests.append(try fold(g.record!, root: g.root, session: s, dryRun: false))
        }
        report.seconds = elapsed(since: started)
        return report
    }

    /// The fold step of `unify` for the roots that are overlay guests of the store.
    public static func fold(roots: [FilePath], store: Store, dryRun: Bool) throws -> [OverlayReport.Guest] {
        guard let dataPath = RootValidation.canonical(store.path)?.appending("data") else { return [] }
        let s = Session(store: store, objects: try store.dataObjects(), dataPath: dataPath, guests: [])
        var out: [OverlayReport.Guest] = []
        for r in roots {
            guard let c = RootValidation.canonical(r),
                let g = try OverlayGuest.open(store: store, canonicalRoot: c, create: false)
            else { continue }
            do {
                out.append(try fold(g, root: c, session: s, dryRun: dryRun))
            } catch {
                var failed = OverlayReport.Guest(root: c.string, action: .leftAsItWas)
                failed.notes.append("fold failed: \(error)")
                out.append(failed)
            }
        }
        return out
    }

    /// The roots among `roots` that are overlay guests of the store at `storePath`.
    public static func overlayGuests(among roots: [FilePath], storePath: FilePath) -> Set<FilePath> {
        guard let store = try? Store.open(at: storePath, create: false) else { return [] }
        var out = Set<FilePath>()
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
