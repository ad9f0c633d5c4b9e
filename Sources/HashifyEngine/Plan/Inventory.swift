import HashifySystem

/// What the walk found: every directory, every regular file name and every
/// inode, in flat tables of fixed-size records. Names live in one byte
/// arena (never as `String`), an inode's names form a chain through the name
/// table, and a small open-addressing table finds an inode by number. About
/// 130 bytes a file, whatever the file's size.
public struct Inventory: Sendable {
    /// A walked directory. `parent` is -1 for a guest root.
    public struct DirectoryEntry: Sendable {
        public var inode: UInt64
        public var modificationTime: Timestamp
        public var parent: Int32
        var nameStart: UInt32
        var nameLength: UInt16
        public var guest: UInt16
    }

    /// One name of a regular file.
    public struct NameEntry: Sendable {
        public var directory: Int32
        var nameStart: UInt32
        var nameLength: UInt16
        public var inodeIndex: Int32
        /// The next name of the same inode, or -1.
        var nextName: Int32
    }

    /// One regular-file inode: the attributes `statx` gave (the device is the
    /// inventory's) and its chain of names found in the roots. 64 bytes.
    public struct InodeEntry: Sendable {
        public var inode: UInt64
        public var size: UInt64
        private var mtimeSeconds: Int64
        /// ctime as nanoseconds since the epoch (the kernel stamps it from the
        /// host clock, well inside Int64's range).
        private var ctimeNanoseconds: Int64
        /// Allocated 512-byte blocks (saturating at 2 TiB).
        private var blocks: UInt32
        private var mtimeNanoseconds: UInt32
        public var uid: UInt32
        public var gid: UInt32
        public var linkCount: UInt32
        /// The most recently found name (the head of the chain).
        public var firstName: Int32
        public var nameCount: Int32
        private var mode16: UInt16
        /// True when the inode is also an object in the store.
        public var isStoreObject: Bool

        init(_ st: FileStat, name: Int32) {
            inode = st.inode
            size = st.size
            blocks = UInt32(clamping: st.blocks)
            mtimeSeconds = st.modificationTime.seconds
            mtimeNanoseconds = st.modificationTime.nanoseconds
            ctimeNanoseconds = st.changeTime.totalNanoseconds
            mode16 = UInt16(truncatingIfNeeded: st.mode)
            uid = st.uid
            gid = st.gid
            linkCount = st.linkCount
            firstName = name
            nameCount = 1
            isStoreObject = false
        }

        public var mode: UInt32 { UInt32(mode16) }
        public var modificationTime: Timestamp { Timestamp(seconds: mtimeSeconds, nanoseconds: mtimeNanoseconds) }
        public var changeTime: Timestamp { Timestamp(totalNanoseconds: ctimeNanoseconds) }
        /// Allocated bytes on disk.
        public var allocatedBytes: UInt64 { UInt64(blocks) &* 512 }

        /// True when `st` shows this inode in the state the walk saw: same
        /// inode, size, mtime, ctime (or `changeTime` when given: hashify's
        /// own links and renames move ctime), mode, owner and group.
        public func matches(_ st: FileStat, changeTime expected: Timestamp? = nil) -> Bool {
            st.inode == inode && st.size == size && st.modificationTime.seconds == mtimeSeconds
                && st.modificationTime.nanoseconds == mtimeNanoseconds
                && (expected.map { st.changeTime == $0 } ?? (st.changeTime.totalNanoseconds == ctimeNanoseconds))
                && st.mode == mode && st.uid == uid && st.gid == gid
        }
    }

    /// The device every root is on (roots must share one filesystem).
    public var device: UInt64 = 0
    public var directories: [DirectoryEntry] = []
    public var names: [NameEntry] = []
    public var inodes: [InodeEntry] = []
    var arena: [UInt8] = []
    /// Open addressing by inode number: slots hold inode indices, -1 is empty.
    private var slots: [Int32] = []

    public init() {}

    mutating func storeName(_ p: UnsafePointer<CChar>, length: Int) -> (UInt32, UInt16) {
        let start = UInt32(arena.count)
        p.withMemoryRebound(to: UInt8.self, capacity: length) {
            arena.append(contentsOf: UnsafeBufferPointer(start: $0, count: length))
        }
        return (start, UInt16(length))
    }

    mutating func addDirectory(parent: Int32, guest: UInt16, name: UnsafePointer<CChar>?, length: Int, stat: FileStat)
        -> Int32
    {
        var start: UInt32 = 0
        var len: UInt16 = 0
        if let name { (start, len) = storeName(name, length: length) }
        directories.append(
            DirectoryEntry(
                inode: stat.inode, modificationTime: stat.modificationTime, parent: parent,
                nameStart: start, nameLength: len, guest: guest))
        return Int32(directories.count - 1)
    }

    /// Adds a name in `directory`. Names come a directory at a time, in the
    /// order directories were added (`nameRange(ofDirectory:)` relies on it).
    mutating func addFile(directory: Int32, name: UnsafePointer<CChar>, length: Int, stat: FileStat) {
        precondition(names.last.map { $0.directory <= directory } ?? true, "names must be added a directory at a time")
        let (start, len) = storeName(name, length: length)
        let nameIndex = Int32(names.count)
        if let existing = index(ofInode: stat.inode) {
            let head = inodes[Int(existing)].firstName
            names.append(
                NameEntry(directory: directory, nameStart: start, nameLength: len, inodeIndex: existing, nextName: head)
            )
            inodes[Int(existing)].firstName = nameIndex
            inodes[Int(existing)].nameCount += 1
        } else {
            let idx = Int32(inodes.count)
            inodes.append(InodeEntry(stat, name: nameIndex))
            names.append(
                NameEntry(directory: directory, nameStart: start, nameLength: len, inodeIndex: idx, nextName: -1))
            insert(idx)
        }
    }

    // MARK: finding inodes

    private static func slot(_ inode: UInt64, _ mask: Int) -> Int {
        // Fibonacci hashing spreads consecutive inode numbers.
        Int(truncatingIfNeeded: (inode &* 0x9E37_79B9_7F4A_7C15) >> 32) & mask
    }

    private mutating func insert(_ idx: Int32) {
        if (inodes.count) * 2 > slots.count {
            var bigger = [Int32](repeating: -1, count: max(1024, slots.count * 2))
            let mask = bigger.count - 1
            for i in 0..<(inodes.count - 1) { Self.place(Int32(i), inode: inodes[i].inode, in: &bigger, mask: mask) }
            slots = bigger
        }
        Self.place(idx, inode: inodes[Int(idx)].inode, in: &slots, mask: slots.count - 1)
    }

    private static func place(_ idx: Int32, inode: UInt64, in table: inout [Int32], mask: Int) {
        var s = slot(inode, mask)
        while table[s] >= 0 { s = (s + 1) & mask }
        table[s] = idx
    }

    /// The index of the inode with this number (on the inventory's device).
    public func index(ofInode inode: UInt64) -> Int32? {
        if slots.isEmpty { return nil }
        let mask = slots.count - 1
        var s = Self.slot(inode, mask)
        while true {
            let i = slots[s]
            if i < 0 { return nil }
            if inodes[Int(i)].inode == inode { return i }
            s = (s + 1) & mask
        }
    }

    /// The index of the inode with this (device, inode) pair, if walked.
    public func index(of key: InodeKey) -> Int32? {
        key.device == device ? index(ofInode: key.inode) : nil
    }

    // MARK: names and paths

    /// The names of an inode found in the roots (most recently found first).
    public func names(of inodeIndex: Int32) -> NameChain {
        NameChain(names: names, cursor: inodes[Int(inodeIndex)].firstName)
    }

    /// The chain of an inode's names through the name table.
    public struct NameChain: Sequence, IteratorProtocol {
        let names: [NameEntry]
        var cursor: Int32
        public mutating func next() -> Int32? {
            if cursor < 0 { return nil }
            defer { cursor = names[Int(cursor)].nextName }
            return cursor
        }
    }

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

    /// The guest an inode belongs to (that of its first name).
    public func guest(ofInode i: Int32) -> UInt16 { guest(ofName: inodes[Int(i)].firstName) }

    /// The directories ordered so that the guests' directories of one
    /// guest-relative path come one after another (in guest order), the
    /// paths in the order the walk first met them. Linking in this order
    /// uses each store object for all guests within moments, while it is
    /// still open and leased. A path is known by its parent path's slot and
    /// a 64-bit hash of its name: a collision only changes the order, never
    /// what is done. About 8 bytes a directory while it runs.
    public func directoriesByRelativePath() -> [Int32] {
        var slotOf = [Int32](repeating: 0, count: directories.count)
        var slotCount: [Int32] = []
        var slots: [UInt64: Int32] = [:]
        arena.withUnsafeBufferPointer { a in
            for (d, e) in directories.enumerated() {
                // Every root is the path "/" (key 0); below it, FNV-1a over the name seeded with the parent's slot.
                var h: UInt64 = 0
                if e.parent >= 0 {
                    h = 0xcbf2_9ce4_8422_2325 ^ UInt64(slotOf[Int(e.parent)])
                    for i in Int(e.nameStart)..<Int(e.nameStart) + Int(e.nameLength) {
                        h = (h ^ UInt64(a[i])) &* 0x100_0000_01b3
                    }
                }
                if let s = slots[h] {
                    slotOf[d] = s
                    slotCount[Int(s)] += 1
                } else {
                    let s = Int32(slotCount.count)
                    slots[h] = s
                    slotOf[d] = s
                    slotCount.append(1)
                }
            }
        }
        slots = [:]
        // Counting sort by slot, stable (guest order within a slot); slotOf becomes the order.
        var next = [Int32](repeating: 0, count: slotCount.count)
        var sum: Int32 = 0
        for (s, c) in slotCount.enumerated() {
            next[s] = sum
            sum += c
        }
        slotCount = []
        var order = [Int32](repeating: 0, count: directories.count)
        for d in directories.indices {
            let s = Int(slotOf[d])
            order[Int(next[s])] = Int32(d)
            next[s] += 1
        }
        return order
    }

    /// The names of directory `d`: the walk lists one directory at a time,
    /// so the name table is ordered by directory and a directory's names
    /// are one range of it (found by binary search).
    public func nameRange(ofDirectory d: Int32) -> Range<Int32> {
        func lowerBound(_ target: Int32) -> Int32 {
            var lo = 0
            var hi = names.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if names[mid].directory < target { lo = mid + 1 } else { hi = mid }
            }
            return Int32(lo)
        }
        return lowerBound(d)..<lowerBound(d + 1)
    }

    /// The chain of directories from the guest root down to d (root first).
    func chain(_ d: Int32) -> [Int32] {
        var c: [Int32] = []
        var cur = d
        while cur >= 0 {
            c.append(cur)
            cur = directories[Int(cur)].parent
        }
        return c.reversed()
    }
}

/// A (device, inode) pair: the identity of an inode on the host.
public struct InodeKey: Hashable, Sendable {
    public var device: UInt64
    public var inode: UInt64
    public init(device: UInt64, inode: UInt64) {
        self.device = device
        self.inode = inode
    }
}
