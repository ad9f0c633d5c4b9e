/// A single file name as raw bytes (never decoded: any byte but NUL and '/').
public struct FileName: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var bytes: [UInt8]

    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public init<S: Sequence>(bytes: S) where S.Element == UInt8 { self.bytes = Array(bytes) }
    public init(_ string: String) { self.bytes = Array(string.utf8) }

    public static func < (a: FileName, b: FileName) -> Bool {
        a.bytes.lexicographicallyPrecedes(b.bytes)
    }

    /// Calls body with a NUL-terminated copy of the name.
    public func withCString<R>(_ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R {
        try withCName(bytes, body)
    }

    /// The name with bytes that are not printable ASCII escaped as \xNN.
    public var description: String { escapedPath(bytes) }
}

/// Calls body with a NUL-terminated copy of bytes.
@inline(__always)
public func withCName<C: Collection, R>(_ bytes: C, _ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R
where C.Element == UInt8 {
    let count = bytes.count
    if count < 256 {
        return try withUnsafeTemporaryAllocation(of: CChar.self, capacity: count + 1) { buf in
            var i = 0
            for b in bytes {
                buf[i] = CChar(bitPattern: b)
                i += 1
            }
            buf[count] = 0
            return try body(buf.baseAddress!)
        }
    }
    var copy = bytes.map { CChar(bitPattern: $0) }
    copy.append(0)
    return try copy.withUnsafeBufferPointer { try body($0.baseAddress!) }
}

/// Renders path bytes for humans: printable ASCII and valid UTF-8 as is,
/// control characters, backslashes and invalid bytes as \xNN. One line, always.
public func escapedPath<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
    var out = ""
    let arr = Array(bytes)
    var j = 0
    while j < arr.count {
        let b = arr[j]
        if b >= 0x20 && b < 0x7f && b != 0x5c {
            out.unicodeScalars.append(Unicode.Scalar(b))
            j += 1
            continue
        }
        if b >= 0x80 {
            // Try to decode one UTF-8 scalar.
            let len = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc2 ? 2 : 0
            if len > 0 && j + len <= arr.count,
                let s = String(validating: arr[j..<j + len], as: UTF8.self),
                let scalar = s.unicodeScalars.first, scalar.properties.generalCategory != .control
            {
                out += s
                j += len
                continue
            }
        }
        out += "\\x" + (b < 16 ? "0" : "") + String(b, radix: 16)
        j += 1
    }
    return out
}
