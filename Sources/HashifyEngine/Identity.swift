import Crypto
import HashifySystem

/// A SHA-256 digest of file content.
public struct ContentDigest: Hashable, Sendable, CustomStringConvertible {
    public var bytes: [UInt8]  // 32 bytes
    public init(bytes: [UInt8]) { self.bytes = bytes }
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
        self.init(mode: stat.mode, uid: stat.uid, gid: stat.gid, modificationTime: stat.modificationTime, xattrDigest: xattrDigest)
    }

    public init(mode: UInt32, uid: UInt32, gid: UInt32, modificationTime: Timestamp, xattrDigest: [UInt8]) {
        self.mode = mode; self.uid = uid; self.gid = gid
        self.modificationTime = modificationTime; self.xattrDigest = xattrDigest
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
    for b in bytes { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
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
