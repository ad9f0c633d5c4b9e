import Crypto
import HashifySystem
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The store's memory of what it hashed: STORE/index.
///
/// An entry is keyed so that it cannot lie: device, inode, size, mtime and
/// ctime to the nanosecond. ctime moves on every change of content, xattrs or
/// metadata and cannot be set by a user; an entry also records `verifiedAt`,
/// a reading of the coarse clock (the clock ctime is stamped with) taken
/// while the content was known to equal the digest, and is only trusted when
/// ctime < verifiedAt — so a change in the same clock tick cannot hide.
///
/// The file is written whole to a temporary name, fsync'ed and renamed over
/// the old one; a trailing SHA-256 covers everything before it, so a
/// truncated or corrupt index is detected, reported and rebuilt, never trusted.
public struct ContentIndex: Sendable {
    public struct Entry: Sendable, Equatable {
        public var size: UInt64
        public var modificationTime: Timestamp
        public var changeTime: Timestamp
        public var verifiedAt: Timestamp
        public var digest: ContentDigest
        public var xattrDigest: [UInt8]
    }

    static let magic = Array("HASHIFY-INDEX-1\n".utf8)
    static let recordSize = 8 * 6 + 32 + 1 + 32 + 7  // 120 bytes

    public private(set) var entries: [InodeKey: Entry] = [:]
    /// Set when the file existed but could not be trusted.
    public private(set) var problem: String?

    public init() {}

    /// The entry for an inode in the state `stat` shows, if it can be trusted.
    public func lookup(_ stat: FileStat) -> Entry? {
        guard let e = entries[InodeKey(device: stat.device, inode: stat.inode)],
              e.size == stat.size, e.modificationTime == stat.modificationTime,
              e.changeTime == stat.changeTime, e.changeTime < e.verifiedAt else { return nil }
        return e
    }

    public mutating func record(_ stat: FileStat, verifiedAt: Timestamp, digest: ContentDigest, xattrDigest: [UInt8]) {
        guard stat.changeTime < verifiedAt else { remove(stat.device, stat.inode); return }
        entries[InodeKey(device: stat.device, inode: stat.inode)] = Entry(
            size: stat.size, modificationTime: stat.modificationTime, changeTime: stat.changeTime,
            verifiedAt: verifiedAt, digest: digest, xattrDigest: xattrDigest)
    }

    public mutating func remove(_ device: UInt64, _ inode: UInt64) {
        entries[InodeKey(device: device, inode: inode)] = nil
    }

    /// Keeps only the entries for which `keep` is true.
    public mutating func prune(_ keep: (InodeKey) -> Bool) {
        entries = entries.filter { keep($0.key) }
    }

    // MARK: file format

    /// Loads STORE/index; a missing file is an empty index, a damaged one is
    /// an empty index with `problem` set.
    public static func load(from store: Store) -> ContentIndex {
        var index = ContentIndex()
        let data: [UInt8]
        do {
            data = try store.directory.openFileForReading(FileName("index")).readAll()
        } catch Errno.noSuchFileOrDirectory {
            return index
        } catch {
            index.problem = "cannot read the index: \(error)"
            return index
        }
        guard data.count >= magic.count + 8 + 32, Array(data[0..<magic.count]) == magic else {
            index.problem = "the index has no valid header (truncated or damaged); rebuilding it"
            return index
        }
        let body = data[0..<(data.count - 32)]
        guard Array(SHA256.hash(data: body)) == Array(data[(data.count - 32)...]) else {
            index.problem = "the index checksum does not match (truncated or damaged); rebuilding it"
            return index
        }
        var r = Reader(bytes: data, offset: magic.count)
        let count = Int(r.u64())
        guard magic.count + 8 + count * recordSize + 32 == data.count else {
            index.problem = "the index has a wrong length; rebuilding it"
            return index
        }
        index.entries.reserveCapacity(count)
        for _ in 0..<count {
            let dev = r.u64(), ino = r.u64(), size = r.u64()
            let mtime = Timestamp(totalNanoseconds: Int64(bitPattern: r.u64()))
            let ctime = Timestamp(totalNanoseconds: Int64(bitPattern: r.u64()))
            let verified = Timestamp(totalNanoseconds: Int64(bitPattern: r.u64()))
            let digest = r.bytes(32)
            let hasX = r.bytes(1)[0] != 0
            let x = r.bytes(32)
            _ = r.bytes(7)
            index.entries[InodeKey(device: dev, inode: ino)] = Entry(
                size: size, modificationTime: mtime, changeTime: ctime, verifiedAt: verified,
                digest: ContentDigest(bytes: digest), xattrDigest: hasX ? x : [])
        }
        return index
    }

    /// Writes STORE/index atomically (temporary name, fsync, rename).
    public func save(to store: Store) throws {
        var out = Self.magic
        out.reserveCapacity(Self.magic.count + 8 + entries.count * Self.recordSize + 32)
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        u64(UInt64(entries.count))
        for (k, e) in entries {
            u64(k.device); u64(k.inode); u64(e.size)
            u64(UInt64(bitPattern: e.modificationTime.totalNanoseconds))
            u64(UInt64(bitPattern: e.changeTime.totalNanoseconds))
            u64(UInt64(bitPattern: e.verifiedAt.totalNanoseconds))
            out.append(contentsOf: e.digest.bytes)
            out.append(e.xattrDigest.isEmpty ? 0 : 1)
            out.append(contentsOf: e.xattrDigest.isEmpty ? [UInt8](repeating: 0, count: 32) : e.xattrDigest)
            out.append(contentsOf: [UInt8](repeating: 0, count: 7))
        }
        out.append(contentsOf: SHA256.hash(data: out))
        let temp = FileName("index.new")
        try? store.directory.unlink(temp)
        let f = try store.directory.createFile(temp, mode: 0o600)
        try f.write(out)
        try f.sync()
        try store.directory.rename(temp, to: store.directory, as: FileName("index"))
    }

    struct Reader {
        let bytes: [UInt8]
        var offset: Int
        mutating func u64() -> UInt64 {
            var v: UInt64 = 0
            for i in 0..<8 { v |= UInt64(bytes[offset + i]) << (8 * UInt64(i)) }
            offset += 8
            return v
        }
        mutating func bytes(_ n: Int) -> [UInt8] {
            defer { offset += n }
            return Array(bytes[offset..<offset + n])
        }
    }
}
