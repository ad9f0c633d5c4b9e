import HashifySystem
import SystemPackage

extension Overlay {
    /// `hashify overlay convert`: stopped plain guests become overlay guests.
    ///
    /// 1. (`converting`) Generation 1 is built beside the guest: a stub per
    ///    regular file, pointing at a data object that is the guest's own inode
    ///    linked into the store (or a clone or copy where the inode has names
    ///    outside the guest, as hardlink-mode objects do). The guest's tree is
    ///    only read.
    /// 2. (`switching`) An empty directory with the root's attributes is
    ///    exchanged with ROOT (`renameat2(RENAME_EXCHANGE)`): one atomic step.
    /// 3. (`active`) The overlay is mounted on ROOT; the old tree, now in the
    ///    store, is removed (its data lives on in the objects).
    public static func convert(_ options: OverlayOptions) throws -> OverlayReport {
        let started = MonotonicInstant.now()
        // Before anything is made (the store among it).
        if let why = OverlayMount.imageUnsupportedReason() { throw InputError(why) }
        var s = try session(options, createRecords: true)
        if let why = OverlayMount.unsupportedReason(store: s.store) { throw InputError(why) }
        let storeDevice = try s.store.directory.stat().device
        // Every refusal before anything changes.
        for g in s.guests {
            if let record = g.record { try recover(record) }
            let dir = try Directory.open(path: g.canonical)
            if let record = g.record, let state = try record.readState(), state.phase == .active {
                if let gen = try? record.generation(state.generation), OverlayMount.isMounted(gen, at: dir) { continue }
                if OverlayMount.isMountPoint(dir) {
                    throw InputError("\(g.root): a mount point, but not of its overlay (unmount it first)")
                }
                continue
            }
            try checkConvertible(g.root, canonical: g.canonical, dir, store: s.store.directory, storePath: s.store.path)
        }
        var report = OverlayReport(command: "overlay convert", store: s.store.path.string)
        let hardlinkObjects = Set((try? s.store.objectGenerations())?.keys.map { $0 } ?? [])
        let remover = BackgroundRemover()
        defer { try? remover.finish() }
        for i in s.guests.indices {
            let g = s.guests[i]
            let record = try g.record ?? OverlayGuest.open(store: s.store, canonicalRoot: g.canonical, create: true)!
            s.guests[i].record = record
            if let state = try record.readState(), state.phase == .active {
                report.guests.append(try mountGuest(record, root: g.root, session: s))
                continue
            }
            do {
                report.guests.append(
                    try convertOne(
                        record, root: g.root, session: s, hardlinkObjects: hardlinkObjects, storeDevice: storeDevice,
                        mount: options.mount, remover: remover))
            } catch let e as InputError {
                _ = try? recover(record)
                throw e
            } catch {
                // Before the switch this undoes the work at once (the guest is its plain tree); after it, it finishes it.
                let state = (try? recover(record)) ?? nil
                // Named with the guest and what happened to it (a bare "/usr/share: No space left on device"
                // reads like the host's /usr/share).
                throw ConversionFailed(
                    root: g.root, leftAsItWas: state?.phase != .active, underlying: error)
            }
        }
        try remover.finish()
        report.seconds = elapsed(since: started)
        return report
    }

    /// Why `convert` would refuse the plain guest at `root` (what a dry run
    /// predicts), or nil: the same checks, nothing made or changed.
    public static func conversionRefusal(root: FilePath, storePath: FilePath) -> String? {
        do {
            guard let canonical = RootValidation.canonical(root) else { return "\(root): no such directory" }
            // The store, or its nearest existing parent (a dry run makes nothing).
            var p = storePath
            var storeDirectory: Directory?
            while storeDirectory == nil && !p.isEmpty {
                storeDirectory = try? Directory.open(path: p)
                if storeDirectory == nil { p = p.removingLastComponent() }
            }
            try checkConvertible(
                root, canonical: canonical, try Directory.open(path: canonical), store: storeDirectory,
                storePath: storePath)
            return nil
        } catch let e as InputError {
            return e.description
        } catch {
            return "\(root): \(error)"
        }
    }

    /// Refuses (one line, nothing changed) a plain guest `convert` cannot take:
    /// a mount point, another filesystem than the store, processes using it,
    /// a rootfs its manager mounts idmapped, overlay xattrs of its own before 6.7.
    static func checkConvertible(
        _ root: FilePath, canonical: FilePath, _ dir: Directory, store: Directory?, storePath: FilePath
    ) throws {
        if OverlayMount.isMountPoint(dir) {
            throw InputError("\(root): already a mount point (convert needs the plain directory)")
        }
        if let store, try !dir.isOnSameFilesystem(as: store) {
            throw InputError(
                dir.btrfsFilesystemID != nil && store.btrfsFilesystemID != nil
                    ? "\(root): on another btrfs filesystem than the store \(storePath) (objects are reflinks of the guest's files; give --store on its filesystem)"
                    : "\(root): not on the filesystem of the store \(storePath) (objects are links of the guest's inodes; give --store on it)"
            )
        }
        try checkNotInUse(root, canonical: canonical, mountedOverlay: false)
        if let why = idmappedRootfs(canonical) { throw InputError("\(root): \(why)") }
        try ownOverlayAttributeRefusal(root: root, tree: dir)
    }

    /// A conversion that failed on an error of the system (not of its input):
    /// names the guest and whether it was left as it was.
    struct ConversionFailed: Error, CustomStringConvertible {
        var root: FilePath
        var leftAsItWas: Bool
        var underlying: any Error
        var description: String {
            "\(root): conversion failed (\(leftAsItWas ? "the guest is left as it was, a plain directory" : "the guest is an overlay guest; the next command finishes its conversion")): \(underlying)"
        }
    }

    static func convertOne(
        _ guest: OverlayGuest, root: FilePath, session s: Session, hardlinkObjects: Set<UInt64>, storeDevice: UInt64,
        mount: Bool, remover: BackgroundRemover
    ) throws -> OverlayReport.Guest {
        let started = MonotonicInstant.now()
        var result = OverlayReport.Guest(root: root.string, action: .converted)
        let source = try Directory.open(path: guest.rootPath)
        let rootStat = try source.stat()
        var state = OverlayGuest.State(phase: .converting, generation: 1, rootInode: rootStat.inode)
        try guest.writeState(state)
        let generation = try guest.makeGeneration(1)
        let filler = StubFiller(objects: s.objects, threads: fillThreads)
        let builder = GenerationBuilder(filler: filler, lease: true) { file in
            // The guest's own inode becomes the object when no name outside the guest links it.
            // An inode carrying trusted.overlay.* xattrs is cloned instead: as an object it would keep them.
            // A file of another btrfs subvolume cannot be linked: it is cloned (a reflink, no data copied).
            file.stat.linkCount == 1 && !hardlinkObjects.contains(file.stat.inode) && !file.carriesOverlayNames
                && file.stat.device == storeDevice
        }
        let gen: OverlayGuest.Generation
        do {
            merge(try builder.build(source, context: nil), into: &result)
            result.stubs = builder.stubs
            result.inlineFiles = builder.inlineFiles
            try GuestImage.write(builder.tree, into: generation, number: 1)
            gen = try guest.generation(1)
            try copyRootAttributes(from: source, to: gen.upper)
            try gen.markEscapedAttributes(builder.escapedAttributes)
            // The objects made of the guest's own inodes are recorded only
            // after the switch, when no guest can write them: journaled here.
            try gen.directory.writeAtomically(
                s.objects.reservations.flatMap(\.journalLine), as: objectsJournalName)
            try s.objects.sync()
        } catch {
            // Undone at once: the generation, and the objects it alone made
            // (the guest's own inodes, linked: they would keep its link counts raised).
            s.objects.abandonReservations()
            _ = try? recover(guest)
            s.objects.remove(filler.objectsMade)
            throw error
        }

        let (scratch, plain, parent, name) = try switchToMountPoint(
            guest, root: root, rootStat: rootStat, state: &state, session: s)
        try commitConvertedObjects(gen, plain: try scratch.openDirectory(plain), objects: s.objects)

        if mount {
            try OverlayMount.mount(gen, data: s.dataPath, on: try parent.openDirectory(name))
            result.action = .convertedAndMounted
        }
        // The old tree goes while the next guest is converted.
        remover.remove(plain, in: scratch)
        result.seconds = elapsed(since: started)
        return result
    }

    /// The switch: an empty mount point with the root's attributes takes the
    /// tree's place in one rename (`switching` → `active`); returns where the
    /// old tree is now and where the mount point is. A guest started while
    /// it was being read would lose what it writes now: checked again right before.
    static func switchToMountPoint(
        _ guest: OverlayGuest, root: FilePath, rootStat: FileStat, state: inout OverlayGuest.State,
        session s: Session
    ) throws -> (scratch: Directory, plain: FileName, parent: Directory, name: FileName) {
        try checkNotInUse(root, canonical: guest.rootPath, mountedOverlay: false)
        state.phase = .switching
        try guest.writeState(state)
        let (scratch, plain) = try guest.scratchPlace("plain")
        try scratch.removeTree(plain)
        try scratch.makeDirectory(plain, mode: 0o700)
        let mountPoint = try scratch.openDirectory(plain)
        try mountPoint.changeOwner(uid: rootStat.uid, gid: rootStat.gid)
        try mountPoint.changeMode(rootStat.mode)
        try GuestStore.mark(mountPoint, store: s.store.path)
        try mountPoint.setModificationTime(rootStat.modificationTime)
        let (parent, name) = try parentAndName(guest.rootPath)
        guard let now = try? parent.stat(name), now.inode == rootStat.inode else {
            throw InputError("\(root): replaced while it was being converted")
        }
        let parentTime = try parent.stat().modificationTime
        try scratch.rename(plain, to: parent, as: name, flags: .exchange)
        try? parent.setModificationTime(parentTime)
        try? parent.sync()
        state.phase = .active
        try guest.writeState(state)
        return (scratch, plain, parent, name)
    }

    /// In a generation a conversion made: the objects made of the guest's
    /// own inodes, recorded after the switch (`DataObjects.Reservation`).
    static let objectsJournalName = FileName("objects-journal")

    /// Records the objects a conversion made of the guest's own inodes (after
    /// its switch: the old tree at `plain` is no guest's any more), or a fold
    /// of its old upper layer's files (`plain` is that layer), and removes
    /// the journal. An inode that changed since it was hashed is not
    /// recorded; each stub naming it is given an object of what the old tree
    /// holds at its path now (the image written again), so the guest sees
    /// its file as it is.
    static func commitConvertedObjects(
        _ gen: OverlayGuest.Generation, plain: Directory, objects: DataObjects,
        journal: FileName = objectsJournalName
    ) throws {
        let bytes: [UInt8]
        do { bytes = try gen.directory.openFileForReading(journal).readAll() } catch Errno
            .noSuchFileOrDirectory
        {
            return
        }
        guard let reservations = DataObjects.Reservation.fromJournal(bytes) else {
            throw InputError("\(gen.directory): objects journal damaged")
        }
        var failed = Set<[UInt8]>()
        for r in reservations where try !objects.commit(r) { failed.insert(r.redirect) }
        try objects.sync()
        if !failed.isEmpty {
            var tree = try GuestImage.read(gen)
            for stub in GuestImage.stubs(in: tree, naming: failed) {
                guard let id = tree.lookup(stub.path) else { continue }
                let redirect = try objectOfFile(at: stub.path, in: plain, objects: objects)
                tree[id].xattrs.removeAll { $0.name == GuestImage.redirectName }
                tree[id].xattrs.append(ExtendedAttribute(name: GuestImage.redirectName, value: redirect))
            }
            try GuestImage.write(tree, into: gen.directory, number: gen.number)
        }
        try gen.directory.sync()
        try gen.directory.unlink(journal)
    }

    /// The data object (found, or made as a copy) of the file at `path` in `tree`.
    static func objectOfFile(at path: [UInt8], in tree: Directory, objects: DataObjects) throws -> [UInt8] {
        var dir = tree
        let parts = path.split(separator: 0x2f).map { FileName(bytes: $0) }
        for part in parts.dropLast() { dir = try dir.openDirectory(part) }
        let file = try dir.openFileForReading(parts[parts.count - 1])
        let size = try file.stat().size
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        let (digest, _) = try ContentHasher.contentDigest(of: file, size: size, buffer: buffer)
        if let r = objects.redirect(for: digest) { return r }
        try file.rewind()
        return try objects.publish(file, digest: digest, size: size, linkSource: false)
    }

    /// Mounts an overlay guest's generation in force on its root (nothing when it already is).
    static func mountGuest(_ guest: OverlayGuest, root: FilePath, session s: Session) throws -> OverlayReport.Guest {
        guard let state = try recover(guest), state.phase == .active else {
            throw InputError("\(root): not an overlay guest of this store (convert it first)")
        }
        let gen = try guest.generation(state.generation)
        let dir = try Directory.open(path: guest.rootPath)
        var result = OverlayReport.Guest(root: root.string, action: .alreadyMounted)
        noteMissingData(guest, objects: s.objects, in: &result)
        if OverlayMount.isMounted(gen, at: dir) { return result }
        if OverlayMount.isMountPoint(dir) { throw InputError("\(root): something else is mounted here") }
        if try !dir.entryNames().isEmpty { throw InputError("\(root): the mount point is not empty") }
        // Guests converted by earlier versions learn their store here.
        try? GuestStore.mark(dir, store: s.store.path)
        do {
            try OverlayMount.mount(gen, data: s.dataPath, on: dir)
        } catch {
            throw InputError("\(root): mount failed: \(error)")
        }
        result.action = .mounted
        return result
    }
}

extension Overlay {
    /// Why a container's rootfs cannot become an overlay guest because its
    /// manager mounts it idmapped, or nil.
    ///
    /// Incus keeps an unprivileged container's files unshifted on disk and
    /// has LXC mount the rootfs idmapped at each start; an overlay mount
    /// cannot be idmapped, so such a container would fail to start (tried:
    /// LXC's "Failed to create detached idmapped mount", EINVAL). Read from
    /// the instance's `backup.yaml` beside the rootfs: `security.privileged`
    /// not "true" and no shift recorded on disk (`volatile.last_state.idmap: '[]'`).
    /// Privileged Incus containers work through `raw.lxc` hooks.
    static func idmappedRootfs(_ root: FilePath) -> String? {
        guard root.lastComponent?.string == "rootfs",
            let instance = try? Directory.open(path: root.removingLastComponent())
        else { return nil }
        // LXC's own idmapped rootfs (`lxc.rootfs.options = idmap=container`): the same failure.
        if let lxc = GuestDiscovery.lxcConfig(besideRootfs: root),
            let options = GuestDiscovery.lxcConfigValue(lxc, keys: ["lxc.rootfs.options"]), options.contains("idmap=")
        {
            return
                "its LXC config mounts the rootfs idmapped (lxc.rootfs.options = \(options)), which an overlay mount cannot be (it would not start); shift its files on disk instead (no idmap= option)"
        }
        guard let incus = IncusInstance.read(instance) else { return nil }
        if incus.privileged || incus.shiftedOnDisk { return nil }
        return
            "an unprivileged Incus container: Incus mounts its rootfs idmapped at each start, which an overlay mount cannot be (it would not start); have Incus shift its files on disk instead (run incusd with INCUS_IDMAPPED_MOUNTS_DISABLE=1 in its environment and start the container once), make it privileged (security.privileged=true), or keep it in hardlink mode with its root trusted (trust-root)"
    }
}
