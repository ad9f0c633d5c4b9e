/// A point in time with nanosecond precision, as the kernel stores inode times.
public struct Timestamp: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var seconds: Int64
    public var nanoseconds: UInt32

    public init(seconds: Int64, nanoseconds: UInt32) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }

    public static func < (a: Timestamp, b: Timestamp) -> Bool {
        a.seconds != b.seconds ? a.seconds < b.seconds : a.nanoseconds < b.nanoseconds
    }

    /// Nanoseconds since the epoch (fits Int64 until 2262).
    public var totalNanoseconds: Int64 { seconds &* 1_000_000_000 &+ Int64(nanoseconds) }

    public init(totalNanoseconds n: Int64) {
        var s = n / 1_000_000_000
        var ns = n % 1_000_000_000
        if ns < 0 { s -= 1; ns += 1_000_000_000 }
        self.init(seconds: s, nanoseconds: UInt32(ns))
    }

    public var description: String {
        let ns = String(nanoseconds)
        return "\(seconds).\(String(repeating: "0", count: 9 - ns.count))\(ns)"
    }
}
