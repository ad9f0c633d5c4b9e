import HashifySystem
import SystemPackage

/// The store's memory of what it hashed: the file STORE/index, read and
/// written as a stream of fixed-size records (never held whole in memory).
///
/// A record is keyed so that it cannot lie: device, inode, size, mtime and
/// ctime to the nanosecond. ctime moves on every change of content, xattrs or
/// metadata and cannot be set by a user; a record also holds `verifiedAt`, a
/// reading of the coarse clock (the clock ctime is stamped with) taken while
/// the content was known to equal the digest, and is only trusted when
/// ctime < verifiedAt — so a change in the same clock tick cannot hide.
///
/// The file is in the store's one index format (`IndexFile`): written whole
/// and atomically, with a trailing SHA-256, so a truncated or corrupt index
/// is detected, reported and rebuilt, never trusted.
public enum ContentIndex {
    /// One inode's digest as the index records it.
    public struct Record: Sendable, Equatable {
        public var key: InodeKey
        public var size: UInt64
        public var modificationTime: Timestamp
        public var changeTime: Timestamp
        public var verifiedAt: Timestamp
        public var digest: ContentDigest
        /// Empty when the file has no extended attributes.
        public var xattrDigest: [UInt8]

        /// Only a record whose ctime is older than its verification vouches for anything.
        public var isTrusted: Bool { changeTime < verifiedAt }
    }

    static let name = FileName("index")

    /// Calls `body` with every record of STORE/index, in file order (see
    /// `IndexFile`): when this returns a problem, the caller must discard what
    /// `body` was given. A missing index is an empty one (nil, no records); an
    /// index of an earlier version is read (the next write upgrades it).
    public static func read(from store: Store, _ body: (Record) -> Void) -> String? {
        IndexFile<Record>.read(name, in: store.directory, body).problem
    }

    /// Number of records in an intact index (0 when missing or damaged).
    public static func count(in store: Store) -> Int {
        var n = 0
        return read(from: store, { _ in n += 1 }) == nil ? n : 0
    }

    /// Writes STORE/index atomically: `count` records, produced by `records` calling its argument.
    public static func write(to store: Store, count: Int, records: ((Record) -> Void) throws -> Void) throws {
        try IndexFile<Record>.write(name, in: store.directory, count: count, records: records)
    }

    /// Rewrites the index without the records of `dropped` inodes (a damaged
    /// index is rewritten empty).
    public static func remove(_ dropped: Set<InodeKey>, in store: Store) throws {
        var kept = 0
        let problem = read(from: store) { r in if !dropped.contains(r.key) { kept += 1 } }
        try write(to: store, count: problem == nil ? kept : 0) { emit in
            if problem != nil { return }
            _ = read(from: store) { r in if !dropped.contains(r.key) { emit(r) } }
        }
    }

}

extension ContentIndex.Record: IndexRecord {
    static let kind = Array("inodes".utf8)
    static let size = 8 * 6 + 32 + 1 + 32 + 7  // 120 bytes
    static let label = "the index"
    static var legacyMagic: [UInt8]? { Array("HASHIFY-INDEX-1\n".utf8) }

    init(decoding p: UnsafeRawBufferPointer) {
        func u64(_ i: Int) -> UInt64 { p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self).littleEndian }
        let hasXattrs = p[80] != 0
        self.init(
            key: InodeKey(device: u64(0), inode: u64(1)), size: u64(2),
            modificationTime: Timestamp(totalNanoseconds: Int64(bitPattern: u64(3))),
            changeTime: Timestamp(totalNanoseconds: Int64(bitPattern: u64(4))),
            verifiedAt: Timestamp(totalNanoseconds: Int64(bitPattern: u64(5))),
            digest: ContentDigest(UnsafeRawBufferPointer(rebasing: p[48..<80])),
            xattrDigest: hasXattrs ? Array(p[81..<113]) : [])
    }

    func encode(into out: inout [UInt8]) {
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        u64(key.device)
        u64(key.inode)
        u64(size)
        u64(UInt64(bitPattern: modificationTime.totalNanoseconds))
        u64(UInt64(bitPattern: changeTime.totalNanoseconds))
        u64(UInt64(bitPattern: verifiedAt.totalNanoseconds))
        digest.append(to: &out)
        out.append(xattrDigest.isEmpty ? 0 : 1)
        if xattrDigest.count == 32 {
            out += xattrDigest
        } else {
            out.append(contentsOf: repeatElement(0, count: 32))
        }
        out.append(contentsOf: repeatElement(0, count: 7))
    }
}
