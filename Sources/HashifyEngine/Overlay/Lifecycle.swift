import HashifySystem
import SystemPackage

extension Overlay {
    /// The record and state in force of an overlay guest, or bad input.
    static func activeGuest(_ g: (root: FilePath, canonical: FilePath, record: OverlayGuest?)) throws -> (
        OverlayGuest, OverlayGuest.State
    ) {
        guard let record = g.record, let state = try recover(record), state.phase == .active else {
            throw InputError("\(g.root): not an overlay guest of this store (hashify overlay convert makes it one)")
        }
        return (record, state)
    }

    /// `hashify overlay mount`: mounts each guest's generation in force.
    public static func mount(_ options: OverlayOptions) throws -> OverlayReport {
        let started = MonotonicInstant.now()
        let s = try session(options, createRecords: false)
        for g in s.guests { _ = try activeGuest(g) }
        var report = OverlayReport(command: "overlay mount", store: s.store.path.string)
        for g in s.guests { report.guests.append(try mountGuest(g.record!, root: g.root, session: s)) }
        report.seconds = elapsed(since: started)
        return report
    }

    /// `hashify overlay umount`: unmounts each guest; refuses, naming them,
    /// while processes use it.
    public static func umount(_ options: OverlayOptions) throws -> OverlayReport {
        let started = MonotonicInstant.now()
        let s = try session(options, createRecords: false)
        var mounted: [Bool] = []
        for g in s.guests {
            let (record, state) = try activeGuest(g)
            let isMounted = OverlayMount.isMounted(
                try record.generation(state.generation), at: try Directory.open(path: g.canonical))
            if isMounted { try checkNotInUse(g.root, canonical: g.canonical, mountedOverlay: true) }
            mounted.append(isMounted)
        }
        var report = OverlayReport(command: "overlay umount", store: s.store.path.string)
        for (i, g) in s.guests.enumerated() {
            if !mounted[i] {
                report.guests.append(OverlayReport.Guest(root: g.root.string, action: .notMounted))
                continue
            }
            do { try OverlayMount.unmount(g.canonical) } catch {
                throw InputError("\(g.root): umount failed: \(error)")
            }
            report.guests.append(OverlayReport.Guest(root: g.root.string, action: .unmounted))
        }
        report.seconds = elapsed(since: started)
        return report
    }

    /// Mounts the guest's generation privately (read-only, in the store) for
    /// fold and export, runs body on its root and unmounts it again.
    static func withPrivateMount<T>(
        _ guest: OverlayGuest, _ gen: OverlayGuest.Generation, session s: Session,
        _ body: (Directory) throws -> T
    ) throws -> T {
        try guest.unmountPrivate()
        let mntPath = try guest.privateMountPoint()
        try OverlayMount.mount(gen, data: s.dataPath, on: try Directory.open(path: mntPath), readOnly: true)
        defer { try? OverlayMount.unmount(mntPath) }
        return try body(try Directory.open(path: mntPath))
    }

    /// A copier that makes full copies of regular files (an export).
    static func plainCopier(result: OverlayReport.Guest) -> (TreeCopier, () -> OverlayReport.Guest) {
        var result = result
        let copier = TreeCopier { file, dest in
            let out = try dest.createFile(file.name, mode: 0o600)
            try file.handle.cloneContent(to: out, size: file.stat.size)
            guard try out.stat().size == file.stat.size else { throw Errno.ioError }
            result.bytesCopied += file.stat.size
            result.stubs += 1
            return out
        }
        return (copier, { result })
    }

    /// `hashify overlay export`: a plain directory with everything the guest
    /// shows. With a destination, a copy there (the guest stays as it is);
    /// without, the guest itself becomes a plain directory again:
    /// (`exporting`) the copy is built in the store, (`restoring`) exchanged
    /// with the unmounted mount point in one rename, then the records go.
    public static func export(_ options: OverlayOptions) throws -> OverlayReport {
        let started = MonotonicInstant.now()
        let s = try session(options, createRecords: false)
        var report = OverlayReport(command: "overlay export", store: s.store.path.string)
        if let dest = options.destination {
            guard s.guests.count == 1 else { throw InputError("export to a destination takes one guest root") }
            let g = s.guests[0]
            let (record, state) = try activeGuest(g)
            report.guests.append(try exportCopy(record, state: state, root: g.root, to: dest, session: s))
        } else {
            var states: [OverlayGuest.State] = []
            for g in s.guests {
                let (record, state) = try activeGuest(g)
                if OverlayMount.isMounted(
                    try record.generation(state.generation), at: try Directory.open(path: g.canonical))
                {
                    try checkNotInUse(g.root, canonical: g.canonical, mountedOverlay: true)
                }
                states.append(state)
            }
            for (i, g) in s.guests.enumerated() {
                report.guests.append(try exportInPlace(g.record!, state: states[i], root: g.root, session: s))
            }
        }
        report.seconds = elapsed(since: started)
        return report
    }

    static func exportCopy(
        _ guest: OverlayGuest, state: OverlayGuest.State, root: FilePath, to dest: FilePath, session s: Session
    ) throws -> OverlayReport.Guest {
        let started = MonotonicInstant.now()
        guard let last = dest.lastComponent, !dest.removingLastComponent().isEmpty || dest.isRelative else {
            throw InputError("\(dest): not a destination directory name")
        }
        let parentPath = dest.removingLastComponent().isEmpty ? FilePath(".") : dest.removingLastComponent()
        let parent: Directory
        do { parent = try Directory.open(path: parentPath) } catch {
            throw InputError("\(parentPath): no such directory")
        }
        let name = FileName(last.string)
        if (try? parent.stat(name)) != nil { throw InputError("\(dest): already exists") }
        let temp = FileName(Array(".".utf8) + name.bytes + Array(".hashify-export".utf8))
        try parent.removeTree(temp)
        try parent.makeDirectory(temp, mode: 0o700)
        let gen = try guest.generation(state.generation)
        let live = try Directory.open(path: guest.rootPath)
        let (copier, outcome) = plainCopier(
            result: OverlayReport.Guest(root: root.string, action: .exportedTo(dest.string)))
        do {
            if OverlayMount.isMounted(gen, at: live) {
                // A running guest: what vanishes while it is read is left out, as any backup would.
                copier.skipVanished = true
                try copier.copy(live, into: try parent.openDirectory(temp))
            } else {
                try withPrivateMount(guest, gen, session: s) {
                    try copier.copy($0, into: try parent.openDirectory(temp))
                }
            }
        } catch {
            try? parent.removeTree(temp)
            throw error
        }
        try parent.syncFilesystem()
        try parent.rename(temp, to: parent, as: name, flags: .noReplace)
        var result = outcome()
        if copier.vanished > 0 {
            result.notes.append("\(copier.vanished) entries vanished while the running guest was read")
        }
        result.seconds = elapsed(since: started)
        return result
    }

    static func exportInPlace(_ guest: OverlayGuest, state: OverlayGuest.State, root: FilePath, session s: Session)
        throws -> OverlayReport.Guest
    {
        let started = MonotonicInstant.now()
        let gen = try guest.generation(state.generation)
        if OverlayMount.isMounted(gen, at: try Directory.open(path: guest.rootPath)) {
            do { try OverlayMount.unmount(guest.rootPath) } catch {
                throw InputError("\(root): umount failed: \(error)")
            }
        }
        var st = state
        st.phase = .exporting
        try guest.writeState(st)
        let (scratch, exportName) = try guest.scratchPlace("export")
        try scratch.removeTree(exportName)
        try scratch.makeDirectory(exportName, mode: 0o700)
        let (copier, outcome) = plainCopier(result: OverlayReport.Guest(root: root.string, action: .exportedInPlace))
        try withPrivateMount(guest, gen, session: s) {
            try copier.copy($0, into: try scratch.openDirectory(exportName))
        }
        try scratch.syncFilesystem()

        let (parent, name) = try parentAndName(guest.rootPath)
        let mountPoint = try parent.stat(name)
        st.phase = .restoring
        st.rootInode = mountPoint.inode
        try guest.writeState(st)
        let parentTime = try parent.stat().modificationTime
        try scratch.rename(exportName, to: parent, as: name, flags: .exchange)
        try? parent.setModificationTime(parentTime)
        try? parent.sync()
        try guest.writeState(nil)
        guest.removeRecord()
        var result = outcome()
        result.seconds = elapsed(since: started)
        return result
    }
}
