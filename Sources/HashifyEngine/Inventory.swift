import HashifySystem

/// What the walk found: every directory, every regular file name and every
/// inode, in compact tables (names live in one byte arena, never as `String`).
public struct Inventory: Sendable {
    /// A walked directory. `parent` is -1 for a guest root.
    public struct DirectoryEntry: Sendable {
        public var parent: Int32
        public var guest: UInt16
        var nameStart: UInt32
        var nameLength: UInt16
        public var inode: UInt64
        public var modificationTime: Timestamp
    }

    /// One name of a regular file.
    public struct NameEntry: Sendable {
        public var directory: Int32
        var nameStart: UInt32
        var nameLength: UInt16
        public var inodeIndex: Int32
    }

    /// One regular-file inode, with all the names of it found in the roots.
    public struct InodeEntry: Sendable {
        public var stat: FileStat
        public var guest: UInt16
        /// Names found in the scanned roots (indices into `names`).
        public var names: [Int32]
        /// True when the inode is also an object in the store.
        public var storeObject: Int32 = -1
    }

    public var directories: [DirectoryEntry] = []
    public var names: [NameEntry] = []
    public var inodes: [InodeEntry] = []
    var arena: [UInt8] = []
    /// (device, inode) → index into `inodes`.
    var inodeIndex: [InodeKey: Int32] = [:]

    public init() {}

    mutating func storeName(_ p: UnsafePointer<CChar>, length: Int) -> (UInt32, UInt16) {
        let start = UInt32(arena.count)
        p.withMemoryRebound(to: UInt8.self, capacity: length) { arena.append(contentsOf: UnsafeBufferPointer(start: $0, count: length)) }
        return (start, UInt16(length))
    }

    mutating func addDirectory(parent: Int32, guest: UInt16, name: UnsafePointer<CChar>?, length: Int, stat: FileStat) -> Int32 {
        var start: UInt32 = 0, len: UInt16 = 0
        if let name { (start, len) = storeName(name, length: length) }
        directories.append(DirectoryEntry(parent: parent, guest: guest, nameStart: start, nameLength: len,
                                          inode: stat.inode, modificationTime: stat.modificationTime))
        return Int32(directories.count - 1)
    }

    mutating func addFile(directory: Int32, guest: UInt16, name: UnsafePointer<CChar>, length: Int, stat: FileStat) {
        let (start, len) = storeName(name, length: length)
        let key = InodeKey(device: stat.device, inode: stat.inode)
        let nameIndex = Int32(names.count)
        if let existing = inodeIndex[key] {
            names.append(NameEntry(directory: directory, nameStart: start, nameLength: len, inodeIndex: existing))
            inodes[Int(existing)].names.append(nameIndex)
        } else {
            let idx = Int32(inodes.count)
            inodeIndex[key] = idx
            inodes.append(InodeEntry(stat: stat, guest: guest, names: [nameIndex]))
            names.append(NameEntry(directory: directory, nameStart: start, nameLength: len, inodeIndex: idx))
        }
    }

    public func index(of key: InodeKey) -> Int32? { inodeIndex[key] }

    /// The file name of a name entry.
    public func fileName(_ n: Int32) -> FileName {
        let e = names[Int(n)]
        return FileName(Array(arena[Int(e.nameStart)..<Int(e.nameStart) + Int(e.nameLength)]))
    }

    public func directoryName(_ d: Int32) -> FileName {
        let e = directories[Int(d)]
        return FileName(Array(arena[Int(e.nameStart)..<Int(e.nameStart) + Int(e.nameLength)]))
    }

    /// The guest-absolute path of a directory ("/" for a root), as bytes.
    public func directoryPath(_ d: Int32) -> [UInt8] {
        var parts: [Int32] = []
        var cur = d
        while cur >= 0 && directories[Int(cur)].parent >= 0 {
            parts.append(cur)
            cur = directories[Int(cur)].parent
        }
        var path: [UInt8] = []
        for p in parts.reversed() {
            path.append(0x2f)
            let e = directories[Int(p)]
            path.append(contentsOf: arena[Int(e.nameStart)..<Int(e.nameStart) + Int(e.nameLength)])
        }
        return path.isEmpty ? [0x2f] : path
    }

    /// The guest-absolute path of a file name, as bytes.
    public func path(ofName n: Int32) -> [UInt8] {
        let e = names[Int(n)]
        var p = directoryPath(e.directory)
        if p != [0x2f] { p.append(0x2f) }
        p.append(contentsOf: arena[Int(e.nameStart)..<Int(e.nameStart) + Int(e.nameLength)])
        return p
    }

    public func guest(ofName n: Int32) -> UInt16 { directories[Int(names[Int(n)].directory)].guest }

    /// The chain of directories from the guest root down to d (root first).
    func chain(_ d: Int32) -> [Int32] {
        var c: [Int32] = []
        var cur = d
        while cur >= 0 { c.append(cur); cur = directories[Int(cur)].parent }
        return c.reversed()
    }
}

/// A (device, inode) pair: the identity of an inode on the host.
public struct InodeKey: Hashable, Sendable {
    public var device: UInt64
    public var inode: UInt64
    public init(device: UInt64, inode: UInt64) { self.device = device; self.inode = inode }
}
