import Crypto
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
/// The file is written whole to a temporary name, fsync'ed and renamed over
/// the old one; a trailing SHA-256 covers everything before it, so a
/// truncated or corrupt index is detected, reported and rebuilt, never trusted.
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

    static let magic = Array("HASHIFY-INDEX-1\n".utf8)
    static let recordSize = 8 * 6 + 32 + 1 + 32 + 7  // 120 bytes
    static let name = FileName("index")

    /// Calls `body` with every record of STORE/index, in file order. The
    /// checksum covers the whole file, so it is known only at the end: when
    /// this returns a problem, the caller must discard what `body` was given.
    /// A missing index is an empty one (nil, no records).
    public static func read(from store: Store, _ body: (Record) -> Void) -> String? {
        let file: OpenFile
        let total: UInt64
        do {
            file = try store.directory.openFileForReading(name)
            total = try file.stat().size
        } catch Errno.noSuchFileOrDirectory {
            return nil
        } catch {
            return "cannot read the index: \(error)"
        }
        let headerSize = magic.count + 8
        guard total >= UInt64(headerSize + 32) else {
            return "the index has no valid header (truncated or damaged); rebuilding it"
        }
        let bodySize = Int(total) - 32
        let chunk = recordSize * 8192
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 16)
        defer { buffer.deallocate() }
        var sha = SHA256()
        func fill(_ count: Int, at offset: Int) throws -> UnsafeRawBufferPointer {
            var got = 0
            while got < count {
                let n = try file.read(
                    into: UnsafeMutableRawBufferPointer(rebasing: buffer[got..<count]), at: UInt64(offset + got))
                if n == 0 { throw Errno.ioError }
                got += n
            }
            return UnsafeRawBufferPointer(rebasing: buffer[0..<count])
        }
        do {
            let header = try fill(headerSize, at: 0)
            guard header.prefix(magic.count).elementsEqual(magic) else {
                return "the index has no valid header (truncated or damaged); rebuilding it"
            }
            sha.update(bufferPointer: header)
            let count = Int(clamping: header.loadUnaligned(fromByteOffset: magic.count, as: UInt64.self).littleEndian)
            guard count <= (bodySize - headerSize) / recordSize, headerSize + count * recordSize == bodySize else {
                return "the index has a wrong length; rebuilding it"
            }
            var offset = headerSize
            while offset < bodySize {
                let n = min(chunk, bodySize - offset)
                let raw = try fill(n, at: offset)
                sha.update(bufferPointer: raw)
                var r = 0
                while r < n {
                    body(decode(UnsafeRawBufferPointer(rebasing: raw[r..<r + recordSize])))
                    r += recordSize
                }
                offset += n
            }
            let trailer = Array(try fill(32, at: bodySize))
            guard Array(sha.finalize()) == trailer else {
                return "the index checksum does not match (truncated or damaged); rebuilding it"
            }
        } catch {
            return "cannot read the index: \(error)"
        }
        return nil
    }

    /// Number of records in an intact index (0 when missing or damaged).
    public static func count(in store: Store) -> Int {
        var n = 0
        return read(from: store, { _ in n += 1 }) == nil ? n : 0
    }

    /// Writes STORE/index atomically (`Directory.writeAtomically`):
    /// `count` records, produced by `records` calling its argument.
    public static func write(to store: Store, count: Int, records: ((Record) -> Void) throws -> Void) throws {
        try store.directory.writeAtomically(name) { f in
            var sha = SHA256()
            var out: [UInt8] = []
            out.reserveCapacity(recordSize * 8192 + 64)
            func flush() throws {
                sha.update(data: out)
                try f.write(out)
                out.removeAll(keepingCapacity: true)
            }
            out += magic
            withUnsafeBytes(of: UInt64(count).littleEndian) { out.append(contentsOf: $0) }
            var written = 0
            var failure: (any Error)?
            try records { r in
                if failure != nil { return }
                encode(r, into: &out)
                written += 1
                if out.count >= recordSize * 8192 {
                    do { try flush() } catch { failure = error }
                }
            }
            if let failure { throw failure }
            precondition(written == count, "index record count changed while writing")
            try flush()
            try f.write(Array(sha.finalize()))
        }
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

    static func decode(_ p: UnsafeRawBufferPointer) -> Record {
        func u64(_ i: Int) -> UInt64 { p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self).littleEndian }
        let hasXattrs = p[80] != 0
        return Record(
            key: InodeKey(device: u64(0), inode: u64(1)), size: u64(2),
            modificationTime: Timestamp(totalNanoseconds: Int64(bitPattern: u64(3))),
            changeTime: Timestamp(totalNanoseconds: Int64(bitPattern: u64(4))),
            verifiedAt: Timestamp(totalNanoseconds: Int64(bitPattern: u64(5))),
            digest: ContentDigest(UnsafeRawBufferPointer(rebasing: p[48..<80])),
            xattrDigest: hasXattrs ? Array(p[81..<113]) : [])
    }

    static func encode(_ r: Record, into out: inout [UInt8]) {
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        u64(r.key.device)
        u64(r.key.inode)
        u64(r.size)
        u64(UInt64(bitPattern: r.modificationTime.totalNanoseconds))
        u64(UInt64(bitPattern: r.changeTime.totalNanoseconds))
        u64(UInt64(bitPattern: r.verifiedAt.totalNanoseconds))
        r.digest.append(to: &out)
        out.append(r.xattrDigest.isEmpty ? 0 : 1)
        if r.xattrDigest.count == 32 {
            out += r.xattrDigest
        } else {
            out.append(contentsOf: repeatElement(0, count: 32))
        }
        out.append(contentsOf: repeatElement(0, count: 7))
    }
}
