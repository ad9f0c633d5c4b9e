import HashifySystem

/// Something the writer cannot put in an image, or an image the reader cannot read.
public enum ErofsImageError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The description breaks a rule of the format (a name too long, a
    /// directory linked twice, an xattr name without a known prefix...).
    case invalidTree(String)
    /// The image is not a well-formed EROFS image.
    case corruptImage(String)
    /// The image uses a feature this reader does not implement (compression, ...).
    case unsupported(String)

    public var description: String {
        switch self {
        case .invalidTree(let s): return "cannot write this tree as EROFS: \(s)"
        case .corruptImage(let s): return "not a valid EROFS image: \(s)"
        case .unsupported(let s): return "EROFS image uses what this reader does not read: \(s)"
        }
    }
}

/// Writes an `ErofsTree` as an uncompressed EROFS image of 4 KiB blocks, the
/// way composefs builds its metadata images: written once, mounted read-only.
///
/// On-disk choices (see `Documentation/filesystems/erofs.rst`):
/// - Inodes are compact (32 bytes) where uid, gid and nlink fit 16 bits, the
///   size 32 bits and the mtime equals the superblock's epoch (the most common
///   mtime of the tree, so older kernels that take a compact inode's time from
///   the superblock agree); extended (64 bytes) otherwise.
/// - External files are chunk-based inodes with one chunk as large as the file
///   and a null block-map entry (4 bytes in the inode): a hole the kernel reads
///   as zeros, `st_size` the file's.
/// - A (name, value) xattr pair that several inodes carry is stored once in the
///   shared xattr area and named by a 4-byte id in each inode.
/// - Each inode with xattrs carries the name filter (`EROFS_FEATURE_COMPAT_XATTR_FILTER`,
///   Linux 6.6; older kernels ignore it): a lookup of an xattr it lacks stops at once.
/// - Small tails (directory entries, file content, symlink targets) are packed
///   after the inode (`EROFS_INODE_FLAT_INLINE`), never across a block boundary.
/// - The output depends on the tree and options only: the same tree gives the same bytes.
public enum ErofsWriter {
    /// Settings that are not part of the tree.
    public struct Options: Hashable, Sendable {
        /// The volume UUID (16 bytes; zero by default). Overlayfs records
        /// lower layers by it with `index=on`.
        public var uuid: [UInt8]
        /// The volume label (at most 16 bytes).
        public var volumeName: [UInt8]
        /// Whether to set the superblock checksum (crc32c, `EROFS_FEATURE_COMPAT_SB_CHKSUM`).
        public var checksum: Bool
        /// Largest tail (the bytes past the last whole block) of a regular
        /// file's content or a directory's entries packed after its inode; a
        /// larger one takes a block of its own. Half a block by default, as
        /// composefs does. A symlink's target is packed whenever it fits the
        /// inode's block (the kernel's fast symlinks), whatever this says.
        public var inlineTailLimit: Int

        public init(
            uuid: [UInt8] = [UInt8](repeating: 0, count: 16), volumeName: [UInt8] = [], checksum: Bool = true,
            inlineTailLimit: Int = 2048
        ) {
            self.uuid = uuid
            self.volumeName = volumeName
            self.checksum = checksum
            self.inlineTailLimit = inlineTailLimit
        }
    }

    /// What an image holds, for reports.
    public struct Summary: Hashable, Sendable {
        /// The image's size in bytes (whole blocks).
        public var imageBytes: UInt64
        public var inodes: Int
        /// Inodes written in the 32-byte form.
        public var compactInodes: Int
        /// Bytes before the data blocks: superblock, inodes with their
        /// xattrs and inline tails, shared xattrs.
        public var metadataBytes: Int
        /// Distinct xattrs stored once in the shared area.
        public var sharedXattrs: Int
        /// Blocks of directory entries, file content and long symlinks.
        public var dataBlocks: Int
    }

    /// Writes the image of `tree` to `file` from offset 0 with positioned
    /// writes (`pwrite`), a megabyte at a time; the file is not truncated.
    @discardableResult
    public static func write(_ tree: ErofsTree, to file: OpenFile, options: Options = Options()) throws -> Summary {
        var plan = try Plan(tree: tree, options: options)
        var output = Output { bytes, offset in try file.write(bytes, at: offset) }
        try plan.emit(to: &output)
        return plan.summary
    }

    /// The image of `tree`, in memory.
    public static func image(of tree: ErofsTree, options: Options = Options()) throws -> [UInt8] {
        var plan = try Plan(tree: tree, options: options)
        var result: [UInt8] = []
        var output = Output { bytes, _ in result.append(contentsOf: bytes) }
        try plan.emit(to: &output)
        return result
    }

    /// What the image of `tree` would hold, without writing it.
    public static func summary(of tree: ErofsTree, options: Options = Options()) throws -> Summary {
        try Plan(tree: tree, options: options).summary
    }
}

/// Sequential output, flushed in large positioned writes.
struct Output {
    private var buffer: [UInt8] = []
    private var flushed: UInt64 = 0
    private let sink: ([UInt8], UInt64) throws -> Void
    private let chunk = 1 << 20

    init(sink: @escaping ([UInt8], UInt64) throws -> Void) { self.sink = sink }

    var position: UInt64 { flushed + UInt64(buffer.count) }

    mutating func append(_ bytes: some Collection<UInt8>) throws {
        buffer.append(contentsOf: bytes)
        if buffer.count >= chunk { try flush() }
    }

    mutating func appendZeros(_ count: Int) throws {
        buffer.append(contentsOf: repeatElement(0, count: count))
        if buffer.count >= chunk { try flush() }
    }

    mutating func flush() throws {
        guard !buffer.isEmpty else { return }
        try sink(buffer, flushed)
        flushed += UInt64(buffer.count)
        buffer.removeAll(keepingCapacity: true)
    }
}

/// One xattr as stored: short prefix index, name suffix, value.
private struct StoredXattr: Hashable {
    var index: UInt8
    var suffix: [UInt8]
    var value: [UInt8]
    var entrySize: Int { Erofs.xattrEntrySize(suffixLength: suffix.count, valueLength: value.count) }
    /// The bit of the name filter this xattr's name sets.
    var filterBit: UInt32 { 1 << (XXH32.hash(suffix, seed: Erofs.xattrFilterSeed &+ UInt32(index)) & 31) }

    // The bytes hashed whole (an array of bytes hashes them one by one).
    func hash(into hasher: inout Hasher) {
        hasher.combine(index)
        hasher.combine(suffix.count)
        suffix.withUnsafeBytes { hasher.combine(bytes: $0) }
        value.withUnsafeBytes { hasher.combine(bytes: $0) }
    }
}

/// The layout of every inode, computed before a byte is written.
private struct Plan {
    struct Inode {
        var node: ErofsTree.NodeID
        var nlink: UInt32 = 0
        var compact = false
        var layout = Erofs.Layout.flatPlain
        var size: UInt64 = 0
        /// Indexes into `shared` and xattrs kept in the inode.
        var sharedXattrs: [Int] = []
        var ownXattrs: [StoredXattr] = []
        var xattrSize = 0
        /// Bytes after the inode and its xattrs: an inline tail or the chunk map.
        var tailSize = 0
        var dataBlocks = 0
        var firstBlock: UInt32 = Erofs.nullAddress
        var position = 0
        var chunkBits = 0
        var chunkCount = 0
        /// A directory's entries with "." and "..", sorted; the inode index each names.
        var entries: [(name: [UInt8], inode: Int)] = []
        /// The index in `entries` where each directory block starts.
        var blockStarts: [Int] = []

        var headerSize: Int { compact ? Erofs.compactInodeSize : Erofs.extendedInodeSize }
        var nid: UInt64 { UInt64(position / Erofs.slotSize) }
    }

    let tree: ErofsTree
    let options: ErofsWriter.Options
    var inodes: [Inode] = []
    var shared: [StoredXattr] = []
    var sharedOffsets: [Int] = []
    var sharedFilterBits: [UInt32] = []
    var epoch = Timestamp(seconds: 0, nanoseconds: 0)
    var inodesEnd = 0
    var sharedStart = 0
    var dataStart = 0
    var totalDataBlocks = 0
    var usesChunks = false

    var summary: ErofsWriter.Summary {
        ErofsWriter.Summary(
            imageBytes: UInt64(dataStart) + UInt64(totalDataBlocks) * UInt64(Erofs.blockSize),
            inodes: inodes.count, compactInodes: inodes.filter(\.compact).count, metadataBytes: dataStart,
            sharedXattrs: shared.count, dataBlocks: totalDataBlocks)
    }

    init(tree: ErofsTree, options: ErofsWriter.Options) throws {
        self.tree = tree
        self.options = options
        guard options.uuid.count == 16 else { throw ErofsImageError.invalidTree("the UUID is not 16 bytes") }
        guard options.volumeName.count <= 16 else {
            throw ErofsImageError.invalidTree("the volume name is over 16 bytes")
        }
        try numberInodes()
        try planXattrs()
        chooseEpoch()
        try planInodes()
        placeInodes()
        try placeData()
    }

    // MARK: inodes and directory entries

    /// Numbers the inodes breadth first from the root (a directory's children
    /// lie together), gives each directory its sorted entries and each inode its link count.
    mutating func numberInodes() throws {
        var inodeOf = [Int](repeating: -1, count: tree.nodes.count)
        inodeOf[ErofsTree.rootID] = 0
        inodes.append(Inode(node: ErofsTree.rootID))
        var next = 0
        while next < inodes.count {
            let current = next
            next += 1
            guard case .directory(let list) = tree.nodes[inodes[current].node].kind else { continue }
            let dot = Array(".".utf8)
            let dotdot = Array("..".utf8)
            var entries: [(name: [UInt8], inode: Int)] = [(dot, current), (dotdot, -2)]
            entries.reserveCapacity(list.count + 2)
            var subdirectories: UInt32 = 0
            // In name order: the image depends on the tree's shape, not on how it was built.
            for entry in inByteOrder(list, by: \.name) {
                try checkName(entry.name)
                guard tree.nodes.indices.contains(entry.node) else {
                    throw ErofsImageError.invalidTree("entry \(escapedPath(entry.name)) names no node (\(entry.node))")
                }
                let child = tree.nodes[entry.node]
                var index = inodeOf[entry.node]
                if child.isDirectory {
                    guard index < 0 && entry.node != ErofsTree.rootID else {
                        throw ErofsImageError.invalidTree(
                            "directory node \(entry.node) has more than one name (\(escapedPath(entry.name)))")
                    }
                    subdirectories += 1
                }
                if index < 0 {
                    index = inodes.count
                    inodeOf[entry.node] = index
                    inodes.append(Inode(node: entry.node))
                    parents.append(child.isDirectory ? current : -1)
                }
                inodes[index].nlink += 1
                entries.append((entry.name, index))
            }
            entries[1].inode = parents[current] < 0 ? current : parents[current]
            entries.sort { bytesPrecede($0.name, $1.name) }
            for i in 1..<entries.count where entries[i].name == entries[i - 1].name {
                throw ErofsImageError.invalidTree("two entries named \(escapedPath(entries[i].name)) in one directory")
            }
            inodes[current].entries = entries
            inodes[current].nlink = 2 + subdirectories
        }
    }

    /// Each inode's parent directory when it is a directory (-1 for the root and non-directories).
    private var parents: [Int] = [-1]

    func checkName(_ name: [UInt8]) throws {
        guard !name.isEmpty, name.count <= Erofs.maxNameLength, !name.contains(0), !name.contains(0x2f),
            name != Array(".".utf8), name != Array("..".utf8)
        else {
            throw ErofsImageError.invalidTree("the entry name \(escapedPath(name)) is not a valid file name")
        }
    }

    // MARK: xattrs

    /// Splits every xattr name into its prefix index and suffix, and stores
    /// once, in the shared area, each pair that more than one inode carries
    /// (where a 4-byte id is smaller than the entry).
    mutating func planXattrs() throws {
        var stored: [[StoredXattr]] = []
        var uses: [StoredXattr: Int] = [:]
        stored.reserveCapacity(inodes.count)
        uses.reserveCapacity(inodes.count)
        for n in inodes.indices {
            let attrs = inByteOrder(tree.nodes[inodes[n].node].xattrs, by: \.name)
            var list: [StoredXattr] = []
            list.reserveCapacity(attrs.count)
            for (i, a) in attrs.enumerated() {
                if i > 0 && attrs[i - 1].name == a.name {
                    throw ErofsImageError.invalidTree("two xattrs named \(escapedPath(a.name)) on one node")
                }
                guard let (index, suffix) = Erofs.splitXattrName(a.name) else {
                    throw ErofsImageError.invalidTree("the xattr name \(escapedPath(a.name)) has no EROFS prefix")
                }
                guard suffix.count <= 255, a.value.count <= 0xFFFF else {
                    throw ErofsImageError.invalidTree("the xattr \(escapedPath(a.name)) is too long")
                }
                let x = StoredXattr(index: index, suffix: Array(suffix), value: a.value)
                list.append(x)
                uses[x, default: 0] += 1
            }
            stored.append(list)
        }
        shared = uses.filter { $0.value > 1 && $0.key.entrySize > 4 }.map(\.key).sorted { a, b in
            if a.index != b.index { return a.index < b.index }
            if a.suffix != b.suffix { return a.suffix.lexicographicallyPrecedes(b.suffix) }
            return a.value.lexicographicallyPrecedes(b.value)
        }
        var sharedIndex: [StoredXattr: Int] = [:]
        var offset = 0
        for (i, x) in shared.enumerated() {
            sharedIndex[x] = i
            sharedFilterBits.append(x.filterBit)
            sharedOffsets.append(offset)
            offset += x.entrySize
        }
        for i in inodes.indices {
            for x in stored[i] {
                if let s = sharedIndex[x], inodes[i].sharedXattrs.count < 255 {
                    inodes[i].sharedXattrs.append(s)
                } else {
                    inodes[i].ownXattrs.append(x)
                }
            }
            let own = inodes[i].ownXattrs.reduce(0) { $0 + $1.entrySize }
            if !inodes[i].sharedXattrs.isEmpty || own > 0 {
                inodes[i].xattrSize = Erofs.xattrBodyHeaderSize + 4 * inodes[i].sharedXattrs.count + own
                guard (inodes[i].xattrSize - Erofs.xattrBodyHeaderSize) / 4 + 1 <= 0xFFFF else {
                    throw ErofsImageError.invalidTree("node \(inodes[i].node) has too many xattrs")
                }
            }
        }
    }

    // MARK: inode forms and sizes

    /// The epoch: the mtime most inodes have (the earliest of equals), which
    /// their compact inodes then carry.
    mutating func chooseEpoch() {
        var counts: [Timestamp: Int] = [:]
        for i in inodes.indices { counts[tree.nodes[inodes[i].node].modificationTime, default: 0] += 1 }
        epoch = counts.max { a, b in a.value != b.value ? a.value < b.value : a.key > b.key }?.key ?? epoch
    }

    mutating func planInodes() throws {
        for i in inodes.indices {
            let node = tree.nodes[inodes[i].node]
            switch node.kind {
            case .directory:
                planDirectory(i)
            case .file(.inline(let bytes)):
                planData(i, size: bytes.count)
            case .file(.external(let size)):
                inodes[i].layout = .chunkBased
                inodes[i].size = size
                usesChunks = true
                if size > 0 {
                    // One chunk as large as the file where it can (up to 2^43 bytes).
                    var bits = 12
                    while bits < 12 + 31 && (UInt64(1) << UInt64(bits)) < size { bits += 1 }
                    inodes[i].chunkBits = bits
                    inodes[i].chunkCount = Int((size - 1) >> UInt64(bits)) + 1
                    inodes[i].tailSize = 4 * inodes[i].chunkCount
                }
            case .symlink(let target):
                guard !target.isEmpty, target.count < 4096, !target.contains(0) else {
                    throw ErofsImageError.invalidTree(
                        "node \(inodes[i].node): a symlink target is 1 to 4095 bytes, no NUL")
                }
                inodes[i].size = UInt64(target.count)
                inodes[i].layout = .flatInline
                inodes[i].tailSize = target.count
            case .characterDevice(let rdev), .blockDevice(let rdev):
                guard Erofs.encodeDevice(rdev) != nil else {
                    throw ErofsImageError.invalidTree(
                        "node \(inodes[i].node): device number \(rdev) does not fit 32 bits")
                }
            case .fifo, .socket:
                break
            }
            guard node.permissions & ~0o7777 == 0 else {
                throw ErofsImageError.invalidTree("node \(inodes[i].node): permissions \(node.permissions) over 0o7777")
            }
            inodes[i].compact =
                node.uid <= 0xFFFF && node.gid <= 0xFFFF && inodes[i].nlink <= 0xFFFF
                && inodes[i].size + UInt64(Erofs.blockSize) <= UInt64(UInt32.max) && node.modificationTime == epoch
            if case .symlink = node.kind,
                inodes[i].headerSize + inodes[i].xattrSize + inodes[i].tailSize > Erofs.blockSize
            {
                inodes[i].layout = .flatPlain
                inodes[i].tailSize = 0
                inodes[i].dataBlocks = 1
            }
        }
    }

    /// Cuts a directory's sorted entries into blocks: as many whole dirents
    /// and names as fit 4 KiB; the last block packed after the inode when small.
    mutating func planDirectory(_ i: Int) {
        var starts = [0]
        var used = 0
        for (k, e) in inodes[i].entries.enumerated() {
            let length = Erofs.direntSize + e.name.count
            if used + length > Erofs.blockSize {
                starts.append(k)
                used = 0
            }
            used += length
        }
        inodes[i].blockStarts = starts
        if used <= options.inlineTailLimit {
            inodes[i].dataBlocks = starts.count - 1
            inodes[i].tailSize = used
            inodes[i].layout = .flatInline
        } else {
            inodes[i].dataBlocks = starts.count
            inodes[i].layout = .flatPlain
        }
        inodes[i].size = UInt64(inodes[i].dataBlocks * Erofs.blockSize + inodes[i].tailSize)
    }

    /// Whole blocks of content in the data area, a small tail after the inode.
    mutating func planData(_ i: Int, size: Int) {
        inodes[i].size = UInt64(size)
        let tail = size % Erofs.blockSize
        inodes[i].dataBlocks = size / Erofs.blockSize
        if tail > 0 && tail <= options.inlineTailLimit {
            inodes[i].layout = .flatInline
            inodes[i].tailSize = tail
        } else if tail > 0 {
            inodes[i].dataBlocks += 1
        }
    }

    /// Turns an inline tail that cannot be placed into one more data block.
    mutating func unpackTail(_ i: Int) {
        inodes[i].dataBlocks += 1
        inodes[i].tailSize = 0
        inodes[i].layout = .flatPlain
        if inodes[i].entries.count > 0 {
            inodes[i].size = UInt64(inodes[i].dataBlocks * Erofs.blockSize)
        }
    }

    // MARK: placement

    /// Places inodes one after another on 32-byte slots from the end of the
    /// superblock; an inline tail never crosses a block boundary (a symlink's
    /// inode, xattrs and target share one block, as the kernel's fast symlink needs).
    mutating func placeInodes() {
        var pos = Erofs.superblockOffset + Erofs.superblockSize
        let block = Erofs.blockSize
        for i in inodes.indices {
            pos = roundUp(pos, Erofs.slotSize)
            let nonTail = inodes[i].headerSize + inodes[i].xattrSize
            let tail = inodes[i].tailSize
            if tail > 0 && inodes[i].layout == .flatInline {
                if case .symlink = tree.nodes[inodes[i].node].kind {
                    if pos % block + nonTail + tail > block { pos = roundUp(pos, block) }
                } else if (pos + nonTail) % block + tail > block {
                    let nextBlock = roundUp(pos + nonTail, block)
                    let moved = roundUp(max(pos, nextBlock - nonTail), Erofs.slotSize)
                    if (moved + nonTail) / block == nextBlock / block && (moved + nonTail) % block + tail <= block {
                        pos = moved
                    } else {
                        unpackTail(i)
                    }
                }
            }
            inodes[i].position = pos
            pos += nonTail + inodes[i].tailSize
        }
        inodesEnd = roundUp(pos, 4)
    }

    /// The shared xattrs follow the inodes; whole data blocks follow them.
    mutating func placeData() throws {
        sharedStart = inodesEnd
        let sharedEnd = sharedStart + (shared.last.map { sharedOffsets[sharedOffsets.count - 1] + $0.entrySize } ?? 0)
        dataStart = roundUp(sharedEnd, Erofs.blockSize)
        var block = dataStart / Erofs.blockSize
        for i in inodes.indices where inodes[i].dataBlocks > 0 {
            inodes[i].firstBlock = UInt32(truncatingIfNeeded: block)
            block += inodes[i].dataBlocks
        }
        totalDataBlocks = block - dataStart / Erofs.blockSize
        guard block < Int(UInt32.max) else { throw ErofsImageError.invalidTree("the image would exceed 2^32 blocks") }
        guard inodes[0].nid <= 0xFFFF else { throw ErofsImageError.invalidTree("the root inode is placed too far") }
    }

    // MARK: writing

    mutating func emit(to output: inout Output) throws {
        var meta = [UInt8](repeating: 0, count: dataStart)
        for i in inodes.indices { writeInode(i, into: &meta) }
        let xattrBlock = sharedStart / Erofs.blockSize
        for (k, x) in shared.enumerated() { writeXattr(x, into: &meta, at: sharedStart + sharedOffsets[k]) }
        writeSuperblock(into: &meta, xattrBlock: xattrBlock)
        try output.append(meta)
        meta = []
        for i in inodes.indices where inodes[i].dataBlocks > 0 {
            precondition(output.position == UInt64(inodes[i].firstBlock) * UInt64(Erofs.blockSize))
            try writeData(i, to: &output)
        }
        try output.flush()
    }

    func writeSuperblock(into meta: inout [UInt8], xattrBlock: Int) {
        let o = Erofs.superblockOffset
        meta.put32(Erofs.magic, at: o)
        var compat = Erofs.compatMtime | Erofs.compatXattrFilter
        if options.checksum { compat |= Erofs.compatSuperblockChecksum }
        meta.put32(compat, at: o + 8)
        meta[o + 12] = Erofs.blockSizeBits
        meta.put16(UInt16(inodes[0].nid), at: o + 14)
        meta.put64(UInt64(inodes.count), at: o + 16)
        meta.put64(UInt64(bitPattern: epoch.seconds), at: o + 24)
        meta.put32(epoch.nanoseconds, at: o + 32)
        meta.put32(UInt32(dataStart / Erofs.blockSize + totalDataBlocks), at: o + 36)
        meta.put32(0, at: o + 40)  // meta_blkaddr: nids count from the image's start
        meta.put32(UInt32(xattrBlock), at: o + 44)
        meta.put(options.uuid, at: o + 48)
        meta.put(options.volumeName, at: o + 64)
        meta.put32(usesChunks ? Erofs.incompatChunkedFile : 0, at: o + 80)
        if options.checksum {
            let crc = CRC32C.update(~0, meta[o..<Erofs.blockSize])
            meta.put32(crc, at: o + 4)
        }
    }

    func writeXattr(_ x: StoredXattr, into meta: inout [UInt8], at offset: Int) {
        meta[offset] = UInt8(x.suffix.count)
        meta[offset + 1] = x.index
        meta.put16(UInt16(x.value.count), at: offset + 2)
        meta.put(x.suffix, at: offset + 4)
        meta.put(x.value, at: offset + 4 + x.suffix.count)
    }

    /// Writes an inode's xattr body (filter, shared references, its own
    /// entries) at `start`; returns where its inline data goes.
    func writeXattrBody(of inode: Inode, into meta: inout [UInt8], at start: Int) -> Int {
        guard inode.xattrSize > 0 else { return start }
        var x = start
        var present: UInt32 = 0
        for s in inode.sharedXattrs { present |= sharedFilterBits[s] }
        for own in inode.ownXattrs { present |= own.filterBit }
        meta.put32(~present, at: x)
        meta[x + 4] = UInt8(inode.sharedXattrs.count)
        x += Erofs.xattrBodyHeaderSize
        for s in inode.sharedXattrs {
            meta.put32(UInt32((sharedStart % Erofs.blockSize + sharedOffsets[s]) / 4), at: x)
            x += 4
        }
        for own in inode.ownXattrs {
            writeXattr(own, into: &meta, at: x)
            x += own.entrySize
        }
        return x
    }

    func writeInode(_ i: Int, into meta: inout [UInt8]) {
        let inode = inodes[i]
        let node = tree.nodes[inode.node]
        let p = inode.position
        let icount = inode.xattrSize == 0 ? 0 : (inode.xattrSize - Erofs.xattrBodyHeaderSize) / 4 + 1
        var iu: UInt32 = inode.firstBlock
        switch node.kind {
        case .characterDevice(let rdev), .blockDevice(let rdev): iu = Erofs.encodeDevice(rdev)!
        case .fifo, .socket: iu = 0
        case .file(.external): iu = UInt32(inode.chunkBits > 0 ? inode.chunkBits - 12 : 0)
        default: break
        }
        meta.put16(inode.layout.rawValue << 1 | (inode.compact ? 0 : Erofs.formatExtendedBit), at: p)
        meta.put16(UInt16(icount), at: p + 2)
        meta.put16(node.mode, at: p + 4)
        if inode.compact {
            meta.put16(UInt16(inode.nlink), at: p + 6)
            meta.put32(UInt32(inode.size), at: p + 8)
            meta.put32(0, at: p + 12)  // mtime - epoch
            meta.put32(iu, at: p + 16)
            meta.put32(UInt32(i + 1), at: p + 20)
            meta.put16(UInt16(node.uid), at: p + 24)
            meta.put16(UInt16(node.gid), at: p + 26)
        } else {
            meta.put64(inode.size, at: p + 8)
            meta.put32(iu, at: p + 16)
            meta.put32(UInt32(i + 1), at: p + 20)
            meta.put32(node.uid, at: p + 24)
            meta.put32(node.gid, at: p + 28)
            meta.put64(UInt64(bitPattern: node.modificationTime.seconds), at: p + 32)
            meta.put32(node.modificationTime.nanoseconds, at: p + 40)
            meta.put32(inode.nlink, at: p + 44)
        }
        let x = writeXattrBody(of: inode, into: &meta, at: p + inode.headerSize)
        guard inode.tailSize > 0 else { return }
        switch node.kind {
        case .directory:
            if inode.layout == .flatInline {
                let tail = directoryBlock(i, inode.blockStarts.count - 1, tail: true)
                meta.put(tail, at: x)
            }
        case .file(.inline(let bytes)):
            if inode.layout == .flatInline { meta.put(bytes[(bytes.count - inode.tailSize)...], at: x) }
        case .file(.external):
            for c in 0..<inode.chunkCount { meta.put32(Erofs.nullAddress, at: x + 4 * c) }
        case .symlink(let target):
            if inode.layout == .flatInline { meta.put(target, at: x) }
        default:
            break
        }
    }

    /// One directory block: the dirents, then the names they point at; a full
    /// block is zero-padded to 4 KiB, a tail is as long as its content.
    func directoryBlock(_ i: Int, _ b: Int, tail: Bool) -> [UInt8] {
        let inode = inodes[i]
        let start = inode.blockStarts[b]
        let end = b + 1 < inode.blockStarts.count ? inode.blockStarts[b + 1] : inode.entries.count
        let entries = inode.entries[start..<end]
        var used = entries.count * Erofs.direntSize
        for e in entries { used += e.name.count }
        var block = [UInt8](repeating: 0, count: tail ? used : Erofs.blockSize)
        var nameOffset = entries.count * Erofs.direntSize
        for (k, e) in entries.enumerated() {
            let d = k * Erofs.direntSize
            block.put64(inodes[e.inode].nid, at: d)
            block.put16(UInt16(nameOffset), at: d + 8)
            block[d + 10] = Erofs.direntType(tree.nodes[inodes[e.inode].node].kind)
            block.put(e.name, at: nameOffset)
            nameOffset += e.name.count
        }
        return block
    }

    func writeData(_ i: Int, to output: inout Output) throws {
        let inode = inodes[i]
        switch tree.nodes[inode.node].kind {
        case .directory:
            for b in 0..<inode.dataBlocks { try output.append(directoryBlock(i, b, tail: false)) }
        case .file(.inline(let bytes)):
            let stored = min(bytes.count, inode.dataBlocks * Erofs.blockSize)
            try output.append(bytes[0..<stored])
            try output.appendZeros(inode.dataBlocks * Erofs.blockSize - stored)
        case .symlink(let target):
            try output.append(target)
            try output.appendZeros(Erofs.blockSize - target.count)
        default:
            break
        }
    }
}
