import HashifySystem
import SystemPackage

/// Options of `hashify clone`.
public struct CloneOptions: Sendable {
    public var source: FilePath
    public var destination: FilePath
    public var store: FilePath?
    public var waitForLock = true
    /// Write an LXC config for the clone: the source's, with this name and the new rootfs.
    public var lxcName: String?
    /// Overlay clones: mount the new guest.
    public var mount = true
    public init(source: FilePath, destination: FilePath) {
        self.source = source
        self.destination = destination
    }
}

/// What `hashify clone` made.
public struct CloneReport: Sendable, Codable {
    public var schema = 1
    public var command = "clone"
    public var source: String
    public var destination: String
    public var mode: String
    /// Files that are the store's objects, linked (hardlink mode), or stubs of shared data objects (overlay mode).
    public var filesShared = 0
    /// Files copied with every attribute (not store objects, conffiles, the excluded mutable trees).
    public var filesCopied = 0
    public var bytesCopied: UInt64 = 0
    public var lxcConfig: String?
    public var seconds = 0.0
    public var exitStatus: Int32 = 0
    /// The source's name, when it has one.
    public var sourceGuest: String?
}

/// `hashify clone SRC DST` (VServer's vclone): a new guest from an existing
/// one in seconds. In hardlink mode the files that are store objects are
/// linked, everything else (dpkg conffiles and the default-excluded mutable
/// trees among it) copied with every attribute; an overlay guest gets a new
/// metadata layer over the same data objects and an empty upper layer. The
/// new guest is built under a temporary name and renamed to DST in one step,
/// so a killed clone leaves nothing under DST's name.
public enum Clone {
    public static func run(_ options: CloneOptions) throws -> CloneReport {
        let started = MonotonicInstant.now()
        _ = prepareProcessForUnification()
        let source = try RootValidation.checkedRoots([options.source])[0].canonical
        guard let name = options.destination.lastComponent, name.kind == .regular else {
            throw InputError("\(options.destination): not a directory name")
        }
        let parentPath =
            options.destination.removingLastComponent().isEmpty
            ? FilePath(".") : options.destination.removingLastComponent()
        // With --lxc, LXCPATH/NAME is made when missing, as lxc-copy does (after every check).
        var parent = try? Directory.open(path: parentPath)
        let madeParent = parent == nil && options.lxcName != nil
        let existingParent = madeParent ? parentPath.removingLastComponent() : parentPath
        guard let canonicalParent = RootValidation.canonical(existingParent.isEmpty ? "." : existingParent),
            let existing = try? Directory.open(path: canonicalParent), parent != nil || madeParent
        else {
            throw InputError(
                "\(parent == nil && options.lxcName == nil ? parentPath : existingParent): no such directory")
        }
        let canonicalDestination =
            madeParent
            ? canonicalParent.appending(parentPath.lastComponent!).appending(name) : canonicalParent.appending(name)
        if canonicalDestination == source || RootValidation.isInside(canonicalDestination, source)
            || RootValidation.isInside(source, canonicalDestination)
        {
            throw InputError(
                "\(options.destination): inside the source \(options.source) or containing it (a clone must be beside it)"
            )
        }
        let dstName = FileName(name.string)
        if let parent, (try? parent.stat(dstName)) != nil { throw InputError("\(options.destination): already exists") }
        let storePath = options.store ?? RootValidation.defaultStorePath(for: [options.source])
        try GuestStore.check([options.source], store: storePath)
        guard let store = try Store.open(at: storePath, create: false) else {
            throw InputError("\(storePath): no hashify store here (unify or convert the source first, or give --store)")
        }
        if try existing.stat().device != store.directory.stat().device {
            throw InputError("\(existingParent): not on the filesystem of the store \(storePath)")
        }
        let overlaySource = try OverlayGuest.open(store: store, canonicalRoot: source, create: false)
            .flatMap { try $0.readState() != nil ? $0 : nil }
        if overlaySource == nil, try Directory.open(path: source).stat().device != store.directory.stat().device {
            throw InputError("\(options.source): not on the filesystem of the store \(storePath)")
        }
        var lxc: (config: [UInt8], path: FilePath)?
        if let n = options.lxcName {
            lxc = try lxcConfig(
                name: n, source: source, destination: options.destination, parent: parentPath,
                absolute: canonicalDestination)
        }
        try store.lock(wait: options.waitForLock)
        if madeParent {
            let lxcName = FileName(parentPath.lastComponent!.string)
            try existing.makeDirectory(lxcName, mode: 0o770)
            parent = try existing.openDirectory(lxcName)
        }
        guard let parent else { throw InputError("\(parentPath): no such directory") }
        var report = CloneReport(
            source: options.source.string, destination: options.destination.string, mode: "hardlink")
        do {
            try cloneInto(
                parent, as: dstName, source: source, overlaySource: overlaySource, options: options, store: store,
                report: &report)
        } catch {
            if madeParent { try? existing.removeTree(FileName(parentPath.lastComponent!.string)) }
            throw error
        }
        if let lxc {
            try parent.writeAtomically(lxc.config, as: FileName("config"))
            report.lxcConfig = lxc.path.string
        }
        report.seconds = started.secondsElapsed
        return report
    }

    /// The clone itself, hardlink or overlay mode as the source is.
    static func cloneInto(
        _ parent: Directory, as dstName: FileName, source: FilePath, overlaySource: OverlayGuest?,
        options: CloneOptions, store: Store, report: inout CloneReport
    ) throws {
        if let record = overlaySource {
            report.mode = "overlay"
            try cloneOverlay(
                record, to: parent, as: dstName, destinationPath: options.destination, store: store,
                mount: options.mount, report: &report)
        } else {
            try cloneHardlink(source, to: parent, as: dstName, store: store, report: &report)
            // Every later command finds this store for the clone (RootValidation.defaultStorePath).
            if let c = RootValidation.canonical(options.destination) { store.rememberGuests([c]) }
        }
    }

    /// Hardlink mode: store objects linked, the rest copied, in a temporary
    /// directory beside DST that is renamed to DST at the end.
    static func cloneHardlink(
        _ source: FilePath, to parent: Directory, as name: FileName, store: Store, report: inout CloneReport
    ) throws {
        let objects = Set(try store.objectGenerations().keys)
        let src = try Directory.open(path: source)
        let conffiles = DpkgConffiles.read(guestRoot: src)
        let mutable = PathFilter.defaultExcludes.map { Array($0.utf8) }
        let temp = FileName(Array(".".utf8) + name.bytes + Array(".hashify-clone".utf8))
        try parent.removeTree(temp)
        try parent.makeDirectory(temp, mode: 0o700)
        var shared = 0
        var copied = 0
        var bytes: UInt64 = 0
        let copier = TreeCopier { file, dest in
            let path = [0x2f] + file.path
            let isMutable = mutable.contains {
                path.starts(with: $0) && (path.count == $0.count || path[$0.count] == 0x2f)
            }
            if objects.contains(file.stat.inode), !isMutable, !conffiles.contains(path) {
                // The very inode that was checked (no name resolved again), still the object.
                try file.handle.link(into: dest, as: file.name)
                if let st = try? dest.stat(file.name), st.inode == file.stat.inode {
                    shared += 1
                    return nil
                }
                try dest.unlink(file.name)
            }
            let out = try dest.createFile(file.name, mode: 0o600)
            try file.handle.cloneContent(to: out, size: file.stat.size)
            guard try out.stat().size == file.stat.size else { throw Errno.ioError }
            copied += 1
            bytes += file.stat.size
            return out
        }
        do {
            try copier.copy(src, into: try parent.openDirectory(temp))
            try parent.syncFilesystem()
            try parent.rename(temp, to: parent, as: name, flags: .noReplace)
        } catch {
            try? parent.removeTree(temp)
            throw error
        }
        report.filesShared = shared
        report.filesCopied = copied
        report.bytesCopied = bytes
    }

    /// Overlay mode: a new guest record whose generation 1 is the source's
    /// merged view over the same data objects (files the source's upper layer
    /// does not hold keep their objects unread), an empty upper layer, and DST
    /// made as its mount point last.
    static func cloneOverlay(
        _ sourceRecord: OverlayGuest, to parent: Directory, as name: FileName, destinationPath: FilePath,
        store: Store, mount: Bool, report: inout CloneReport
    ) throws {
        guard let sourceState = try Overlay.recover(sourceRecord), sourceState.phase == .active,
            let canonicalParent = RootValidation.canonical(
                destinationPath.removingLastComponent().isEmpty ? "." : destinationPath.removingLastComponent())
        else {
            throw InputError("\(sourceRecord.rootPath): its overlay records are incomplete")
        }
        let canonicalDestination = canonicalParent.appending(name.description)
        guard let dataPath = RootValidation.canonical(store.path)?.appending("data") else {
            throw InputError("\(store.path): cannot resolve path")
        }
        let session = Overlay.Session(
            store: store, objects: try store.dataObjects(), dataPath: dataPath, guests: [])
        let record = try OverlayGuest.open(store: store, canonicalRoot: canonicalDestination, create: true)!
        try Overlay.recover(record)
        var state = OverlayGuest.State(phase: .converting, generation: 1, rootInode: 0)
        try record.writeState(state)
        let result = try Overlay.buildGeneration(
            1, of: record, from: sourceRecord, generation: sourceState.generation, session: session)
        report.filesShared = result.filesUnchanged + result.filesSharingObjects
        report.filesCopied = result.inlineFiles + result.objectsCreated
        report.bytesCopied = result.bytesCopied
        state.phase = .switching
        try record.writeState(state)
        // DST appears in one step, as the empty mount point; from here the clone is complete.
        let rootStat = try Directory.open(path: sourceRecord.rootPath).stat()
        try parent.makeDirectory(name, mode: rootStat.mode & 0o7777)
        try parent.changeOwner(of: name, uid: rootStat.uid, gid: rootStat.gid)
        state.phase = .active
        try record.writeState(state)
        if mount {
            try OverlayMount.mount(try record.generation(1), data: dataPath, on: try parent.openDirectory(name))
        }
    }

    /// The clone's LXC config: the source container's (`…/SRCNAME/config`)
    /// with the new name and rootfs, and without the source's MAC addresses.
    static func lxcConfig(
        name: String, source: FilePath, destination: FilePath, parent: FilePath,
        absolute: FilePath
    ) throws -> ([UInt8], FilePath) {
        guard source.lastComponent?.string == "rootfs" else {
            throw InputError("--lxc: the source \(source) is not an LXC rootfs (…/NAME/rootfs)")
        }
        let sourceConfig = source.removingLastComponent().appending("config")
        guard
            let text = try? Directory.open(path: sourceConfig.removingLastComponent()).openFileForReading(
                FileName("config")
            ).readAll()
        else {
            throw InputError("--lxc: no LXC config at \(sourceConfig)")
        }
        guard destination.lastComponent?.string == "rootfs", parent.lastComponent?.string == name else {
            throw InputError("--lxc \(name): the destination must be LXCPATH/\(name)/rootfs")
        }
        var out: [String] = []
        for raw in String(decoding: text, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false) {
            let line = raw.trimmingLeadingSpaces()
            let key = line.split(separator: "=", maxSplits: 1).first.map { String($0).trimmingTrailingSpaces() } ?? ""
            switch key {
            case "lxc.uts.name": out.append("lxc.uts.name = \(name)")
            case "lxc.rootfs.path": out.append("lxc.rootfs.path = dir:\(absolute.string)")
            default:
                if key.hasPrefix("lxc.net."), key.hasSuffix(".hwaddr") { continue }
                out.append(String(raw))
            }
        }
        return (Array(out.joined(separator: "\n").utf8), parent.appending("config"))
    }
}

extension Substring {
    fileprivate func trimmingLeadingSpaces() -> Substring { drop { $0 == " " || $0 == "\t" } }
}

extension String {
    fileprivate func trimmingTrailingSpaces() -> String {
        var s = self
        while let last = s.last, last == " " || last == "\t" { s.removeLast() }
        return s
    }
}
