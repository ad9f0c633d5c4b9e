import HashifySystem
import SystemPackage

/// Why a file or directory was left alone in this run.
public enum SkipReason: Hashable, Sendable, CustomStringConvertible {
    /// An operation failed (counts as an error: exit status 1): the kernel
    /// refused it (`errno`), or another error stopped it (`detail`).
    case failed(OperationError)
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
        case .failed(let e): return e.operation.code + "-failed"
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
        case .failed(let e): return e.description
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

/// What hashify was doing when an error stopped it. Its `code` names it in
/// `--json` (`CODE-failed`), and stays as it is once published.
public enum Operation: String, Sendable, Hashable, Codable {
    case openDirectory = "open directory"
    case readDirectory = "read directory"
    case stat, open, read, lease
    case linkIntoStore = "link into store"
    case linkTemporary = "link temporary name"
    case exchange
    case removeReplaced = "remove replaced file"
    case split
    case cleanUp = "clean up"
    case copy

    /// The operation as one word or words joined by '-'.
    public var code: String { rawValue.replacingOccurrences(of: " ", with: "-") }
}

/// An error with its place in the work: the operation it stopped and the
/// errno when the kernel refused it; any other error keeps its own words in
/// `detail` (never passed off as an errno). The path is the skip's.
public struct OperationError: Error, Hashable, Sendable, CustomStringConvertible {
    public var operation: Operation
    public var errno: Int32?
    public var detail: String

    public init(_ operation: Operation, _ error: any Error) {
        if let e = error as? OperationError {
            self = e
        } else if let e = error as? Errno {
            self.operation = operation
            self.errno = e.rawValue
            self.detail = "\(e)"
        } else {
            self.operation = operation
            self.errno = nil
            self.detail = "\(error)"
        }
    }

    public var description: String { "\(operation.rawValue): \(detail)" }
}

/// Runs `body`; an error it throws is given `operation` (unless it has one already).
func attempt<T>(_ operation: Operation, _ body: () throws -> T) throws(OperationError) -> T {
    do { return try body() } catch { throw OperationError(operation, error) }
}

/// The errno of an error, when the kernel refused something (nil for any other error).
func errnoCode(_ error: any Error) -> Errno? {
    (error as? Errno) ?? (error as? OperationError)?.errno.map { Errno(rawValue: $0) }
}

extension Errno {
    /// The errors that say a path changed under the run (it vanished, became a
    /// symlink or a non-directory, or its inode went): the next run retries it.
    var meansChangedDuringRun: Bool {
        [.noSuchFileOrDirectory, .tooManySymbolicLinkLevels, .notDirectory, .staleNFSFileHandle].contains(self)
    }
}
