import HashifySystem
import SystemPackage

/// Why a file or directory was left alone in this run.
public enum SkipReason: Hashable, Sendable, CustomStringConvertible {
    /// The kernel refused an operation (counts as an error: exit status 1).
    case failed(operation: String, errno: Int32)
    /// Changed after it was read (or while): retried by the next run.
    case changedDuringRun
    /// Someone has it open for writing (the read lease was refused).
    case openForWriting
    /// It has hard links outside the scanned roots.
    case linksOutsideRoots
    /// Immutable or append-only inode flag.
    case immutableOrAppendOnly
    /// A mount point inside a guest: not crossed.
    case mountPoint
    /// A temporary name that holds data of unknown origin: kept, never deleted.
    case unknownTemporary

    /// Whether this skip makes the run exit with status 1.
    public var isError: Bool {
        if case .failed = self { return true }
        if case .unknownTemporary = self { return true }
        return false
    }

    /// Stable machine-readable code, used in --json.
    public var code: String {
        switch self {
        case .failed(let op, _): return "\(op)-failed"
        case .changedDuringRun: return "changed-during-run"
        case .openForWriting: return "open-for-writing"
        case .linksOutsideRoots: return "links-outside-roots"
        case .immutableOrAppendOnly: return "immutable"
        case .mountPoint: return "mount-point"
        case .unknownTemporary: return "unknown-temporary"
        }
    }

    public var description: String {
        switch self {
        case .failed(let op, let e): return "\(op): \(Errno(rawValue: e))"
        case .changedDuringRun: return "changed during the run (retried next run)"
        case .openForWriting: return "open for writing (retried next run)"
        case .linksOutsideRoots: return "has hard links outside the scanned roots"
        case .immutableOrAppendOnly: return "immutable or append-only"
        case .mountPoint: return "mount point (not crossed)"
        case .unknownTemporary: return "temporary name holding unknown data (kept)"
        }
    }
}

/// One skipped path: guest index, guest-absolute path bytes and the reason.
public struct Skip: Sendable {
    public var guest: Int
    public var path: [UInt8]
    public var reason: SkipReason
}

func errnoCode(_ error: any Error) -> Int32 {
    (error as? Errno)?.rawValue ?? 5
}
