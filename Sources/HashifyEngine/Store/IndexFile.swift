import Crypto
import HashifySystem
import SystemPackage

/// A record of one of the store's index files: fixed size, little-endian.
protocol IndexRecord {
    /// The index's kind in its header (8 bytes), so that one index is never read as another.
    static var kind: [UInt8] { get }
    /// Bytes per record.
    static var size: Int { get }
    /// What the index is called in messages ("the index", "the data index").
    static var label: String { get }
    /// The header of this index as earlier versions wrote it (read, never written): its magic.
    static var legacyMagic: [UInt8]? { get }
    init(decoding: UnsafeRawBufferPointer)
    /// Appends exactly `size` bytes.
    func encode(into out: inout [UInt8])
}

extension IndexRecord {
    static var legacyMagic: [UInt8]? { nil }
}

/// The one format of the store's index files (STORE/index: the digests of
/// hashed inodes; STORE/data-index: the digests of data objects):
///
/// ```
/// "HASHIFY-INDEX-2\n"   16 bytes
/// kind                  8 bytes ("inodes", "objects", NUL-padded)
/// record size           u32
/// reserved              u32, 0
/// count                 u64
/// count records         of the record size each
/// SHA-256               32 bytes, of everything before it
/// ```
/// An index is written whole (`Directory.writeAtomically`: a crash leaves
/// the old file or the new one) and read as a stream, never held whole in
/// memory. The checksum covers the whole file and is known only at the end,
/// so a reader discards what it was given when `read` reports damage: a
/// truncated, corrupt or foreign file is reported and rebuilt, never trusted.
enum IndexFile<Record: IndexRecord> {
    static var magic: [UInt8] { Array("HASHIFY-INDEX-2\n".utf8) }
    static var headerSize: Int { 40 }

    /// What reading an index found.
    enum Outcome: Equatable {
        /// No such file: an empty index.
        case missing
        /// Every record given; `legacy` when in the format of an earlier version (rewrite it).
        case intact(legacy: Bool)
        /// Damaged or unreadable: what was given must be discarded.
        case damaged(String)

        var problem: String? {
            if case .damaged(let p) = self { return p }
            return nil
        }
    }

    /// Calls `body` with every record of `name` in `dir`, in file order.
    static func read(_ name: FileName, in dir: Directory, _ body: (Record) -> Void) -> Outcome {
        let file: OpenFile
        let total: UInt64
        do {
            file = try dir.openFileForReading(name)
            total = try file.stat().size
        } catch Errno.noSuchFileOrDirectory {
            return .missing
        } catch {
            return .damaged("cannot read \(Record.label): \(error)")
        }
        let noHeader = Outcome.damaged("\(Record.label) has no valid header (truncated or damaged); rebuilding it")
        let chunk = Record.size * 8192
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(chunk, headerSize), alignment: 16)
        defer { buffer.deallocate() }
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
        guard total >= UInt64(24 + 32) else { return noHeader }
        let bodySize = Int(total) - 32
        var sha = SHA256()
        do {
            let start = Array(try fill(16, at: 0))
            let legacy = start == Record.legacyMagic
            guard legacy || start == magic else { return noHeader }
            let size = legacy ? 24 : headerSize
            guard bodySize >= size else { return noHeader }
            let header = try fill(size, at: 0)
            sha.update(bufferPointer: header)
            if !legacy {
                guard Array(header[16..<24]) == kindBytes,
                    header.loadUnaligned(fromByteOffset: 24, as: UInt32.self).littleEndian == Record.size
                else { return .damaged("\(Record.label) is of another kind or version; rebuilding it") }
            }
            let count = Int(clamping: header.loadUnaligned(fromByteOffset: size - 8, as: UInt64.self).littleEndian)
            guard count <= (bodySize - size) / Record.size, size + count * Record.size == bodySize else {
                return .damaged("\(Record.label) has a wrong length; rebuilding it")
            }
            var offset = size
            while offset < bodySize {
                let n = min(chunk, bodySize - offset)
                let raw = try fill(n, at: offset)
                sha.update(bufferPointer: raw)
                var r = 0
                while r < n {
                    body(Record(decoding: UnsafeRawBufferPointer(rebasing: raw[r..<r + Record.size])))
                    r += Record.size
                }
                offset += n
            }
            let trailer = Array(try fill(32, at: bodySize))
            guard Array(sha.finalize()) == trailer else {
                return .damaged("\(Record.label) checksum does not match (truncated or damaged); rebuilding it")
            }
            return .intact(legacy: legacy)
        } catch {
            return .damaged("cannot read \(Record.label): \(error)")
        }
    }

    static var kindBytes: [UInt8] { Record.kind + Array(repeating: 0, count: 8 - Record.kind.count) }

    /// Writes `name` in `dir` atomically: `count` records, produced by
    /// `records` calling its argument with each.
    static func write(
        _ name: FileName, in dir: Directory, count: Int, records: ((Record) -> Void) throws -> Void
    ) throws {
        try dir.writeAtomically(name) { f in
            var sha = SHA256()
            var out: [UInt8] = []
            out.reserveCapacity(Record.size * 8192 + 64)
            func flush() throws {
                sha.update(data: out)
                try f.write(out)
                out.removeAll(keepingCapacity: true)
            }
            out += magic + kindBytes
            withUnsafeBytes(of: UInt32(Record.size).littleEndian) { out.append(contentsOf: $0) }
            out += [0, 0, 0, 0]
            withUnsafeBytes(of: UInt64(count).littleEndian) { out.append(contentsOf: $0) }
            var written = 0
            var failure: (any Error)?
            try records { r in
                if failure != nil { return }
                let before = out.count
                r.encode(into: &out)
                precondition(out.count - before == Record.size, "an index record of the wrong size")
                written += 1
                if out.count >= Record.size * 8192 {
                    do { try flush() } catch { failure = error }
                }
            }
            if let failure { throw failure }
            precondition(written == count, "index record count changed while writing")
            try flush()
            try f.write(Array(sha.finalize()))
        }
    }
}
