import HashifySystem
import SystemPackage

extension Overlay {
    /// Where a directory of the merged view stands in the layers of the
    /// generation being folded: the same directory in the upper layer and in
    /// each metadata layer the lookup reaches, when the path leads there plainly.
    final class FoldContext {
        let upper: Directory?
        /// The metadata layers' directories at this path that the merged
        /// directory shows, top first (a layer without one is left out; an
        /// opaque or redirected directory or another entry ends the list).
        let layers: [Directory]
        /// Whether the generation has one metadata layer (its entries may then be linked as they are).
        let single: Bool
        /// The old layer's hard-linked stubs overlayfs has copied up into its
        /// index (`indexedOrigins`): the guest sees their new content under
        /// every name, also where the upper layer holds nothing.
        let indexed: Set<[UInt8]>
        init(upper: Directory?, layers: [Directory], single: Bool, indexed: Set<[UInt8]> = []) {
            self.upper = upper
            self.layers = layers
            self.single = single
            self.indexed = indexed
        }

        convenience init(_ gen: OverlayGuest.Generation, indexed: Set<[UInt8]> = []) {
            self.init(
                upper: gen.upper, layers: gen.layers.map(\.directory), single: gen.layers.count == 1, indexed: indexed)
        }

        /// The one metadata layer's directory here (a generation of one layer only).
        var meta: Directory? { single ? layers.first : nil }

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
                return FoldContext(upper: u, layers: [], single: single, indexed: indexed)
            }
            if upper != nil, u == nil, (try? upper?.stat(name)) != nil {
                // The upper holds something else under this name (a whiteout, a file).
                return FoldContext(upper: nil, layers: [], single: single, indexed: indexed)
            }
            var below: [Directory] = []
            for layer in layers {
                let d: Directory
                do { d = try layer.openDirectory(name) } catch Errno.noSuchFileOrDirectory { continue } catch { break }
                below.append(d)
                if Self.endsLookup(d) { break }
            }
            return FoldContext(upper: u, layers: below, single: single, indexed: indexed)
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
        /// entry unchanged). Only in a generation of one metadata layer.
        func unchangedEntry(_ name: FileName) -> Directory? {
            guard let meta, upperLacks(name) else { return nil }
            guard let st = try? meta.stat(name) else { return nil }
            if st.linkCount > 1, !indexed.isEmpty {
                guard let handle = meta.fileHandle(name), !indexed.contains(handle) else { return nil }
            }
            return meta
        }

        /// The object a regular file of the merged view still has from the
        /// metadata layers, when the upper layer has nothing under its name,
        /// the topmost layer holding it holds a stub of an object, the stub is
        /// no hard link (overlayfs keeps copied-up hard links in its index,
        /// not under each name) and the size agrees.
        func unchangedRedirect(_ name: FileName, size: UInt64) -> [UInt8]? {
            guard upperLacks(name) else { return nil }
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

    /// A directory at the root of any of `layers` whose name is a data
    /// directory's top directory ("00" … "ff"), or nil.
    static func prefixNamedDirectory(in layers: [Directory]) -> String? {
        for layer in layers {
            for name in (try? layer.entryNames()) ?? [] where name.bytes.count == 2 {
                guard bytesFromHex(name.bytes) != nil, name.bytes.allSatisfy({ !(0x41...0x46).contains($0) }),
                    (try? layer.stat(name))?.isDirectory == true
                else { continue }
                return String(decoding: name.bytes, as: UTF8.self)
            }
        }
        return nil
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

    static let protectedAttributeName = Array("trusted.overlay.protattr".utf8)

    /// Puts in a new upper layer each entry of the old one that carries
    /// overlayfs' `trusted.overlay.protattr` (immutable or append-only, set
    /// through the mount): overlayfs reads it from the upper layer only, so
    /// once the old upper layer is a lower one the flag would be lost. A
    /// directory is made with the old one's attributes (it merges with the
    /// layers below); a regular file becomes a metadata-only copy-up
    /// (`trusted.overlay.metacopy`: its data is the layer below's at the same
    /// path) with its attributes and the flag. The directories on the way are
    /// made with their attributes too. Returns the entries carried.
    static func carryProtectedAttributes(
        _ protected: [(path: [UInt8], flag: [UInt8])], from old: Directory, to upper: Directory
    )
        throws -> Int
    {
        guard !protected.isEmpty else { return 0 }
        let rootTime = try upper.stat().modificationTime
        var times: [[UInt8]: (Directory, Timestamp)] = [:]
        // The directory at `path` in the new upper, made (with the old one's attributes) when missing.
        func directory(_ path: [UInt8]) throws -> (made: Directory, old: Directory) {
            if path.isEmpty { return (upper, old) }
            let (parentPath, name) = splitLast(path)
            let (parent, oldParent) = try directory(parentPath)
            let oldDir = try oldParent.openDirectory(name)
            if (try? parent.stat(name)) == nil {
                try parent.makeDirectory(name, mode: 0o700)
                let made = try parent.openDirectory(name)
                try copyCarriedAttributes(
                    from: try oldDir.stat(), attributes: try oldDir.extendedAttributes(), owner: made.changeOwner,
                    mode: made.changeMode, set: made.setExtendedAttribute)
                times[path] = (made, try oldDir.stat().modificationTime)
            }
            return (try parent.openDirectory(name), oldDir)
        }
        let flagName = ExtendedAttribute(name: protectedAttributeName, value: []).name
        for (path, flag) in protected {
            if path.isEmpty {
                try upper.setExtendedAttribute(ExtendedAttribute(name: flagName, value: flag))
                continue
            }
            let (parentPath, name) = splitLast(path)
            let (dest, oldParent) = try directory(parentPath)
            let st = try oldParent.stat(name)
            if st.isDirectory {
                let (made, _) = try directory(path)
                try made.setExtendedAttribute(ExtendedAttribute(name: flagName, value: flag))
            } else {
                let f = try dest.createFile(name, mode: 0o600)
                try f.truncate(st.size)
                try f.setExtendedAttribute(ExtendedAttribute(name: TreeCopier.metacopyName, value: []))
                try copyCarriedAttributes(
                    from: st, attributes: try extendedAttributes(in: oldParent, of: name), owner: f.setOwner,
                    mode: f.setMode, set: f.setExtendedAttribute)
                try f.setExtendedAttribute(ExtendedAttribute(name: flagName, value: flag))
                try f.setModificationTime(st.modificationTime)
            }
        }
        for (dir, t) in times.values { try dir.setModificationTime(t) }
        try upper.setModificationTime(rootTime)
        return protected.count
    }

    /// The flag overlayfs' protection xattr gives a file or directory, if any.
    static func protectedFlag(_ st: FileStat, _ attributes: [ExtendedAttribute]) -> [UInt8]? {
        guard st.isDirectory || st.isRegular else { return nil }
        return attributes.first { $0.name == protectedAttributeName }?.value
    }

    /// The entries below an upper layer's root (files, directories) that
    /// carry overlayfs' protection flag, with the flag's value (a stacked
    /// fold notes them in its own walk of the layer; a compaction asks here).
    static func protectedEntries(in upper: Directory) throws -> [(path: [UInt8], flag: [UInt8])] {
        var out: [(path: [UInt8], flag: [UInt8])] = []
        var traversal = TreeTraversal<Void>()
        try traversal.run(upper, context: ()) { entry, _ in
            if let flag = protectedFlag(entry.stat, try extendedAttributes(in: entry.directory, of: entry.name)) {
                out.append((entry.path, flag))
            }
            return entry.stat.isDirectory ? .enter(()) : .next
        }
        return out
    }

    /// Gives an entry carried into a new upper layer the old one's owner,
    /// mode and xattrs (the guest's own, as the layer holds them, and
    /// overlayfs' protection flag; none of overlayfs' other names).
    static func copyCarriedAttributes(
        from st: FileStat, attributes: [ExtendedAttribute], owner: (UInt32, UInt32) throws -> Void,
        mode: (UInt32) throws -> Void, set: (ExtendedAttribute) throws -> Void
    ) throws {
        try owner(st.uid, st.gid)
        try mode(st.mode)
        for a in attributes where !isOverlayOwn(a.name) { try set(a) }
    }

    /// The most metadata layers a generation stacks: the fold that would
    /// stack one more builds the generation whole instead (a compaction).
    /// Overlayfs takes up to 500 lower layers; each adds a lookup to every
    /// path a guest opens that the layers above it do not hold.
    static let maxLayers = 16

    /// Why a fold of `old` builds the next generation whole rather than
    /// stacking its upper layer, or nil when it may stack.
    static func compactionReason(_ old: OverlayGuest.Generation, asked: Bool) -> String? {
        if asked { return "compaction asked for" }
        if old.layers.count >= maxLayers { return "\(old.layers.count) layers stacked, the most a fold stacks" }
        if let name = prefixNamedDirectory(in: [old.upper] + old.layers.map(\.directory)) {
            // In the lower layout that directory ends every redirect lookup
            // through it (it is opaque, so the objects' "ab" does not show in
            // the guest's): a stub in a layer above it would not reach its object.
            return "the guest's root has a directory named like the store's object directories (/\(name))"
        }
        guard let indexed = indexedOrigins(old), indexed.isEmpty else {
            // Their other names are only in the layers below: overlayfs' index joins them, and it does not carry over.
            return "hard-linked files were copied up"
        }
        return nil
    }

    /// The fold of `unify`: every unmounted overlay guest's copy-ups are made
    /// shared again. Usually the guest's upper layer becomes a metadata layer
    /// of the next generation as it is, stacked on the old ones
    /// (`foldStacked`): the fold reads only what the guest changed. When the
    /// stack is full, overlayfs' index holds copied-up hard links, or
    /// `compact` asks, the next generation is built whole from the merged
    /// view (`buildGeneration`). `state` then switches to it in one rename
    /// (`folding` → `active`); a fold killed before leaves the old generation
    /// in force. A mounted guest is left for its next start.
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
        if !hasCopyUps(old) && !(compact && old.layers.count > 1) {
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
        state.phase = .folding
        try guest.writeState(state)
        var shadowing = Shadowing()
        var placement = StubPlacement()
        let compaction = compactionReason(old, asked: compact)
        // What the old layers reference, known before they go (a compaction removes them).
        var before: LayerReferences.Counts = [:]
        // What the guest set immutable or append-only through its mount (its root's flag too).
        var protected: [(path: [UInt8], flag: [UInt8])] =
            old.upper.extendedAttribute("trusted.overlay.protattr").map { [([], $0)] } ?? []
        do {
            if compaction != nil {
                for layer in old.layers { before.merge(try LayerReferences.ensure(layer), uniquingKeysWith: +) }
                protected += try protectedEntries(in: old.upper)
            }
            if let why = compaction {
                result = try buildGeneration(
                    state.generation + 1, of: guest, from: guest, generation: state.generation, session: s)
                if !compact { result.notes.append("built whole: \(why)") }
                result.layers = 1
            } else {
                result = try foldStacked(
                    guest, old, session: s, shadowing: &shadowing, placement: &placement, protected: &protected)
                result.layers = old.layers.count + 1
            }
            // Overlayfs keeps those flags on the upper layer only: they go to the new one.
            result.protectedEntries = try carryProtectedAttributes(
                protected, from: old.upper, to: try guest.generation(state.generation + 1).upper)
        } catch {
            // Nothing of a fold that failed before its switch is published: its
            // objects made of the guest's files go, the guest keeps its generation.
            s.objects.abandonReservations()
            _ = try? recover(guest)
            throw error
        }
        result.root = root.string
        result.action = .folded
        state.phase = .active
        state.generation += 1
        try guest.writeState(state)
        try guest.removeGenerations(except: state.generation)
        let gen = try guest.generation(state.generation)
        let inPlaceKept = try finishStackedFold(gen, placement: compaction == nil ? placement : nil) { s.objects }
        noteKeptWhole(
            inPlaceKept.count, first: nil,
            why: xattrSpaceFull + " (\(inPlaceKept.map { escapedPath($0) }.prefix(3).joined(separator: ", ")))",
            in: &result)
        // The objects only the fold's guest referenced and no longer does go now (gc would find them too).
        var candidates = Set<[UInt8]>()
        if compaction == nil {
            candidates = try pruneShadowed(gen, shadowing: shadowing)
        } else if let after = LayerReferences.read(gen.layers[0]) {
            candidates = Set(before.keys.filter { (after[$0] ?? 0) == 0 })
        }
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

    /// Xattr names overlayfs writes for itself on an upper layer's entries
    /// (origin, impure, nlink …): `trusted.overlay.*` but for the guest's own, escaped ones.
    static func isOverlayOwn(_ name: [UInt8]) -> Bool {
        name.starts(with: TreeCopier.overlayPrefix) && !name.starts(with: TreeCopier.escapedPrefix)
    }

    /// The stacked fold: generation N's upper layer becomes the top metadata
    /// layer of generation N+1, above N's layers, with a fresh upper and work
    /// directory. In it, each file overlayfs copied up whole or the guest
    /// wrote anew (bigger than `stackedInlineLimit`, one name) is hashed and gets a
    /// stub of an existing or a new object (the file itself becomes the
    /// object when nothing of overlayfs is written on it); whiteouts, opaque
    /// and redirected directories, metadata-only copy-ups and everything else
    /// stay as overlayfs wrote them. The cost follows what the guest changed.
    ///
    /// The stubs are made beside the layer (`gN+1/staging`) and the renames
    /// that put them in place written down (`gN+1/fold-journal`) before the
    /// switch; they are done after it (`finishStackedFold`), when the layer
    /// is a lower layer: a stub in an upper layer cannot reach a data-only
    /// layer, a stub in a lower one can, and a file and the stub of its
    /// content are the same to the guest there. A fold killed before the
    /// switch leaves generation N in force and untouched; killed after, the
    /// next command that opens the guest finishes the renames first.
    static func foldStacked(
        _ guest: OverlayGuest, _ old: OverlayGuest.Generation, session s: Session, shadowing: inout Shadowing,
        placement: inout StubPlacement, protected: inout [(path: [UInt8], flag: [UInt8])]
    ) throws -> OverlayReport.Guest {
        var result = OverlayReport.Guest(root: guest.rootPath.string, action: .folded)
        let next = try guest.makeGeneration(
            old.number + 1, stacking: ["g\(old.number)/upper"] + old.layers.map(\.reference))
        try next.directory.makeDirectory(stagingName, mode: 0o700)
        let staging = try next.directory.openDirectory(stagingName)
        let filler = StubFiller(objects: s.objects, threads: fillThreads)
        var journal: [UInt8] = []
        var directoryTimes: [ObjectIdentifier: [UInt8]] = [:]
        let rootStat = try old.upper.stat()
        var escaped = 0
        var staged = 0
        // What each hashed file needs after hashing (not its descriptor: thousands may change).
        var files:
            [(directory: Directory, name: FileName, stat: FileStat, path: [UInt8], attributes: [ExtendedAttribute])] =
                []
        var traversal = TreeTraversal<Void>()
        do {
            try traversal.run(old.upper, context: ()) { entry, _ in
                var st = entry.stat
                var attributes = try extendedAttributes(in: entry.directory, of: entry.name)
                shadowing.note(entry.path, stat: st, attributes: attributes)
                // Read before overlayfs' names come off a file made an object.
                if let flag = protectedFlag(st, attributes) { protected.append((entry.path, flag)) }
                if st.isDirectory { return .enter(()) }
                escaped += attributes.filter { $0.name.starts(with: TreeCopier.escapedPrefix) }.count
                guard st.isRegular, st.linkCount == 1,
                    !attributes.contains(where: { $0.name == TreeCopier.metacopyName })
                else { return .next }
                if st.size <= stackedInlineLimit {
                    result.inlineFiles += 1
                    return .next
                }
                let handle = try entry.directory.openFileForReading(entry.name)
                if attributes.contains(where: { isOverlayOwn($0.name) }),
                    !attributes.contains(where: { $0.name.starts(with: TreeCopier.escapedPrefix) })
                {
                    // What overlayfs noted on its copy-up (its origin) is dropped, so that the
                    // file itself can become the object: no copy of its data.
                    for a in attributes where isOverlayOwn(a.name) { try handle.removeExtendedAttribute(a.name) }
                    attributes.removeAll { isOverlayOwn($0.name) }
                    st = try handle.stat()
                }
                let file = TreeCopier.SourceFile(
                    directory: entry.directory, name: entry.name, stat: st, handle: handle, path: entry.path,
                    context: nil, attributes: attributes)
                // The upper file itself becomes the object unless overlayfs wrote on it (its origin, say).
                filler.fill(nil, from: file, lease: false, linkSource: !file.carriesOverlayNames, key: files.count)
                files.append((entry.directory, entry.name, st, entry.path, attributes))
                result.filesHashed += 1
                result.stubs += 1
                return .next
            }
        } catch {
            _ = try? filler.finish()
            throw error
        }
        merge(try filler.finish(), into: &result)
        try s.objects.sync()
        let results = filler.results
        // A file whose stub cannot be made (its xattrs do not fit beside the
        // redirect, a failing disk) stays whole in its layer, and an object
        // that was to be made of it is not: the guest and the store go on.
        var keptWhole: [(path: [UInt8], error: any Error)] = []
        var dropped = Set<[UInt8]>()
        func noteTime(_ i: Int) throws {
            let file = files[i]
            // Siblings share their directory's descriptor (the walk opened each directory once).
            guard directoryTimes[ObjectIdentifier(file.directory)] == nil else { return }
            let t = try file.directory.stat().modificationTime
            directoryTimes[ObjectIdentifier(file.directory)] =
                Array("T \(t.seconds) \(t.nanoseconds) ".utf8)
                + Array(hexString(splitLast(file.path).directory).utf8)
                + [0x0a]
            placement.times.append((file.directory, t))
        }
        // A stub made beside the layer, to take the file's name after the switch.
        func stage(_ i: Int, redirect: [UInt8]) throws -> Bool {
            let file = files[i]
            let st = file.stat
            do {
                let stub = try makeStub(FileName("\(staged)"), in: staging, size: st.size, redirect: redirect)
                try stub.setOwner(uid: st.uid, gid: st.gid)
                try stub.setMode(st.mode)
                for a in file.attributes where !isOverlayOwn(a.name) {
                    do { try stub.setExtendedAttribute(a) } catch let e as Errno { throw StubAttributeError(errno: e) }
                }
                try stub.setModificationTime(st.modificationTime)
            } catch {
                try? staging.unlink(FileName("\(staged)"))
                keptWhole.append((file.path, error))
                return false
            }
            journal += Array("R \(staged) \(st.inode) ".utf8) + Array(hexString(file.path).utf8) + [0x0a]
            placement.renames.append((FileName("\(staged)"), file.directory, file.name, st.inode))
            staged += 1
            try noteTime(i)
            return true
        }
        // First the files that become objects: a stub for each.
        for i in files.indices {
            guard let (redirect, isObject) = results[i] else { throw InputError("\(guest.rootPath): fold lost a file") }
            if isObject, try !stage(i, redirect: redirect) {
                dropped.insert(redirect)
                result.bytesLinked -= min(result.bytesLinked, files[i].stat.allocatedBytes)
            }
        }
        s.objects.abandon(s.objects.reservations.filter { dropped.contains($0.redirect) })
        result.objectsCreated -= dropped.count
        // Then the files whose content an object holds: each becomes its stub
        // where it lies, or, with a file capability (which freeing its
        // blocks would take), gets a stub made beside the layer.
        for (i, file) in files.enumerated() {
            guard let (redirect, isObject) = results[i], !isObject else { continue }
            if dropped.contains(redirect) {
                keptWhole.append((file.path, InputError("its object was not made")))
                continue
            }
            if file.attributes.contains(where: { $0.name == Array("security.capability".utf8) }) {
                _ = try stage(i, redirect: redirect)
                continue
            }
            let (st, t) = (file.stat, file.stat.modificationTime)
            journal += Array("P \(st.inode) \(t.seconds) \(t.nanoseconds) \(hexString(redirect)) - ".utf8)
            journal += Array(hexString(file.path).utf8) + [0x0a]
            placement.inPlace.append((file.directory, file.name, st.inode, st.size, st.mode, t, redirect, nil))
        }
        noteKeptWhole(
            keptWhole.count, first: keptWhole.first?.path,
            why: keptWhole.first.map { describeFileError($0.error) } ?? "", in: &result)
        // The objects made of the layer's own files, recorded after the switch.
        for r in s.objects.reservations { journal += r.journalLine }
        for line in directoryTimes.values { journal += line }
        try next.directory.writeAtomically(journal, as: foldJournalName)
        try copyLayerRootAttributes(from: old.upper, stat: rootStat, to: next.upper)
        let carried = (try? old.directory.stat(OverlayGuest.escapedMarker)) != nil ? 1 : 0
        try next.markEscapedAttributes(escaped + carried)
        try next.directory.syncFilesystem()
        return result
    }

    /// What a stacked fold's new top layer shadows: the paths of its entries
    /// that hide whatever the layers below hold there (every entry but a
    /// directory or a metadata-only copy-up), and the paths its redirects
    /// still reach below (a renamed file's old path, a renamed directory's
    /// old subtree), which stay.
    struct Shadowing {
        var paths: [[UInt8]] = []
        var reached = Set<[UInt8]>()
        var reachedTrees: [[UInt8]] = []

        mutating func note(_ path: [UInt8], stat st: FileStat, attributes: [ExtendedAttribute]) {
            if let r = attributes.first(where: { $0.name == Array("trusted.overlay.redirect".utf8) })?.value {
                // Absolute, or relative to the entry's directory.
                let parent = splitLast(path).directory
                var target = r.first == 0x2f ? Array(r.drop { $0 == 0x2f }) : (parent.isEmpty ? r : parent + [0x2f] + r)
                while target.last == 0x2f { target.removeLast() }
                if st.isDirectory { reachedTrees.append(target) } else { reached.insert(target) }
            }
            if st.isDirectory || attributes.contains(where: { $0.name == TreeCopier.metacopyName }) { return }
            paths.append(path)
        }

        /// Whether what the layers below hold at `path` is surely hidden from the guest.
        func hides(_ path: [UInt8]) -> Bool {
            if reached.contains(path) { return false }
            return !reachedTrees.contains { t in t.isEmpty || path == t || path.starts(with: t + [0x2f]) }
        }
    }

    /// After a stacked fold: removes from the layers below the new top layer
    /// each stub it made unreachable (the topmost entry at a path the top
    /// layer hides, reached plainly: every directory on the way a directory,
    /// no whiteout, file, opaque or redirected directory above it in any
    /// layer), when the stub is one name of a data object, and rewrites
    /// those layers' reference lists. Returns the objects those stubs
    /// named. A stub another layer's redirect reaches always has a whiteout
    /// above it, where the lookup stops: it stays.
    static func pruneShadowed(_ gen: OverlayGuest.Generation, shadowing: Shadowing) throws -> Set<[UInt8]> {
        guard gen.layers.count > 1 else { return [] }
        // A layer's list is read (or made) before its first stub goes.
        var counts: [Int: LayerReferences.Counts] = [:]
        var removed = Set<[UInt8]>()
        var changed = Set<Int>()
        // Where a directory path leads in one layer, each looked up once.
        enum Place {
            /// A directory (`ends`: it or one above it in this layer is opaque or redirected).
            case directory(Directory, ends: Bool)
            /// Not in this layer (`ends`: the layers below are not reached either).
            case absent(ends: Bool)
            /// A whiteout or a file on the way: nothing at or below this layer is seen.
            case blocked
        }
        var places: [Int: [[UInt8]: Place]] = [:]
        func place(_ i: Int, _ path: [UInt8]) -> Place {
            if path.isEmpty { return .directory(gen.layers[i].directory, ends: false) }
            if let known = places[i]?[path] { return known }
            let (parent, name) = splitLast(path)
            let result: Place
            switch place(i, parent) {
            case .blocked: result = .blocked
            case .absent(let ends): result = .absent(ends: ends)
            case .directory(let dir, let ends):
                if let st = try? dir.stat(name) {
                    if st.isDirectory, let d = try? dir.openDirectory(name) {
                        result = .directory(d, ends: ends || FoldContext.endsLookup(d))
                    } else {
                        result = .blocked
                    }
                } else {
                    result = .absent(ends: ends)
                }
            }
            places[i, default: [:]][path] = result
            return result
        }
        for path in shadowing.paths where shadowing.hides(path) {
            let (parent, last) = splitLast(path)
            layers: for i in 1..<gen.layers.count {
                let dir: Directory
                let endsHere: Bool
                switch place(i, parent) {
                case .blocked: break layers
                case .absent(let ends):
                    if ends { break layers } else { continue layers }
                case .directory(let d, let ends): (dir, endsHere) = (d, ends)
                }
                let st: FileStat
                do { st = try dir.stat(last) } catch Errno.noSuchFileOrDirectory {
                    if endsHere { break layers } else { continue layers }
                }
                guard st.isRegular, st.linkCount == 1, let f = try? dir.openFileForReading(last),
                    f.extendedAttribute("trusted.overlay.metacopy") != nil
                else { break layers }
                guard let r = f.extendedAttribute("trusted.overlay.redirect") else {
                    // A metadata-only copy-up, itself hidden: its data is the next layer's at this path.
                    if endsHere { break layers }
                    try dir.unlink(last)
                    continue layers
                }
                guard DataObjects.isValidRedirect(r) else { break layers }
                if counts[i] == nil { counts[i] = try LayerReferences.ensure(gen.layers[i]) }
                try dir.unlink(last)
                counts[i]?[r, default: 1] -= 1
                changed.insert(i)
                removed.insert(r)
                break layers
            }
        }
        for i in changed.sorted() { try LayerReferences.write(counts[i] ?? [:], gen.layers[i]) }
        return removed
    }

    /// The size up to which a stacked fold leaves a copied-up file whole in
    /// its layer, unread: a file of one block holds no more disk than its
    /// stub would save, and a package update writes thousands of them (a
    /// time zone database) that would each cost a stub, an object and two
    /// renames while the guest waits to start. A compaction makes them
    /// stubs like any other file over `inlineLimit`.
    static let stackedInlineLimit: UInt64 = 4096

    /// A path below a layer's root split at its last slash: its directory's path and its name.
    static func splitLast(_ path: [UInt8]) -> (directory: [UInt8], name: FileName) {
        let slash = path.lastIndex(of: 0x2f)
        return (slash.map { Array(path[..<$0]) } ?? [], FileName(bytes: path[(slash.map { $0 + 1 } ?? 0)...]))
    }

    static let stagingName = FileName("staging")
    static let foldJournalName = FileName("fold-journal")

    /// The renames that put a stacked fold's stubs in place (staging name,
    /// directory, name, the inode the name must still be) and the mtimes of
    /// the directories they touch.
    struct StubPlacement {
        var renames: [(temp: FileName, directory: Directory, name: FileName, inode: UInt64)] = []
        var times: [(Directory, Timestamp)] = []
        /// Files whose content an object held already: each becomes that object's stub where it
        /// lies (its redirect and metacopy set, its blocks freed, then its capability and mtime,
        /// which freeing blocks takes, put back).
        var inPlace:
            [(
                directory: Directory, name: FileName, inode: UInt64, size: UInt64, mode: UInt32, mtime: Timestamp,
                redirect: [UInt8], capability: [UInt8]?
            )] = []
    }

    /// Puts a stacked fold's stubs in place in generation `gen`'s top layer
    /// (after the switch), puts back the mtimes of the directories the
    /// renames touched, records the layer's references, and removes the
    /// journal and the staging directory. Without `placement` (the fold was
    /// killed after its switch) the journal says what to do; a stub already
    /// moved is not in staging any more.
    @discardableResult
    static func finishStackedFold(
        _ gen: OverlayGuest.Generation, placement: StubPlacement? = nil, objects: () -> DataObjects?
    ) throws -> [[UInt8]] {
        let journal: [UInt8]
        do { journal = try gen.directory.openFileForReading(foldJournalName).readAll() } catch Errno
            .noSuchFileOrDirectory
        {
            return []
        }
        let layer = gen.layers[0].directory
        let staging = try? gen.directory.openDirectory(stagingName)
        let work = try placement ?? journalPlacement(gen, layer: layer, journal: journal)
        guard let reservations = DataObjects.Reservation.fromJournal(journal) else {
            throw InputError("\(gen.directory): fold journal damaged")
        }
        // First the objects made of the layer's own files are recorded (a
        // lower layer now: no guest writes them); a stub of one that cannot
        // be is not put in place, its file stays whole.
        let data = reservations.isEmpty && work.inPlace.isEmpty ? nil : objects()
        if data == nil && !(reservations.isEmpty && work.inPlace.isEmpty) {
            throw InputError("\(gen.directory): the store's data objects cannot be read")
        }
        var failed = Set<[UInt8]>()
        for r in reservations where try data?.commit(r) != true { failed.insert(r.redirect) }
        try data?.sync()
        if let staging {
            for r in work.renames {
                guard let stub = try? staging.openFileForReading(r.temp) else { continue }
                if let redirect = stub.extendedAttribute("trusted.overlay.redirect"), failed.contains(redirect) {
                    continue
                }
                // The file the stub stands for, as it was (a lower layer now: nothing writes it).
                guard let st = try? r.directory.stat(r.name), st.inode == r.inode else { continue }
                try? staging.rename(r.temp, to: r.directory, as: r.name)
            }
        }
        var keptWhole: [[UInt8]] = []
        for p in work.inPlace where !failed.contains(p.redirect) {
            // Never the object itself (its inode is checked against the file's).
            guard let st = try? p.directory.stat(p.name), st.inode == p.inode, st.isRegular, st.size == p.size,
                let object = try? data?.stat(p.redirect), object.inode != p.inode || object.device != st.device
            else { continue }
            if !makeStubInPlace(p) { keptWhole.append(p.name.bytes) }
        }
        for (dir, t) in work.times { try? dir.setModificationTime(t) }
        try LayerReferences.record(gen.layers[0])
        try gen.directory.sync()
        try gen.directory.unlink(foldJournalName)
        try gen.directory.removeTree(stagingName)
        return keptWhole
    }

    /// Makes a file of a lower layer the stub of the object holding its
    /// content where it lies: redirect and metacopy set, its blocks freed,
    /// its mode, capability and mtime put back. A step that fails before the
    /// blocks go undoes the others (the file stays whole: false); nothing fails after.
    static func makeStubInPlace(
        _ p: (
            directory: Directory, name: FileName, inode: UInt64, size: UInt64, mode: UInt32, mtime: Timestamp,
            redirect: [UInt8], capability: [UInt8]?
        )
    ) -> Bool {
        guard let f = try? p.directory.openFileForWriting(p.name) else { return false }
        let redirectName = Array("trusted.overlay.redirect".utf8)
        if f.extendedAttribute("trusted.overlay.metacopy") == nil {
            do {
                try f.setExtendedAttribute(ExtendedAttribute(name: redirectName, value: p.redirect))
                try f.setExtendedAttribute(ExtendedAttribute(name: TreeCopier.metacopyName, value: []))
            } catch {
                try? f.removeExtendedAttribute(redirectName)
                try? f.removeExtendedAttribute(TreeCopier.metacopyName)
                try? f.setModificationTime(p.mtime)
                return false
            }
        }
        do { try f.punchHole(p.size) } catch {}  // then the stub keeps its blocks: the same view
        if let cap = p.capability {
            try? f.setExtendedAttribute(ExtendedAttribute(name: Array("security.capability".utf8), value: cap))
        }
        try? f.setMode(p.mode)
        try? f.setModificationTime(p.mtime)
        return true
    }

    /// The placement a fold journal records, its directories opened from the layer (each once).
    static func journalPlacement(_ gen: OverlayGuest.Generation, layer: Directory, journal: [UInt8]) throws
        -> StubPlacement
    {
        var opened: [[UInt8]: Directory] = [[]: layer]
        func directory(_ path: [UInt8]) throws -> Directory {
            if let d = opened[path] { return d }
            let (parentPath, name) = splitLast(path)
            let d = try directory(parentPath).openDirectory(name)
            opened[path] = d
            return d
        }
        func split(_ hex: Substring) throws -> ([UInt8], FileName) {
            guard let path = bytesFromHex(hex.utf8), !path.isEmpty else { throw InputError("fold journal damaged") }
            return splitLast(path)
        }
        var out = StubPlacement()
        for line in journal.split(separator: 0x0a) {
            let fields = String(decoding: line, as: UTF8.self).split(
                separator: " ", maxSplits: 3, omittingEmptySubsequences: false)
            guard fields.count == 4 else { throw InputError("fold journal damaged") }
            if fields[0] == "R", let inode = UInt64(fields[2]) {
                let (parent, name) = try split(fields[3])
                guard let dir = try? directory(parent) else { continue }
                out.renames.append((FileName(String(fields[1])), dir, name, inode))
            } else if fields[0] == "P" {
                let f = String(decoding: line, as: UTF8.self).split(
                    separator: " ", maxSplits: 6, omittingEmptySubsequences: false)
                guard f.count == 7, let inode = UInt64(f[1]), let sec = Int64(f[2]), let ns = UInt32(f[3]),
                    let redirect = bytesFromHex(f[4].utf8)
                else { throw InputError("fold journal damaged") }
                let cap = f[5] == "-" ? nil : bytesFromHex(f[5].utf8)
                let (parent, name) = try split(f[6])
                guard let dir = try? directory(parent), let st = try? dir.stat(name) else { continue }
                out.inPlace.append(
                    (dir, name, inode, st.size, st.mode, Timestamp(seconds: sec, nanoseconds: ns), redirect, cap))
            } else if fields[0] == "T", let sec = Int64(fields[1]), let ns = UInt32(fields[2]) {
                guard let path = bytesFromHex(fields[3].utf8), let dir = try? directory(path) else { continue }
                out.times.append((dir, Timestamp(seconds: sec, nanoseconds: ns)))
            }
        }
        return out
    }

    /// Gives a new upper root the old upper root's owner, mode, mtime and
    /// xattrs but overlayfs' own (what the guest's root shows).
    static func copyLayerRootAttributes(from old: Directory, stat st: FileStat, to upper: Directory) throws {
        try upper.changeOwner(uid: st.uid, gid: st.gid)
        try upper.changeMode(st.mode)
        for a in try old.extendedAttributes() where !isOverlayOwn(a.name) { try upper.setExtendedAttribute(a) }
        try upper.setModificationTime(st.modificationTime)
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
                    rootContext: FoldContext(old, indexed: indexed ?? []))
            } catch {
                _ = try? filler.finish()
                throw error
            }
            merge(try filler.finish(), into: &result)
            try LayerReferences.record(next.layers[0])
            try copyRootAttributes(from: merged, to: next.upper)
            try DataLayerHiding.apply(to: next.meta)
            // What was linked unchanged keeps the old generation's escaped xattrs.
            let carried = (try? old.directory.stat(OverlayGuest.escapedMarker)) != nil && linkUnchanged ? 1 : 0
            try next.markEscapedAttributes(copier.escapedAttributes + carried)
            noteKeptWhole(copier.keptWhole, first: copier.firstKeptWhole, why: xattrSpaceFull, in: &result)
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
