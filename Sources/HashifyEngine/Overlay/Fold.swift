import ErofsImage
import HashifySystem
import SystemPackage

extension Overlay {
    /// A generation's description read back from its image, with how many
    /// entries name each node (more than one: a hard link).
    final class OldImage {
        let tree: ErofsTree
        let linkCounts: [Int]
        private var children: [ErofsTree.NodeID: [[UInt8]: ErofsTree.NodeID]] = [:]

        init(_ tree: ErofsTree) {
            self.tree = tree
            var counts = [Int](repeating: 0, count: tree.nodes.count)
            for node in tree.nodes {
                if case .directory(let entries) = node.kind { for e in entries { counts[e.node] += 1 } }
            }
            linkCounts = counts
        }

        /// The node named `name` in the directory `dir`, or nil.
        func child(_ dir: ErofsTree.NodeID, _ name: [UInt8]) -> ErofsTree.NodeID? {
            if let known = children[dir] { return known[name] }
            var byName: [[UInt8]: ErofsTree.NodeID] = [:]
            for e in tree.entries(of: dir) { byName[e.name] = e.node }
            children[dir] = byName
            return byName[name]
        }
    }

    /// Where a directory of the merged view stands in the layers of a
    /// generation: the same directory in its upper layer, and its node in the
    /// generation's image (or, for a generation of an earlier version, its
    /// directory in each metadata layer the lookup reaches), when the path
    /// leads there plainly. This is the one place that applies overlayfs'
    /// lookup rules to a stack (an opaque or redirected upper directory, or
    /// another entry of the same name, ends the lookup of what is below);
    /// fold, clone, manifest and mem ask it what the guest sees unchanged.
    final class FoldContext {
        let upper: Directory?
        /// Directory layers of an earlier version's generation, top first (a
        /// layer without one is left out; an opaque or redirected directory ends the list).
        let layers: [Directory]
        let image: OldImage?
        let node: ErofsTree.NodeID?
        /// Whether entries the upper layer does not touch may be taken from the image unread
        /// (not while overlayfs' index holds copied-up hard links: they show new content under every name).
        let reuse: Bool

        init(upper: Directory?, layers: [Directory], image: OldImage?, node: ErofsTree.NodeID?, reuse: Bool) {
            self.upper = upper
            self.layers = layers
            self.image = image
            self.node = node
            self.reuse = reuse
        }

        /// The context of generation `gen`'s root; `reuse` as above (a fold of a stopped guest).
        static func root(of gen: OverlayGuest.Generation, reuse: Bool) throws -> FoldContext {
            if gen.isImage {
                return FoldContext(
                    upper: gen.upper, layers: [], image: OldImage(try GuestImage.read(gen)), node: ErofsTree.rootID,
                    reuse: reuse && !indexHoldsCopyUps(gen))
            }
            return FoldContext(
                upper: gen.upper, layers: gen.layers.compactMap(\.directory), image: nil, node: nil, reuse: false)
        }

        static func endsLookup(_ dir: Directory) -> Bool {
            dir.extendedAttribute("trusted.overlay.opaque") != nil
                || dir.extendedAttribute("trusted.overlay.redirect") != nil
        }

        /// The child context. Below an opaque or redirected directory the
        /// layers under it at the same path are not what the guest sees, so
        /// nothing below is taken from them unread.
        func child(_ name: FileName) -> FoldContext {
            let u = try? upper?.openDirectory(name)
            if let u, Self.endsLookup(u) {
                return FoldContext(upper: u, layers: [], image: nil, node: nil, reuse: false)
            }
            if upper != nil, u == nil, (try? upper?.stat(name)) != nil {
                // The upper holds something else under this name (a whiteout, a file).
                return FoldContext(upper: nil, layers: [], image: nil, node: nil, reuse: false)
            }
            var below: [Directory] = []
            for layer in layers {
                let d: Directory
                do { d = try layer.openDirectory(name) } catch Errno.noSuchFileOrDirectory { continue } catch { break }
                below.append(d)
                if Self.endsLookup(d) { break }
            }
            let n = node.flatMap { image?.child($0, name.bytes) }.flatMap { image?.tree[$0].isDirectory == true ? $0 : nil }
            return FoldContext(upper: u, layers: below, image: n == nil ? nil : image, node: n, reuse: reuse)
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

        /// The image's node the guest sees unchanged under `name` (the upper
        /// layer holds nothing there), to be taken as it is; nil otherwise.
        func unchangedNode(_ name: FileName) -> (image: OldImage, id: ErofsTree.NodeID)? {
            guard reuse, let image, let node, upperLacks(name), let id = image.child(node, name.bytes) else {
                return nil
            }
            return (image, id)
        }

        /// The object a regular file of the merged view still has from the
        /// layers below the upper one: the upper layer has nothing under its
        /// name, or only a metadata-only copy-up (a chmod, a chown) that no
        /// rename moved; the layer below holds a stub of an object of that
        /// size under the name, and the stub is no hard link (overlayfs keeps
        /// copied-up hard links in its index, not under each name).
        func unchangedRedirect(_ name: FileName, size: UInt64) -> [UInt8]? {
            if !upperLacks(name) {
                guard let f = try? upper?.openFileForReading(name),
                    f.extendedAttribute("trusted.overlay.metacopy") != nil,
                    f.extendedAttribute("trusted.overlay.redirect") == nil
                else { return nil }
            }
            if let image, let node {
                guard let id = image.child(node, name.bytes), image.linkCounts[id] == 1,
                    image.tree[id].size == size
                else { return nil }
                return GuestImage.redirect(of: image.tree[id])
            }
            for layer in layers {
                let st: FileStat
                do { st = try layer.stat(name) } catch Errno.noSuchFileOrDirectory { continue } catch { return nil }
                guard st.isRegular, st.linkCount == 1, st.size == size,
                    let stub = try? layer.openFileForReading(name),
                    stub.extendedAttribute("trusted.overlay.metacopy") != nil,
                    let r = stub.extendedAttribute("trusted.overlay.redirect"), DataObjects.isValidRedirect(r)
                else { return nil }
                return r
            }
            return nil
        }
    }

    /// Whether overlayfs' index of a generation holds copy-ups (of hard-linked
    /// lower files; names beginning with "#" are its own temporaries).
    static func indexHoldsCopyUps(_ gen: OverlayGuest.Generation) -> Bool {
        guard let index = try? gen.work.openDirectory(FileName("index")) else { return false }
        guard let names = try? index.entryNames() else { return true }
        return names.contains { $0.bytes.first != 0x23 }
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
    static func fold(_ guest: OverlayGuest, root: FilePath, session s: Session, dryRun: Bool, compact: Bool = false)
        throws -> OverlayReport.Guest
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
        if !hasCopyUps(old) && (old.isImage || !compact) {
            result.action = .nothingToFold
            return result
        }
        if dryRun {
            result.action = .wouldFold
            return result
        }
        // What a fold publishes must be written by no one any more: an
        // overlay of this generation still alive anywhere (unmounted lazily
        // with files open, or in another mount namespace) holds its upper
        // layer, and overlayfs then refuses a second mount of it (EBUSY).
        if try upperStillInUse(guest, old, session: s) {
            result.action = .inUseElsewhere
            result.notes.append(
                "its upper layer is still in use by an overlay mount this namespace does not show (a lazy unmount with files open, or another mount namespace)"
            )
            return result
        }
        // What the old layers reference, known before they go.
        var before: LayerReferences.Counts = [:]
        for layer in old.layers { before.merge(try LayerReferences.ensure(layer), uniquingKeysWith: +) }
        // What the guest set immutable or append-only through its mount (its root's flag too).
        let protected: [(path: [UInt8], flag: [UInt8])] =
            (old.upper.extendedAttribute("trusted.overlay.protattr").map { [([], $0)] } ?? [])
            + (try protectedEntries(in: old.upper))
        state.phase = .folding
        try guest.writeState(state)
        do {
            result = try buildGeneration(
                state.generation + 1, of: guest, from: guest, generation: state.generation, session: s)
            // Overlayfs keeps those flags on the upper layer only: they go to the new one.
            result.protectedEntries = try carryProtectedAttributes(
                protected, from: old.upper, to: try guest.generation(state.generation + 1).upper)
        } catch {
            // Nothing of a fold that failed before its switch is published:
            // the objects it made go, the guest keeps its generation.
            _ = try? recover(guest)
            throw error
        }
        if !old.isImage { result.notes.append("generation of an earlier version made an image") }
        result.root = root.string
        result.action = .folded
        result.layers = 1
        state.phase = .active
        state.generation += 1
        try guest.writeState(state)
        try guest.removeGenerations(except: state.generation)
        // The objects only the fold's guest referenced and no longer does go now (gc would find them too).
        let after = LayerReferences.read(try guest.generation(state.generation).imageLayer) ?? [:]
        let candidates = Set(before.keys.filter { (after[$0] ?? 0) == 0 })
        let unused = LayerReferences.unreferenced(candidates, store: s.store)
        if !unused.isEmpty {
            var bytes: [[UInt8]: UInt64] = [:]
            for r in unused { bytes[r] = (try? s.objects.stat(r))?.allocatedBytes ?? 0 }
            let removed = try s.objects.remove(unused)
            result.objectsRemoved = removed.count
            result.objectsRemovedBytes = removed.reduce(0) { $0 + (bytes[$1] ?? 0) }
        }
        result.seconds = elapsed(since: started)
        return result
    }

    /// Builds generation `number` of `guest` from what `source`'s generation
    /// `generation` shows (read through its mount, or a private read-only
    /// one): what its upper layer does not touch is taken from its
    /// description unread, the rest is read and hashed, and the description
    /// is written as the new generation's image. For a fold, `source` is the
    /// guest itself; for a clone, the guest cloned: a clone of a generation
    /// with nothing to fold shares its image (a hard link: one file, one
    /// page-cache copy for both until one folds). The objects made for a
    /// build that fails are removed again.
    static func buildGeneration(
        _ number: Int, of guest: OverlayGuest, from source: OverlayGuest, generation: Int,
        session s: Session
    ) throws -> OverlayReport.Guest {
        var result = OverlayReport.Guest(root: guest.rootPath.string, action: .built)
        let old = try source.generation(generation)
        let next = try guest.makeGeneration(number)
        let live = try Directory.open(path: source.rootPath)
        let isLive = OverlayMount.isMounted(old, at: live)
        if source !== guest, old.isImage, !hasCopyUps(old) {
            for name in [GuestImage.fileName, LayerReferences.fileName(GuestImage.layerName), OverlayGuest.escapedMarker]
            where (try? old.directory.stat(name)) != nil {
                try old.directory.link(name, to: next, as: name)
            }
            try copyLayerRootAttributes(
                from: old.upper, stat: try old.upper.stat(), to: try next.openDirectory(FileName("upper")))
            try next.sync()
            result.filesUnchanged = (LayerReferences.read(old.imageLayer) ?? [:]).values.reduce(0, +)
            return result
        }
        let filler = StubFiller(objects: s.objects, threads: fillThreads)
        let builder = GenerationBuilder(filler: filler, lease: false) { _ in false }
        builder.skipVanished = isLive
        do {
            let context = try FoldContext.root(of: old, reuse: !isLive)
            let build = { (merged: Directory) throws in
                merge(try builder.build(merged, context: context), into: &result)
                try GuestImage.write(builder.tree, into: next, number: number)
                let gen = try guest.generation(number)
                try copyRootAttributes(from: merged, to: gen.upper)
                try gen.markEscapedAttributes(builder.escapedAttributes)
            }
            if isLive { try build(live) } else { try withPrivateMount(source, old, session: s, build) }
            try s.objects.sync()
        } catch {
            _ = try? s.objects.remove(filler.objectsMade)
            throw error
        }
        result.stubs = builder.stubs
        result.inlineFiles = builder.inlineFiles
        result.filesUnchanged = builder.filesUnchanged
        result.filesHashed = builder.filesHashed
        return result
    }

    /// Gives a new upper root the old upper root's owner, mode, mtime and
    /// xattrs but overlayfs' own (what the guest's root shows).
    static func copyLayerRootAttributes(from old: Directory, stat st: FileStat, to upper: Directory) throws {
        try upper.changeOwner(uid: st.uid, gid: st.gid)
        try upper.changeMode(st.mode)
        for a in try old.extendedAttributes() where !isOverlayOwn(a.name) { try upper.setExtendedAttribute(a) }
        try upper.setModificationTime(st.modificationTime)
    }

    /// `hashify overlay fold`: the fold alone, for overlay guests only (what a
    /// container's start hook runs; `unify` does it too, beside hardlink mode).
    public static func fold(_ options: OverlayOptions) throws -> OverlayReport {
        let started = MonotonicInstant.now()
        let s = try session(options, createRecords: false)
        for g in s.guests { _ = try activeGuest(g) }
        var report = OverlayReport(command: "overlay fold", store: s.store.path.string)
        for g in s.guests {
            var result = try fold(g.record!, root: g.root, session: s, dryRun: false, compact: options.compact)
            noteMissingData(g.record!, objects: s.objects, in: &result)
            report.guests.append(result)
        }
        report.seconds = elapsed(since: started)
        return report
    }

    /// The fold step of `unify` for the roots that are overlay guests of the store.
    public static func fold(roots: [FilePath], store: Store, dryRun: Bool) throws -> [OverlayReport.Guest] {
        guard let dataPath = RootValidation.canonical(store.path)?.appending("data") else { return [] }
        let s = Session(store: store, objects: try store.dataObjects(), dataPath: dataPath, guests: [])
        if !dryRun { removeAbandonedReservations(store: store, objects: s.objects) }
        var out: [OverlayReport.Guest] = []
        for r in roots {
            guard let c = RootValidation.canonical(r),
                let g = try OverlayGuest.open(store: store, canonicalRoot: c, create: false)
            else { continue }
            do {
                var result = try fold(g, root: c, session: s, dryRun: dryRun)
                noteMissingData(g, objects: s.objects, in: &result)
                out.append(result)
            } catch {
                var failed = OverlayReport.Guest(root: c.string, action: .leftAsItWas)
                failed.notes.append("fold failed: \(error)")
                out.append(failed)
            }
        }
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
