import HashifySystem

/// The parts of the EROFS on-disk format (Linux `fs/erofs/erofs_fs.h`,
/// `Documentation/filesystems/erofs.rst`) that the writer and the reader
/// share. All integers on disk are little-endian.
enum Erofs {
    static let superblockOffset = 1024
    static let superblockSize = 128
    static let magic: UInt32 = 0xE0F5_E1E2
    static let blockSizeBits: UInt8 = 12
    static let blockSize = 4096
    /// Inodes start on 32-byte slots; a nid is a slot number.
    static let slotSize = 32
    static let compactInodeSize = 32
    static let extendedInodeSize = 64
    static let xattrBodyHeaderSize = 12
    static let xattrEntryHeaderSize = 4
    static let direntSize = 12
    static let maxNameLength = 255
    /// A block map entry that stands for a hole.
    static let nullAddress: UInt32 = 0xFFFF_FFFF

    static let compatSuperblockChecksum: UInt32 = 0x1
    static let compatMtime: UInt32 = 0x2
    static let compatXattrFilter: UInt32 = 0x4
    static let xattrFilterSeed: UInt32 = 0x25BB_E08F
    static let incompatChunkedFile: UInt32 = 0x4
    /// Incompatible features the reader understands (it refuses any other).
    static let incompatUnderstood: UInt32 = incompatChunkedFile | 0x1

    enum Layout: UInt16 {
        case flatPlain = 0
        case compressedFull = 1
        case flatInline = 2
        case compressedCompact = 3
        case chunkBased = 4
    }

    /// `i_format` bit 0: 0 compact (32-byte) inode, 1 extended (64-byte).
    static let formatExtendedBit: UInt16 = 1
    static let chunkFormatBlockBitsMask: UInt16 = 0x1F
    static let chunkFormatIndexes: UInt16 = 0x20

    /// `erofs_dirent.file_type`: the kernel's FT_* numbers.
    static func direntType(_ kind: ErofsNode.Kind) -> UInt8 {
        switch kind {
        case .file: return 1
        case .directory: return 2
        case .characterDevice: return 3
        case .blockDevice: return 4
        case .fifo: return 5
        case .socket: return 6
        case .symlink: return 7
        }
    }

    /// The xattr name prefixes with a short index (`EROFS_XATTR_INDEX_*`). A
    /// POSIX ACL's name is all prefix, its stored suffix empty.
    static let xattrPrefixes: [(index: UInt8, prefix: [UInt8])] = [
        (1, Array("user.".utf8)),
        (2, Array("system.posix_acl_access".utf8)),
        (3, Array("system.posix_acl_default".utf8)),
        (4, Array("trusted.".utf8)),
        (6, Array("security.".utf8)),
    ]

    /// The index and suffix a full xattr name is stored as; nil when the name has no short prefix.
    static func splitXattrName(_ name: [UInt8]) -> (index: UInt8, suffix: ArraySlice<UInt8>)? {
        for (index, prefix) in xattrPrefixes where name.starts(with: prefix) {
            if index == 2 || index == 3 {
                guard name.count == prefix.count else { continue }
            }
            return (index, name[prefix.count...])
        }
        return nil
    }

    static func xattrPrefix(index: UInt8) -> [UInt8]? {
        xattrPrefixes.first { $0.index == index }?.prefix
    }

    /// Bytes of one xattr entry (header, name suffix, value) rounded up to 4.
    static func xattrEntrySize(suffixLength: Int, valueLength: Int) -> Int {
        roundUp(xattrEntryHeaderSize + suffixLength + valueLength, 4)
    }

    /// The kernel's `new_encode_dev`: a 32-bit device number from glibc's `dev_t`.
    static func encodeDevice(_ rdev: UInt64) -> UInt32? {
        let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & ~0xfff)
        let minor = (rdev & 0xff) | ((rdev >> 12) & ~0xff)
        guard major < (1 << 12), minor < (1 << 20) else { return nil }
        return UInt32((minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12))
    }

    /// The kernel's `new_decode_dev`, giving glibc's `makedev(major, minor)`.
    static func decodeDevice(_ value: UInt32) -> UInt64 {
        let major = UInt64((value & 0xfff00) >> 8)
        let minor = UInt64((value & 0xff) | ((value >> 12) & 0xfff00))
        return ((major & 0xfff) << 8) | ((major & ~0xfff) << 32) | (minor & 0xff) | ((minor & ~0xff) << 12)
    }
}

@inline(__always)
func roundUp(_ value: Int, _ multiple: Int) -> Int { (value + multiple - 1) / multiple * multiple }

extension Array where Element == UInt8 {
    @inline(__always)
    mutating func put16(_ value: UInt16, at offset: Int) {
        self[offset] = UInt8(truncatingIfNeeded: value)
        self[offset + 1] = UInt8(truncatingIfNeeded: value >> 8)
    }

    @inline(__always)
    mutating func put32(_ value: UInt32, at offset: Int) {
        for i in 0..<4 { self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
    }

    @inline(__always)
    mutating func put64(_ value: UInt64, at offset: Int) {
        for i in 0..<8 { self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    }

    mutating func put(_ bytes: some Collection<UInt8>, at offset: Int) {
        replaceSubrange(offset..<offset + bytes.count, with: bytes)
    }
}

extension Collection where Element == UInt8, Index == Int {
    @inline(__always)
    func le16(_ offset: Int) -> UInt16 { UInt16(self[offset]) | UInt16(self[offset + 1]) << 8 }

    @inline(__always)
    func le32(_ offset: Int) -> UInt32 {
        var v: UInt32 = 0
        for i in (0..<4).reversed() { v = v << 8 | UInt32(self[offset + i]) }
        return v
    }

    @inline(__always)
    func le64(_ offset: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in (0..<8).reversed() { v = v << 8 | UInt64(self[offset + i]) }
        return v
    }
}

/// CRC32C (Castagnoli) as the kernel's `crc32c(seed, data, len)`: reflected,
/// no final inversion. EROFS checksums its superblock block with seed ~0.
enum CRC32C {
    static let table: [UInt32] = (0..<256).map { i -> UInt32 in
        var c = UInt32(i)
        for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
        return c
    }

    static func update(_ seed: UInt32, _ bytes: some Sequence<UInt8>) -> UInt32 {
        var crc = seed
        for b in bytes { crc = table[Int((crc ^ UInt32(b)) & 0xff)] ^ (crc >> 8) }
        return crc
    }
}

/// XXH32, the hash of EROFS's xattr name filter: bit `xxh32(suffix, seed +
/// prefix index) % 32` of an inode's `h_name_filter` is clear when it may
/// have an xattr of that name, so that a lookup of an absent one (overlayfs
/// asks for several on every file) stops without reading the xattrs.
enum XXH32 {
    static let p1: UInt32 = 0x9E37_79B1
    static let p2: UInt32 = 0x85EB_CA77
    static let p3: UInt32 = 0xC2B2_AE3D
    static let p4: UInt32 = 0x27D4_EB2F
    static let p5: UInt32 = 0x1656_67B1

    @inline(__always)
    private static func rotl(_ x: UInt32, _ r: UInt32) -> UInt32 { (x << r) | (x >> (32 - r)) }

    @inline(__always)
    private static func round(_ acc: UInt32, _ lane: UInt32) -> UInt32 { rotl(acc &+ lane &* p2, 13) &* p1 }

    static func hash(_ bytes: [UInt8], seed: UInt32) -> UInt32 {
        let n = bytes.count
        var i = 0
        var h: UInt32
        if n >= 16 {
            var v1 = seed &+ p1 &+ p2
            var v2 = seed &+ p2
            var v3 = seed
            var v4 = seed &- p1
            while i + 16 <= n {
                v1 = round(v1, bytes.le32(i))
                v2 = round(v2, bytes.le32(i + 4))
                v3 = round(v3, bytes.le32(i + 8))
                v4 = round(v4, bytes.le32(i + 12))
                i += 16
            }
            h = rotl(v1, 1) &+ rotl(v2, 7) &+ rotl(v3, 12) &+ rotl(v4, 18)
        } else {
            h = seed &+ p5
        }
        h = h &+ UInt32(truncatingIfNeeded: n)
        while i + 4 <= n {
            h = rotl(h &+ bytes.le32(i) &* p3, 17) &* p4
            i += 4
        }
        while i < n {
            h = rotl(h &+ UInt32(bytes[i]) &* p5, 11) &* p1
            i += 1
        }
        h ^= h >> 15
        h = h &* p2
        h ^= h >> 13
        h = h &* p3
        h ^= h >> 16
        return h
    }
}

/// Whether `a` sorts before `b` byte by byte (a prefix first), as EROFS orders directory entries.
@inline(__always)
func bytesPrecede(_ a: [UInt8], _ b: [UInt8]) -> Bool { compareBytes(a, b) < 0 }

/// `items` in the byte order of their names: as given when they are in it
/// already (an image's entries and xattrs, a description read back), else sorted.
func inByteOrder<T>(_ items: [T], by name: (T) -> [UInt8]) -> [T] {
    if zip(items, items.dropFirst()).allSatisfy({ !bytesPrecede(name($1), name($0)) }) { return items }
    return items.sorted { bytesPrecede(name($0), name($1)) }
}
