import HashifySystem

/// A filesystem tree described in memory, the input of `ErofsWriter` and the
/// output of `ErofsReader`: nodes kept in one array, directories naming their
/// children by index, so that one node reached from several directory
/// entries is one inode (a hard link). Names, symlink targets and xattr
/// names are bytes, never decoded.
///
/// Node 0 is the root directory. Nodes that no entry reaches are ignored by
/// the writer.
public struct ErofsTree: Hashable, Sendable {
    /// The index of a node in `nodes`.
    public typealias NodeID = Int

    /// The root directory's index.
    public static let rootID: NodeID = 0

    /// Every node; `nodes[rootID]` is the root directory.
    public var nodes: [ErofsNode]

    /// A tree of only `root`, which must be a directory (its entries, if any, are kept:
    /// they must name nodes added afterwards).
    public init(root: ErofsNode) {
        precondition(root.isDirectory, "the root of an ErofsTree is a directory")
        nodes = [root]
    }

    /// A tree of these nodes (`nodes[0]` the root directory).
    public init(nodes: [ErofsNode]) {
        precondition(nodes.first?.isDirectory == true, "the root of an ErofsTree is a directory")
        self.nodes = nodes
    }

    public subscript(id: NodeID) -> ErofsNode {
        get { nodes[id] }
        set { nodes[id] = newValue }
    }

    /// Adds `node` as the entry `name` of the directory `parent`; returns its index.
    @discardableResult
    public mutating func add(_ node: ErofsNode, as name: [UInt8], in parent: NodeID) -> NodeID {
        let id = nodes.count
        nodes.append(node)
        link(id, as: name, in: parent)
        return id
    }

    /// Adds one more entry `name` in the directory `parent` for the existing node `id` (a hard link).
    public mutating func link(_ id: NodeID, as name: [UInt8], in parent: NodeID) {
        guard case .directory(var entries) = nodes[parent].kind else {
            preconditionFailure("ErofsTree.link: node \(parent) is not a directory")
        }
        entries.append(ErofsEntry(name: name, node: id))
        nodes[parent].kind = .directory(entries)
    }

    /// The entries of the directory `id` (empty for any other node).
    public func entries(of id: NodeID) -> [ErofsEntry] {
        if case .directory(let entries) = nodes[id].kind { return entries }
        return []
    }

    /// The node at a slash-separated path below the root ("" or "/" is the root), or nil.
    public func lookup(_ path: [UInt8]) -> NodeID? {
        var id = Self.rootID
        for component in path.split(separator: UInt8(ascii: "/")) {
            guard let entry = entries(of: id).first(where: { $0.name.elementsEqual(component) }) else { return nil }
            id = entry.node
        }
        return id
    }

    /// Calls `body` for every entry reachable from the root, depth first in
    /// entry order, with its path below the root (no leading slash); a hard
    /// link is visited once per name, a directory's entries after it.
    public func forEachPath(_ body: (_ path: [UInt8], _ id: NodeID) throws -> Void) rethrows {
        var stack: [([UInt8], NodeID)] = entries(of: Self.rootID).reversed().map { ($0.name, $0.node) }
        while let (path, id) = stack.popLast() {
            try body(path, id)
            for entry in entries(of: id).reversed() {
                stack.append((path + [UInt8(ascii: "/")] + entry.name, entry.node))
            }
        }
    }

    /// The same tree in the one form the reader gives back: directory entries
    /// sorted by name bytes, xattrs sorted by name, nodes numbered in the
    /// order a depth-first walk in name order first reaches them, unreachable
    /// nodes dropped. `ErofsReader.read(writer's image of t) == t.canonicalized()`.
    public func canonicalized() -> ErofsTree {
        var order: [NodeID: NodeID] = [:]
        var old: [NodeID] = []
        // Depth first without recursion: trees may be deep.
        order[Self.rootID] = 0
        old.append(Self.rootID)
        var pending: [[ErofsEntry]] = [sortedEntries(of: Self.rootID).reversed()]
        while !pending.isEmpty {
            guard let entry = pending[pending.count - 1].popLast() else {
                pending.removeLast()
                continue
            }
            if order[entry.node] != nil { continue }
            order[entry.node] = old.count
            old.append(entry.node)
            pending.append(sortedEntries(of: entry.node).reversed())
        }
        var result: [ErofsNode] = []
        result.reserveCapacity(old.count)
        for id in old {
            var node = nodes[id]
            if case .directory = node.kind {
                node.kind = .directory(sortedEntries(of: id).map { ErofsEntry(name: $0.name, node: order[$0.node]!) })
            }
            node.xattrs.sort { $0.name.lexicographicallyPrecedes($1.name) }
            result.append(node)
        }
        return ErofsTree(nodes: result)
    }

    func sortedEntries(of id: NodeID) -> [ErofsEntry] {
        entries(of: id).sorted { $0.name.lexicographicallyPrecedes($1.name) }
    }
}

/// One name in a directory and the node it names.
public struct ErofsEntry: Hashable, Sendable {
    /// One path component: 1 to 255 bytes, neither NUL nor '/', not "." or "..".
    public var name: [UInt8]
    public var node: ErofsTree.NodeID

    public init(name: [UInt8], node: ErofsTree.NodeID) {
        self.name = name
        self.node = node
    }
}

/// One inode of an `ErofsTree`: its kind and the attributes `stat` shows.
public struct ErofsNode: Hashable, Sendable {
    /// What the node is.
    public enum Kind: Hashable, Sendable {
        /// A directory and its entries ("." and ".." are implied, never listed).
        case directory([ErofsEntry])
        /// A regular file.
        case file(ErofsFileContent)
        /// A symbolic link and its target (1 to 4095 bytes, no NUL).
        case symlink([UInt8])
        /// A character device; `rdev` as `makedev(3)` makes it.
        case characterDevice(rdev: UInt64)
        /// A block device; `rdev` as `makedev(3)` makes it.
        case blockDevice(rdev: UInt64)
        case fifo
        case socket
    }

    public var kind: Kind
    /// The permission bits (`mode & 0o7777`: setuid, setgid, sticky, rwx).
    public var permissions: UInt16
    public var uid: UInt32
    public var gid: UInt32
    public var modificationTime: Timestamp
    /// Extended attributes by full name ("trusted.overlay.redirect"). Names
    /// must start with "user.", "trusted.", "security." or be
    /// "system.posix_acl_access" / "system.posix_acl_default"; values are at most 65,535 bytes.
    public var xattrs: [ExtendedAttribute]

    public init(
        _ kind: Kind, permissions: UInt16, uid: UInt32 = 0, gid: UInt32 = 0,
        modificationTime: Timestamp = Timestamp(seconds: 0, nanoseconds: 0), xattrs: [ExtendedAttribute] = []
    ) {
        self.kind = kind
        self.permissions = permissions
        self.uid = uid
        self.gid = gid
        self.modificationTime = modificationTime
        self.xattrs = xattrs
    }

    /// An empty directory.
    public static func directory(
        permissions: UInt16 = 0o755, uid: UInt32 = 0, gid: UInt32 = 0,
        modificationTime: Timestamp = Timestamp(seconds: 0, nanoseconds: 0), xattrs: [ExtendedAttribute] = []
    ) -> ErofsNode {
        ErofsNode(
            .directory([]), permissions: permissions, uid: uid, gid: gid, modificationTime: modificationTime,
            xattrs: xattrs)
    }

    public var isDirectory: Bool {
        if case .directory = kind { return true }
        return false
    }

    /// The file type bits of `st_mode` (`S_IFDIR`, `S_IFREG`, ...).
    public var fileTypeBits: UInt16 {
        switch kind {
        case .directory: return 0o040000
        case .file: return 0o100000
        case .symlink: return 0o120000
        case .characterDevice: return 0o020000
        case .blockDevice: return 0o060000
        case .fifo: return 0o010000
        case .socket: return 0o140000
        }
    }

    /// `st_mode`: the file type and permission bits.
    public var mode: UInt16 { fileTypeBits | (permissions & 0o7777) }

    /// `st_size` as the image gives it (a directory's depends on its layout: 0 here).
    public var size: UInt64 {
        switch kind {
        case .file(.inline(let bytes)): return UInt64(bytes.count)
        case .file(.external(let size)): return size
        case .symlink(let target): return UInt64(target.count)
        default: return 0
        }
    }
}

/// Where a regular file's content is.
public enum ErofsFileContent: Hashable, Sendable {
    /// Stored in the image.
    case inline([UInt8])
    /// Not in the image: a sparse file of this size whose every byte reads as
    /// zero, the way composefs writes a file whose content overlayfs takes
    /// from a data-only layer (`trusted.overlay.metacopy` + `trusted.overlay.redirect`).
    case external(size: UInt64)
}
