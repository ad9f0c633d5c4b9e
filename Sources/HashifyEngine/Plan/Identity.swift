import Crypto
import HashifySystem

/// A SHA-256 digest of file content, stored inline (no heap allocation).
public struct ContentDigest: Hashable, Sendable, CustomStringConvertible {
    var words: (UInt64, UInt64, UInt64, UInt64)

    /// From the 32 digest bytes.
    public init(bytes: [UInt8]) {
        precondition(bytes.count == 32, "a SHA-256 digest has 32 bytes")
        func word(_ i: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(bytes[i * 8 + $1]) } }
        words = (word(0), word(1), word(2), word(3))
    }

    /// From 32 raw digest bytes.
    public init(_ raw: UnsafeRawBufferPointer) {
        precondition(raw.count == 32, "a SHA-256 digest has 32 bytes")
        func word(_ i: Int) -> UInt64 { UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
        words = (word(0), word(1), word(2), word(3))
    }

    /// A stand-in for a digest that was not computed: unique per `n`, and
    /// marked so that it can never equal a SHA-256 by accident of layout
    /// (the last word is all ones and the first three are 0, 0, n).
    init(standIn n: UInt64) {
        words = (0, 0, n, UInt64.max)
    }

    /// From a finished SHA-256.
    public init(_ digest: SHA256.Digest) {
        self = digest.withUnsafeBytes { ContentDigest($0) }
    }

    /// The 32 digest bytes.
    public var bytes: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(32)
        append(to: &out)
        return out
    }

    /// Appends the 32 digest bytes.
    public func append(to out: inout [UInt8]) {
        for w in [words.0, words.1, words.2, words.3] {
            withUnsafeBytes(of: w.bigEndian) { out.append(contentsOf: $0) }
        }
    }

    /// The first byte (names the store's prefix directory).
    public var firstByte: UInt8 { UInt8(truncatingIfNeeded: words.0 >> 56) }

    public static func == (a: ContentDigest, b: ContentDigest) -> Bool {
        a.words.0 == b.words.0 && a.words.1 == b.words.1 && a.words.2 == b.words.2 && a.words.3 == b.words.3
    }
    public func hash(into h: inout Hasher) {
        h.combine(words.0)
        h.combine(words.1)
        h.combine(words.2)
        h.combine(words.3)
    }
    public var hex: String { hexString(bytes) }
    public var description: String { hex }
}

/// What besides content must be equal for two files to merge: mode
/// (with setuid/setgid/sticky), owner, group, mtime to the nanosecond and a
/// digest over every extended attribute name and value.
public struct MetadataIdentity: Hashable, Sendable {
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var modificationTime: Timestamp
    /// SHA-256 over the sorted (name, value) pairs; empty when there are none.
    public var xattrDigest: [UInt8]

    public init(stat: FileStat, xattrs: [ExtendedAttribute]) {
        mode = stat.mode
        uid = stat.uid
        gid = stat.gid
        modificationTime = stat.modificationTime
        xattrDigest = Self.digest(of: xattrs)
    }

    /// The identity of a file whose xattr digest is known (from the index).
    public init(stat: FileStat, xattrDigest: [UInt8]) {
        self.init(
            mode: stat.mode, uid: stat.uid, gid: stat.gid, modificationTime: stat.modificationTime,
            xattrDigest: xattrDigest)
    }

    public init(mode: UInt32, uid: UInt32, gid: UInt32, modificationTime: Timestamp, xattrDigest: [UInt8]) {
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.modificationTime = modificationTime
        self.xattrDigest = xattrDigest
    }

    static func digest(of xattrs: [ExtendedAttribute]) -> [UInt8] {
        if xattrs.isEmpty { return [] }
        var h = SHA256()
        for a in xattrs {
            withUnsafeBytes(of: UInt32(a.name.count).littleEndian) { h.update(bufferPointer: $0) }
            h.update(data: a.name)
            withUnsafeBytes(of: UInt32(a.value.count).littleEndian) { h.update(bufferPointer: $0) }
            h.update(data: a.value)
        }
        return Array(h.finalize())
    }

    /// The same identity with mtime ignored (for --ignore-mtime grouping).
    public var withoutModificationTime: MetadataIdentity {
        var c = self
        c.modificationTime = Timestamp(seconds: 0, nanoseconds: 0)
        return c
    }

    /// A 128-bit key for object names in the store.
    public var key: String {
        var h = SHA256()
        for v in [mode, uid, gid] { withUnsafeBytes(of: v.littleEndian) { h.update(bufferPointer: $0) } }
        withUnsafeBytes(of: modificationTime.seconds.littleEndian) { h.update(bufferPointer: $0) }
        withUnsafeBytes(of: modificationTime.nanoseconds.littleEndian) { h.update(bufferPointer: $0) }
        h.update(data: xattrDigest)
        return hexString(Array(h.finalize().prefix(16)))
    }
}

func hexString(_ bytes: [UInt8]) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out = [UInt8]()
    out.reserveCapacity(bytes.count * 2)
    for b in bytes {
        out.append(digits[Int(b >> 4)])
        out.append(digits[Int(b & 15)])
    }
    return String(decoding: out, as: UTF8.self)
}

func bytesFromHex(_ s: some Collection<UInt8>) -> [UInt8]? {
    guard s.count % 2 == 0 else { return nil }
    func v(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: return c - 0x30
        case 0x61...0x66: return c - 0x61 + 10
        default: return nil
        }
    }
    var out = [UInt8]()
    var it = s.makeIterator()
    while let a = it.next(), let b = it.next() {
        guard let x = v(a), let y = v(b) else { return nil }
        out.append(x << 4 | y)
    }
    return out
}
