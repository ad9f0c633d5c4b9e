#if canImport(Glibc)
import Glibc
#endif

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
        if ns < 0 {
            s -= 1
            ns += 1_000_000_000
        }
        self.init(seconds: s, nanoseconds: UInt32(ns))
    }

    public var description: String {
        let ns = String(nanoseconds)
        return "\(seconds).\(String(repeating: "0", count: 9 - ns.count))\(ns)"
    }
}

extension Timestamp {
    /// The wall clock now (`CLOCK_REALTIME`): for when something happened,
    /// never for how long it took (`MonotonicInstant`).
    public static func wallClockNow() -> Timestamp {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Timestamp(seconds: Int64(ts.tv_sec), nanoseconds: UInt32(ts.tv_nsec))
    }
}

/// A point on the monotonic clock (`CLOCK_MONOTONIC`), for durations: unlike
/// the wall clock it never jumps when the host's time is set.
public struct MonotonicInstant: Sendable {
    public let nanoseconds: Int64

    /// The monotonic clock now. The corresponding C function is `clock_gettime(CLOCK_MONOTONIC)`.
    public static func now() -> MonotonicInstant {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return MonotonicInstant(nanoseconds: Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec))
    }

    /// Seconds from this instant until now.
    public var secondsElapsed: Double { Double(Self.now().nanoseconds - nanoseconds) / 1e9 }
}
