import HashifySystem
#if canImport(Glibc)
import Glibc
#endif

/// Decides which guest paths take part, from exclude and include patterns.
///
/// A pattern that starts with `/` is matched (glob, `*` not crossing `/`)
/// against the guest-absolute path and every ancestor of it, so `/var`
/// covers everything below `/var`. A pattern without `/` is matched against
/// each single name (`*.pyc`). Includes win over excludes; an excluded
/// directory is still searched when an include may match below it.
public struct PathFilter: Sendable {
    /// VServer's classic exclude list: trees that change at run time or hold
    /// host-specific or configuration state.
    public static let defaultExcludes: [String] = [
        "/dev", "/proc", "/sys", "/run", "/tmp", "/var", "/home", "/root",
        "/mnt", "/media", "/srv", "/boot", "/lost+found", "/etc",
    ]

    struct Pattern: Sendable {
        var bytes: [UInt8]
        var anchored: Bool
        /// The part before the first glob character.
        var literalPrefix: [UInt8]
    }

    var excludes: [Pattern]
    var includes: [Pattern]

    public init(excludes excludePatterns: [[UInt8]], includes includePatterns: [[UInt8]]) {
        self.excludes = excludePatterns.map { Self.makePattern($0) }
        self.includes = includePatterns.map { Self.makePattern($0) }
    }

    static func makePattern(_ b: [UInt8]) -> Pattern {
        var p = b
        while p.count > 1 && p.last == 0x2f { p.removeLast() }
        let anchored = p.first == 0x2f
        let firstGlob = p.firstIndex { $0 == 0x2a || $0 == 0x3f || $0 == 0x5b || $0 == 0x5c } ?? p.count
        return Pattern(bytes: p, anchored: anchored, literalPrefix: Array(p[0..<firstGlob]))
    }

    /// Whether a directory is taken whole, only searched for includes, or skipped.
    public enum Verdict: Sendable { case included, searchOnly, excluded }

    static func matches(_ p: Pattern, path: [UInt8], name: ArraySlice<UInt8>) -> Bool {
        if p.anchored {
            return fnmatchBytes(p.bytes, path)
        }
        return fnmatchBytes(p.bytes, Array(name))
    }

    static func fnmatchBytes(_ pattern: [UInt8], _ s: [UInt8]) -> Bool {
        withCName(pattern) { pp in withCName(s) { sp in fnmatch(pp, sp, FNM_PATHNAME | FNM_PERIOD) == 0 } }
    }

    /// An include that could match something strictly below `dir`.
    func includeMayMatchBelow(_ dir: [UInt8]) -> Bool {
        for p in includes {
            if !p.anchored { return true }
            let prefix = p.literalPrefix
            // the include's fixed part lies below dir, or dir lies below the fixed part
            if prefix.count > dir.count {
                if prefix.starts(with: dir) && (dir == [0x2f] || prefix[dir.count] == 0x2f) { return true }
            } else if dir.starts(with: prefix) {
                return true
            }
        }
        return false
    }

    /// Verdict for a directory at `path` (guest-absolute) whose parent had `parent`.
    public func directoryVerdict(path: [UInt8], nameStart: Int, parent: Verdict) -> Verdict {
        let name = path[nameStart...]
        if includes.contains(where: { Self.matches($0, path: path, name: name) }) { return .included }
        let excluded = parent == .searchOnly || excludes.contains(where: { Self.matches($0, path: path, name: name) })
        if !excluded { return .included }
        return includeMayMatchBelow(path) ? .searchOnly : .excluded
    }

    /// Whether a file at `path` in a directory with verdict `parent` takes part.
    public func fileIncluded(path: [UInt8], nameStart: Int, parent: Verdict) -> Bool {
        let name = path[nameStart...]
        if includes.contains(where: { Self.matches($0, path: path, name: name) }) { return true }
        if parent != .included { return false }
        return !excludes.contains(where: { Self.matches($0, path: path, name: name) })
    }

    public var isTrivial: Bool { excludes.isEmpty && includes.isEmpty }
}
