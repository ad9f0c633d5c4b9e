import HashifySystem

/// Reads an uncompressed EROFS image back into an `ErofsTree` without
/// mounting it: positioned reads (`pread`) on an open file. It reads what
/// `ErofsWriter` writes and the plain images `mkfs.erofs` makes without
/// compression (flat, tail-packed and chunk-based inodes, shared xattrs).
///
/// A regular file whose every chunk is a hole comes back as
/// `.external(size:)`; any other regular file as `.inline` with its content.
public final class ErofsReader {
    /// Where the image's bytes are: read from a file block by block, or the whole image in memory.
    private enum Source {
        case file(OpenFile)
        case memory([UInt8])
    }
    private let source: Source
    /// The image's block size in bytes.
    public let blockSize: Int
    /// The root directory's nid (its inode's 32-byte slot number).
    public let rootNid: UInt64
    /// The inode count the superblock gives.
    public let inodeCount: UInt64
    public let uuid: [UInt8]
    public let volumeName: [UInt8]
    /// The time of every compact inode.
    public let epoch: Timestamp
    private let metaBase: UInt64
    private let xattrBase: UInt64
    private let imageBytes: UInt64
    private var cache: [UInt64: [UInt8]] = [:]

    /// Reads and checks the superblock of the image in `file`.
    public convenience init(file: OpenFile) throws {
        try self.init(.file(file))
    }

    /// Checks the superblock of the image `bytes` (the whole image, in memory).
    public convenience init(image bytes: [UInt8]) throws {
        try self.init(.memory(bytes))
    }

    private init(_ source: Source) throws {
        self.source = source
        var probe = [UInt8](repeating: 0, count: Erofs.superblockSize)
        let got: Int
        switch source {
        case .file(let file):
            imageBytes = try file.stat().size
            got = try probe.withUnsafeMutableBytes { try file.read(into: $0, at: UInt64(Erofs.superblockOffset)) }
        case .memory(let whole):
            imageBytes = UInt64(whole.count)
            got = min(Erofs.superblockSize, max(0, whole.count - Erofs.superblockOffset))
            if got > 0 {
                probe.replaceSubrange(0..<got, with: whole[Erofs.superblockOffset..<(Erofs.superblockOffset + got)])
            }
        }
        guard got == Erofs.superblockSize, probe.le32(0) == Erofs.magic else {
            throw ErofsImageError.corruptImage("no EROFS superblock at offset 1024")
        }
        let bits = Int(probe[12])
        guard (9...16).contains(bits) else { throw ErofsImageError.unsupported("block size 2^\(bits)") }
        blockSize = 1 << bits
        let incompat = probe.le32(80)
        guard incompat & ~Erofs.incompatUnderstood == 0 else {
            throw ErofsImageError.unsupported(
                "incompatible features 0x\(String(incompat & ~Erofs.incompatUnderstood, radix: 16))")
        }
        rootNid = UInt64(probe.le16(14))
        inodeCount = probe.le64(16)
        epoch = Timestamp(seconds: Int64(bitPattern: probe.le64(24)), nanoseconds: probe.le32(32))
        metaBase = UInt64(probe.le32(40)) * UInt64(blockSize)
        xattrBase = UInt64(probe.le32(44)) * UInt64(blockSize)
        uuid = Array(probe[48..<64])
        volumeName = Array(probe[64..<80].prefix { $0 != 0 })
        guard probe[13] == 0 else { throw ErofsImageError.unsupported("superblock extension slots") }
        if probe.le32(8) & Erofs.compatSuperblockChecksum != 0 {
            guard blockSize > Erofs.superblockOffset else {
                throw ErofsImageError.corruptImage("checksum on a tiny block")
            }
            var block = try bytes(at: UInt64(Erofs.superblockOffset), count: blockSize - Erofs.superblockOffset)
            let expected = block.le32(4)
            block.put32(0, at: 4)
            guard CRC32C.update(~0, block) == expected else {
                throw ErofsImageError.corruptImage("the superblock checksum does not match")
            }
        }
    }

    /// The tree of the image in `file`.
    public static func read(from file: OpenFile) throws -> ErofsTree {
        try ErofsReader(file: file).readTree()
    }

    /// The tree of the image `bytes` (the whole image, in memory).
    public static func read(image bytes: [UInt8]) throws -> ErofsTree {
        try ErofsReader(image: bytes).readTree()
    }

    /// The node at a slash-separated path below the root ("" is the root),
    /// reading only the inodes on the way (a directory's entries are not
    /// filled in); nil when the path names nothing. Directories read are
    /// kept for the next lookups.
    public func node(atPath path: [UInt8]) throws -> ErofsNode? {
        var nid = rootNid
        for part in path.split(separator: UInt8(ascii: "/")) {
            let entries: [(name: [UInt8], nid: UInt64)]
            if let known = directories[nid] {
                entries = known
            } else {
                let inode = try readInode(nid)
                guard inode.node.isDirectory else { return nil }
                entries = inode.entries
                directories[nid] = entries
            }
            guard let e = entries.first(where: { $0.name.elementsEqual(part) }) else { return nil }
            nid = e.nid
        }
        return try readInode(nid).node
    }

    /// Directories `node(atPath:)` has read, by nid.
    private var directories: [UInt64: [(name: [UInt8], nid: UInt64)]] = [:]

    /// The whole tree, in `ErofsTree.canonicalized()` form: nodes numbered
    /// as a depth-first walk in name order first reaches them, read in that order.
    public func readTree() throws -> ErofsTree {
        var nodeOf: [UInt64: ErofsTree.NodeID] = [rootNid: 0]
        let root = try readInode(rootNid)
        guard root.node.isDirectory else { throw ErofsImageError.corruptImage("the root is not a directory") }
        var nodes: [ErofsNode] = [root.node]
        // The directories being read, innermost last: each one's entries still to number (next last), and those numbered.
        var open: [(directory: ErofsTree.NodeID, rest: [(name: [UInt8], nid: UInt64)], entries: [ErofsEntry])] = [
            (0, inByteOrder(root.entries, by: \.name).reversed(), [])
        ]
        while let top = open.indices.last {
            guard let (name, nid) = open[top].rest.popLast() else {
                let done = open.removeLast()
                nodes[done.directory].kind = .directory(done.entries)
                continue
            }
            if let existing = nodeOf[nid] {
                guard !nodes[existing].isDirectory else {
                    throw ErofsImageError.corruptImage("directory nid \(nid) is named twice")
                }
                open[top].entries.append(ErofsEntry(name: name, node: existing))
                continue
            }
            let inode = try readInode(nid)
            let id = nodes.count
            nodeOf[nid] = id
            nodes.append(inode.node)
            open[top].entries.append(ErofsEntry(name: name, node: id))
            if inode.node.isDirectory {
                open.append((id, inByteOrder(inode.entries, by: \.name).reversed(), []))
            }
        }
        return ErofsTree(nodes: nodes)
    }

    // MARK: bytes

    /// `count` bytes at `offset`: from the image in memory, or through a cache of whole blocks of the file.
    private func bytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard count > 0 else { return [] }
        guard offset.addingReportingOverflow(UInt64(count)).overflow == false,
            offset + UInt64(count) <= imageBytes
        else {
            throw ErofsImageError.corruptImage("a read of \(count) bytes at \(offset) passes the end of the image")
        }
        let file: OpenFile
        switch source {
        case .memory(let whole): return Array(whole[Int(offset)..<Int(offset) + count])
        case .file(let f): file = f
        }
        var out: [UInt8] = []
        out.reserveCapacity(count)
        var at = offset
        let end = offset + UInt64(count)
        let bs = UInt64(blockSize)
        while at < end {
            let blockNumber = at / bs
            let block = try cachedBlock(blockNumber, of: file)
            let from = Int(at - blockNumber * bs)
            let to = Int(min(end - blockNumber * bs, UInt64(block.count)))
            guard to > from else { throw ErofsImageError.corruptImage("a short read at \(at)") }
            out.append(contentsOf: block[from..<to])
            at += UInt64(to - from)
        }
        return out
    }

    private func cachedBlock(_ number: UInt64, of file: OpenFile) throws -> [UInt8] {
        if let b = cache[number] { return b }
        var block = [UInt8](repeating: 0, count: blockSize)
        var done = 0
        while done < blockSize {
            let n = try block.withUnsafeMutableBytes {
                try file.read(
                    into: UnsafeMutableRawBufferPointer(rebasing: $0[done...]),
                    at: number * UInt64(blockSize) + UInt64(done))
            }
            if n == 0 { break }
            done += n
        }
        block.removeLast(blockSize - done)
        if cache.count >= 4096 { cache.removeAll(keepingCapacity: true) }
        cache[number] = block
        return block
    }

    // MARK: inodes

    private struct Inode {
        var node: ErofsNode
        var entries: [(name: [UInt8], nid: UInt64)] = []
    }

    private func readInode(_ nid: UInt64) throws -> Inode {
        let (position, overflow) = metaBase.addingReportingOverflow(
            nid.multipliedReportingOverflow(by: 32).partialValue)
        guard !overflow, nid < (UInt64(1) << 58) else { throw ErofsImageError.corruptImage("nid \(nid) out of range") }
        let head = try bytes(at: position, count: Erofs.compactInodeSize)
        let format = head.le16(0)
        let extended = format & Erofs.formatExtendedBit != 0
        guard let layout = Erofs.Layout(rawValue: (format >> 1) & 7) else {
            throw ErofsImageError.corruptImage("nid \(nid): unknown data layout \((format >> 1) & 7)")
        }
        guard layout != .compressedFull && layout != .compressedCompact else {
            throw ErofsImageError.unsupported("compressed inode (nid \(nid))")
        }
        let h = extended ? try bytes(at: position, count: Erofs.extendedInodeSize) : head
        let icount = Int(h.le16(2))
        let mode = h.le16(4)
        let size: UInt64
        let u: UInt32
        let uid: UInt32
        let gid: UInt32
        let mtime: Timestamp
        if extended {
            size = h.le64(8)
            u = h.le32(16)
            uid = h.le32(24)
            gid = h.le32(28)
            mtime = Timestamp(seconds: Int64(bitPattern: h.le64(32)), nanoseconds: h.le32(40))
        } else {
            size = UInt64(h.le32(8))
            u = h.le32(16)
            uid = UInt32(h.le16(24))
            gid = UInt32(h.le16(26))
            mtime = Timestamp(seconds: epoch.seconds &+ Int64(h.le32(12)), nanoseconds: epoch.nanoseconds)
        }
        let headerSize = extended ? Erofs.extendedInodeSize : Erofs.compactInodeSize
        let xattrSize = icount == 0 ? 0 : Erofs.xattrBodyHeaderSize + 4 * (icount - 1)
        let xattrs = try readXattrs(at: position + UInt64(headerSize), size: xattrSize, nid: nid)
        let dataOffset = position + UInt64(headerSize + xattrSize)
        let data = DataMap(layout: layout, size: size, u: u, dataOffset: dataOffset)

        let (kind, entries) = try readKind(mode: mode, size: size, u: u, data: data, nid: nid)
        let node = ErofsNode(
            kind, permissions: mode & 0o7777, uid: uid, gid: gid, modificationTime: mtime, xattrs: xattrs)
        return Inode(node: node, entries: entries)
    }

    /// What an inode is, from its mode, size, union field and data (a directory's entries read too).
    private func readKind(mode: UInt16, size: UInt64, u: UInt32, data: DataMap, nid: UInt64) throws -> (
        ErofsNode.Kind, [(name: [UInt8], nid: UInt64)]
    ) {
        let kind: ErofsNode.Kind
        var entries: [(name: [UInt8], nid: UInt64)] = []
        switch mode & 0o170000 {
        case 0o040000:
            entries = try readDirectory(try content(data, nid: nid), nid: nid)
            kind = .directory([])
        case 0o100000:
            if try isHole(data, nid: nid) {
                kind = .file(.external(size: size))
            } else {
                kind = .file(.inline(try content(data, nid: nid)))
            }
        case 0o120000:
            guard size > 0 && size < 4096 else {
                throw ErofsImageError.corruptImage("nid \(nid): symlink of \(size) bytes")
            }
            kind = .symlink(try content(data, nid: nid))
        case 0o020000: kind = .characterDevice(rdev: Erofs.decodeDevice(u))
        case 0o060000: kind = .blockDevice(rdev: Erofs.decodeDevice(u))
        case 0o010000: kind = .fifo
        case 0o140000: kind = .socket
        default: throw ErofsImageError.corruptImage("nid \(nid): bad mode \(String(mode, radix: 8))")
        }
        return (kind, entries)
    }

    private func readXattrs(at offset: UInt64, size: Int, nid: UInt64) throws -> [ExtendedAttribute] {
        guard size > 0 else { return [] }
        let body = try bytes(at: offset, count: size)
        let sharedCount = Int(body[4])
        var at = Erofs.xattrBodyHeaderSize + 4 * sharedCount
        guard at <= size else { throw ErofsImageError.corruptImage("nid \(nid): shared xattr ids past the body") }
        var result: [ExtendedAttribute] = []
        for k in 0..<sharedCount {
            let id = UInt64(body.le32(Erofs.xattrBodyHeaderSize + 4 * k))
            let header = try bytes(at: xattrBase + id * 4, count: Erofs.xattrEntryHeaderSize)
            let length = Int(header[0]) + Int(header.le16(2))
            let entry = try bytes(at: xattrBase + id * 4, count: Erofs.xattrEntryHeaderSize + length)
            result.append(try decodeXattr(entry[...], nid: nid))
        }
        while at + Erofs.xattrEntryHeaderSize <= size {
            let length = Int(body[at]) + Int(body.le16(at + 2))
            if body[at + 1] == 0 && length == 0 { break }
            let end = at + Erofs.xattrEntryHeaderSize + length
            guard end <= size else {
                throw ErofsImageError.corruptImage("nid \(nid): an xattr passes its inode's body")
            }
            result.append(try decodeXattr(body[at..<end], nid: nid))
            at = roundUp(end, 4)
        }
        return inByteOrder(result, by: \.name)
    }

    private func decodeXattr(_ entry: ArraySlice<UInt8>, nid: UInt64) throws -> ExtendedAttribute {
        let s = entry.startIndex
        let nameLength = Int(entry[s])
        let index = entry[s + 1]
        guard index & 0x80 == 0 else { throw ErofsImageError.unsupported("long xattr name prefixes (nid \(nid))") }
        guard let prefix = Erofs.xattrPrefix(index: index) else {
            throw ErofsImageError.unsupported("xattr name index \(index) (nid \(nid))")
        }
        let name = prefix + entry[(s + 4)..<(s + 4 + nameLength)]
        return ExtendedAttribute(name: name, value: Array(entry[(s + 4 + nameLength)...]))
    }

    // MARK: data

    private struct DataMap {
        var layout: Erofs.Layout
        var size: UInt64
        var u: UInt32
        var dataOffset: UInt64
    }

    /// The chunks of a chunk-based inode: their size and their block
    /// addresses (nil for a hole).
    private func chunks(_ d: DataMap, nid: UInt64) throws -> (size: UInt64, addresses: [UInt32?]) {
        let format = UInt16(truncatingIfNeeded: d.u)
        guard format & ~(Erofs.chunkFormatBlockBitsMask | Erofs.chunkFormatIndexes) == 0 else {
            throw ErofsImageError.unsupported("chunk format 0x\(String(format, radix: 16)) (nid \(nid))")
        }
        let bits = UInt64(blockSize.trailingZeroBitCount) + UInt64(format & Erofs.chunkFormatBlockBitsMask)
        let chunkSize = UInt64(1) << bits
        let indexes = format & Erofs.chunkFormatIndexes != 0
        let unit = indexes ? 8 : 4
        let chunkCount = d.size == 0 ? 0 : ((d.size - 1) >> bits) + 1
        guard chunkCount <= imageBytes / UInt64(unit) else {
            throw ErofsImageError.corruptImage("nid \(nid): \(chunkCount) chunks do not fit the image")
        }
        let count = Int(chunkCount)
        let start = UInt64(roundUp(Int(d.dataOffset), unit))
        let table = try bytes(at: start, count: unit * count)
        var addresses: [UInt32?] = []
        addresses.reserveCapacity(count)
        for k in 0..<count {
            let address: UInt32
            if indexes {
                guard table.le16(8 * k + 2) == 0 else {
                    throw ErofsImageError.unsupported("chunks on another device (nid \(nid))")
                }
                address = table.le32(8 * k + 4)
            } else {
                address = table.le32(4 * k)
            }
            addresses.append(address == Erofs.nullAddress ? nil : address)
        }
        return (chunkSize, addresses)
    }

    private func isHole(_ d: DataMap, nid: UInt64) throws -> Bool {
        switch d.layout {
        case .chunkBased: return try chunks(d, nid: nid).addresses.allSatisfy { $0 == nil }
        case .flatPlain: return d.size > 0 && d.u == Erofs.nullAddress
        default: return false
        }
    }

    /// The whole content of an inode's data.
    private func content(_ d: DataMap, nid: UInt64) throws -> [UInt8] {
        guard d.size > 0 else { return [] }
        // Content read whole is at most what the image holds. (A partly sparse chunked file larger
        // than its image, which mkfs.erofs could make, is refused rather than materialized.)
        guard d.size <= imageBytes else {
            throw ErofsImageError.unsupported("nid \(nid): \(d.size) bytes of content in an image of \(imageBytes)")
        }
        let bs = UInt64(blockSize)
        switch d.layout {
        case .flatPlain:
            if d.u == Erofs.nullAddress { throw ErofsImageError.corruptImage("nid \(nid): content without a block") }
            return try bytes(at: UInt64(d.u) * bs, count: Int(d.size))
        case .flatInline:
            let blocks = (d.size + bs - 1) / bs - 1
            let head = blocks == 0 ? [] : try bytes(at: UInt64(d.u) * bs, count: Int(blocks * bs))
            let tail = Int(d.size - blocks * bs)
            guard Int(d.dataOffset % bs) + tail <= blockSize else {
                throw ErofsImageError.corruptImage("nid \(nid): inline data crosses a block boundary")
            }
            return head + (try bytes(at: d.dataOffset, count: tail))
        case .chunkBased:
            let (chunkSize, addresses) = try chunks(d, nid: nid)
            var out: [UInt8] = []
            out.reserveCapacity(Int(d.size))
            for (k, address) in addresses.enumerated() {
                let length = Int(min(chunkSize, d.size - UInt64(k) * chunkSize))
                if let address {
                    out += try bytes(at: UInt64(address) * bs, count: length)
                } else {
                    out += repeatElement(0, count: length)
                }
            }
            return out
        case .compressedFull, .compressedCompact:
            throw ErofsImageError.unsupported("compressed inode (nid \(nid))")
        }
    }

    /// A directory's entries but "." and "..": each block's dirents, then its names.
    private func readDirectory(_ data: [UInt8], nid: UInt64) throws -> [(name: [UInt8], nid: UInt64)] {
        var result: [(name: [UInt8], nid: UInt64)] = []
        var start = 0
        while start < data.count {
            let block = data[start..<min(start + blockSize, data.count)]
            let s = block.startIndex
            guard block.count >= Erofs.direntSize else {
                throw ErofsImageError.corruptImage("nid \(nid): short directory block")
            }
            let first = Int(block.le16(s + 8))
            guard first >= Erofs.direntSize, first % Erofs.direntSize == 0, first <= block.count else {
                throw ErofsImageError.corruptImage("nid \(nid): bad directory block")
            }
            let count = first / Erofs.direntSize
            for k in 0..<count {
                let d = s + k * Erofs.direntSize
                let child = block.le64(d)
                let from = Int(block.le16(d + 8))
                var to = k + 1 < count ? Int(block.le16(d + Erofs.direntSize + 8)) : block.count
                guard from >= first, from <= to, from < to || k + 1 == count, to <= block.count else {
                    throw ErofsImageError.corruptImage("nid \(nid): bad dirent name offset")
                }
                if k + 1 == count, let end = block[(s + from)..<(s + to)].firstIndex(of: 0) {
                    // The last name of a block ends at the block's zero padding: zeros only after it.
                    guard block[end..<(s + to)].allSatisfy({ $0 == 0 }) else {
                        throw ErofsImageError.corruptImage("nid \(nid): an entry name holds a slash or a NUL")
                    }
                    to = end - s
                }
                let name = Array(block[(s + from)..<(s + to)])
                guard !name.isEmpty else { throw ErofsImageError.corruptImage("nid \(nid): empty name") }
                guard !name.contains(0x2f), !name.contains(0) else {
                    throw ErofsImageError.corruptImage("nid \(nid): an entry name holds a slash or a NUL")
                }
                if name == [0x2e] || name == [0x2e, 0x2e] { continue }
                result.append((name, child))
            }
            start += blockSize
        }
        return result
    }
}
