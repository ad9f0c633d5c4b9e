import HashifySystem

/// How `ErofsTree(directory:placing:)` stores one regular file.
public enum ErofsFilePlacement: Hashable, Sendable {
    /// Its content goes into the image.
    case inline
    /// Only its size goes into the image (`ErofsFileContent.external`), with
    /// these xattrs added to its own (replacing any of the same name): the
    /// overlay's `trusted.overlay.metacopy` and `trusted.overlay.redirect`, say.
    case external(addingXattrs: [ExtendedAttribute])
}

extension ErofsTree {
    /// The description of the tree below `root`: every entry read relative
    /// to its directory's descriptor (`statx` without following, `readlinkat`,
    /// `flistxattr`/`llistxattr` and their gets), directories opened with
    /// `O_NOFOLLOW` and checked to be the inode that was stat'ed, entries in
    /// name order. Non-directories with one (device, inode) are one node: hard
    /// links stay links. `rule` decides for each regular file, given its
    /// path below `root` (no leading slash), attributes and an open
    /// descriptor, whether its content is inline or external. A directory on
    /// another mount is refused (`ErofsImageError.invalidTree`).
    public init(
        directory root: Directory,
        placing rule: (_ path: [UInt8], _ stat: FileStat, _ file: OpenFile) throws -> ErofsFilePlacement
    ) throws {
        let rootStat = try root.stat()
        self.init(root: try Self.node(.directory([]), rootStat, xattrs: try root.extendedAttributes()))
        var links: [[UInt64]: NodeID] = [:]
        var pending: [(Directory, NodeID, [UInt8])] = [(root, Self.rootID, [])]
        while let (directory, id, path) = pending.popLast() {
            for name in try directory.entryNames().sorted() {
                let st = try directory.stat(name)
                let childPath = path.isEmpty ? name.bytes : path + [UInt8(ascii: "/")] + name.bytes
                guard st.device == rootStat.device && (st.mountID == rootStat.mountID || st.mountID == 0) else {
                    throw ErofsImageError.invalidTree("\(escapedPath(childPath)) is on another mount")
                }
                if !st.isDirectory && st.linkCount > 1, let existing = links[[st.device, st.inode]] {
                    link(existing, as: name.bytes, in: id)
                    continue
                }
                let child: NodeID
                switch st.fileType {
                case 0o040000:
                    let sub = try directory.openDirectory(name)
                    let subStat = try sub.stat()
                    guard subStat.inode == st.inode && subStat.device == st.device else {
                        throw ErofsImageError.invalidTree("\(escapedPath(childPath)) changed while it was read")
                    }
                    child = add(
                        try Self.node(.directory([]), st, xattrs: try sub.extendedAttributes()), as: name.bytes, in: id)
                    pending.append((sub, child, childPath))
                case 0o100000:
                    child = add(
                        try Self.regularFile(name, in: directory, st, path: childPath, rule: rule), as: name.bytes,
                        in: id)
                default:
                    child = add(try Self.special(name, in: directory, st, path: childPath), as: name.bytes, in: id)
                }
                if !st.isDirectory && st.linkCount > 1 { links[[st.device, st.inode]] = child }
            }
        }
    }

    /// The node of a regular file: its content inline or external, as `rule` decides.
    private static func regularFile(
        _ name: FileName, in directory: Directory, _ st: FileStat, path: [UInt8],
        rule: (_ path: [UInt8], _ stat: FileStat, _ file: OpenFile) throws -> ErofsFilePlacement
    ) throws -> ErofsNode {
        let file = try directory.openFileForReading(name)
        let fileStat = try file.stat()
        guard fileStat.inode == st.inode && fileStat.device == st.device else {
            throw ErofsImageError.invalidTree("\(escapedPath(path)) changed while it was read")
        }
        var xattrs = try file.extendedAttributes()
        let content: ErofsFileContent
        switch try rule(path, fileStat, file) {
        case .inline:
            content = .inline(try file.readAll())
        case .external(let added):
            content = .external(size: fileStat.size)
            xattrs.removeAll { x in added.contains { $0.name == x.name } }
            xattrs += added
        }
        return try node(.file(content), fileStat, xattrs: xattrs)
    }

    /// The node of a symlink, device, FIFO or socket.
    private static func special(_ name: FileName, in directory: Directory, _ st: FileStat, path: [UInt8]) throws
        -> ErofsNode
    {
        let kind: ErofsNode.Kind
        switch st.fileType {
        case 0o120000: kind = .symlink(try directory.readLink(name))
        case 0o020000: kind = .characterDevice(rdev: st.deviceNumber)
        case 0o060000: kind = .blockDevice(rdev: st.deviceNumber)
        case 0o010000: kind = .fifo
        case 0o140000: kind = .socket
        default: throw ErofsImageError.invalidTree("\(escapedPath(path)) has an unknown file type")
        }
        return try node(kind, st, xattrs: try extendedAttributes(in: directory, of: name))
    }

    private static func node(_ kind: ErofsNode.Kind, _ st: FileStat, xattrs: [ExtendedAttribute]) throws -> ErofsNode {
        ErofsNode(
            kind, permissions: UInt16(st.mode & 0o7777), uid: st.uid, gid: st.gid,
            modificationTime: st.modificationTime, xattrs: xattrs)
    }
}
