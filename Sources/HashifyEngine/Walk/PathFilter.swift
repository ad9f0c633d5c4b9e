import HashifySystem

/// Decides which guest paths take part, from exclude and include patterns.
///
/// A pattern that starts with `/` is matched (glob, `*` not crossing `/`)
/// against the guest-absolute path and every ancestor of it, so `/var`
/// covers everything below `/var`. A pattern without `/` is matched against
/// each single name (`*.pyc`). Includes win over excludes; an excluded
/// directory is still searched when an include may match below it.
///
/// Matching is decided once per directory: an anchored pattern is split into
/// its components, and a directory's `Scope` keeps only the patterns whose
/// leading components match its path (a component without glob characters is
/// compared as bytes). A file is then matched only against the patterns whose
/// last component can name it, so in the usual case (every default exclude
/// decided at the guest root) a file costs nothing. The result is the same as
/// `fnmatch(pattern, path, FNM_PATHNAME | FNM_PERIOD)` on the whole path; the
/// rare pattern that cannot be split exactly (a `/` inside brackets or after a
/// backslash) is matched that way, on the whole path.
public struct PathFilter: Sendable {
    /// VServer's classic exclude list: trees that change at run time or hold
    /// host-specific or configuration state.
    public static let defaultExcludes: [String] = [
        "/dev", "/proc", "/sys", "/run", "/tmp", "/var", "/home", "/root",
        "/mnt", "/media", "/srv", "/boot", "/lost+found", "/etc",
    ]

    /// One glob over a single name (a component of an anchored pattern, or
    /// an unanchored pattern).
    struct NameGlob: Sendable {
        /// NUL-terminated, for `fnmatch`.
        var cPattern: [CChar]
        /// The bytes, when they hold no glob character (compared directly).
        var literal: [UInt8]?

        init(_ bytes: ArraySlice<UInt8>) {
            cPattern = bytes.map { CChar(bitPattern: $0) } + [0]
            literal = bytes.contains(where: PathFilter.isGlobCharacter) ? nil : Array(bytes)
        }

        func matches(_ name: Name) -> Bool {
            if let literal { return literal.elementsEqual(name.bytes) }
            return patternMatches(cPattern, name.cString, pathname: false)
        }
    }

    /// An anchored pattern split into components.
    struct Anchored: Sendable {
        var components: [NameGlob]
        var isInclude: Bool
    }

    /// A pattern matched on the whole path (anchored but not exactly splittable).
    struct WholePath: Sendable {
        var cPattern: [CChar]
        var isInclude: Bool
    }

    let anchored: [Anchored]
    let nameExcludes: [NameGlob]
    let nameIncludes: [NameGlob]
    let wholePath: [WholePath]

    /// A name as `getdents64` gives it: the bytes and the same bytes NUL-terminated.
    public struct Name {
        public var cString: UnsafePointer<CChar>
        public var bytes: UnsafeBufferPointer<UInt8>
        public init(cString: UnsafePointer<CChar>, count: Int) {
            self.cString = cString
            self.bytes = UnsafeBufferPointer(
                start: UnsafeRawPointer(cString).assumingMemoryBound(to: UInt8.self), count: count)
        }
    }

    /// Whether a directory is taken whole, only searched for includes, or skipped.
    public enum Verdict: Sendable { case included, searchOnly, excluded }

    /// What the filter knows of one directory: its verdict and the anchored
    /// patterns that may still match below it. Computed once per directory.
    public struct Scope: Sendable {
        public var verdict: Verdict
        var depth: Int
        /// Indices into `anchored` of the patterns with more than `depth`
        /// components whose first `depth` components match this directory.
        var alive: [Int32]
        /// True when every regular file directly inside is included without a match.
        public var filesAlwaysIncluded: Bool
        /// True when no file directly inside can be included.
        public var filesNeverIncluded: Bool
    }

    public init(excludes excludePatterns: [[UInt8]], includes includePatterns: [[UInt8]]) {
        var anchored: [Anchored] = []
        var nameExcludes: [NameGlob] = []
        var nameIncludes: [NameGlob] = []
        var wholePath: [WholePath] = []
        for (patterns, isInclude) in [(excludePatterns, false), (includePatterns, true)] {
            for raw in patterns {
                var p = raw
                while p.count > 1 && p.last == 0x2f { p.removeLast() }
                if p.first == 0x2f {
                    let parts = p.dropFirst().split(separator: 0x2f, omittingEmptySubsequences: false)
                    if parts.allSatisfy(Self.splitsExactly) {
                        anchored.append(Anchored(components: parts.map(NameGlob.init), isInclude: isInclude))
                    } else {
                        wholePath.append(
                            WholePath(cPattern: p.map { CChar(bitPattern: $0) } + [0], isInclude: isInclude))
                    }
                } else if isInclude {
                    nameIncludes.append(NameGlob(p[...]))
                } else {
                    nameExcludes.append(NameGlob(p[...]))
                }
            }
        }
        self.anchored = anchored
        self.nameExcludes = nameExcludes
        self.nameIncludes = nameIncludes
        self.wholePath = wholePath
    }

    static func isGlobCharacter(_ c: UInt8) -> Bool { c == 0x2a || c == 0x3f || c == 0x5b || c == 0x5c }

    /// Whether a component, cut at `/`, means what it meant inside the whole
    /// pattern: no bracket left open and no backslash escaping the cut.
    static func splitsExactly(_ part: ArraySlice<UInt8>) -> Bool {
        var i = part.startIndex
        while i < part.endIndex {
            switch part[i] {
            case 0x5c:
                if part.index(after: i) == part.endIndex { return false }
                i = part.index(i, offsetBy: 2)
                continue
            case 0x5b:
                // '[' must close within the component (']' right after '[' or '[!' is literal).
                var j = part.index(after: i)
                if j < part.endIndex && (part[j] == 0x21 || part[j] == 0x5e) { j = part.index(after: j) }
                if j < part.endIndex && part[j] == 0x5d { j = part.index(after: j) }
                while j < part.endIndex && part[j] != 0x5d { j = part.index(after: j) }
                if j == part.endIndex { return false }
                i = part.index(after: j)
                continue
            default:
                i = part.index(after: i)
            }
        }
        return true
    }

    /// The scope of a guest root.
    public var rootScope: Scope { scope(verdict: .included, depth: 0, alive: anchored.indices.map { Int32($0) }) }

    func scope(verdict: Verdict, depth: Int, alive: [Int32]) -> Scope {
        let anyFilePattern = !wholePath.isEmpty || alive.contains { anchored[Int($0)].components.count == depth + 1 }
        let always = verdict == .included && nameExcludes.isEmpty && nameIncludes.isEmpty && !anyFilePattern
        let never = verdict != .included && nameIncludes.isEmpty && !anyFilePattern
        return Scope(
            verdict: verdict, depth: depth, alive: alive, filesAlwaysIncluded: always, filesNeverIncluded: never)
    }

    /// Whether an include and whether an exclude match the entry `name`
    /// directly inside a directory of `scope` (`path`: its guest-absolute
    /// path, asked for only by whole-path patterns); for a directory
    /// (`isDirectory`), also the patterns still alive below it.
    func matchesHere(_ scope: Scope, _ name: Name, isDirectory: Bool, path: () -> [UInt8])
        -> (include: Bool, exclude: Bool, childAlive: [Int32])
    {
        var include = false
        var exclude = false
        var childAlive: [Int32] = []
        for i in scope.alive {
            let p = anchored[Int(i)]
            guard p.components[scope.depth].matches(name) else { continue }
            if p.components.count == scope.depth + 1 {
                if p.isInclude { include = true } else { exclude = true }
            } else if isDirectory {
                childAlive.append(i)
            }
        }
        if !include { include = nameIncludes.contains { $0.matches(name) } }
        if !exclude { exclude = nameExcludes.contains { $0.matches(name) } }
        if !wholePath.isEmpty {
            let full = path().map { CChar(bitPattern: $0) } + [0]
            for w in wholePath where patternMatches(w.cPattern, full, pathname: true) {
                if w.isInclude { include = true } else { exclude = true }
            }
        }
        return (include, exclude, childAlive)
    }

    /// The scope of the directory `name` inside a directory of `parent`
    /// (`path`: the child's guest-absolute path, built only when needed).
    public func enter(_ parent: Scope, _ name: Name, path: () -> [UInt8]) -> Scope {
        if parent.alive.isEmpty && nameIncludes.isEmpty && nameExcludes.isEmpty && wholePath.isEmpty {
            return scope(verdict: parent.verdict, depth: parent.depth + 1, alive: [])  // nothing can match below
        }
        let (include, exclude, childAlive) = matchesHere(parent, name, isDirectory: true, path: path)
        let depth = parent.depth + 1
        if include { return scope(verdict: .included, depth: depth, alive: childAlive) }
        if parent.verdict != .searchOnly && !exclude {
            return scope(verdict: .included, depth: depth, alive: childAlive)
        }
        // Excluded: still searched while an include may match below.
        let includeBelow =
            !nameIncludes.isEmpty || wholePath.contains(where: \.isInclude)
            || childAlive.contains { anchored[Int($0)].isInclude }
        return scope(verdict: includeBelow ? .searchOnly : .excluded, depth: depth, alive: childAlive)
    }

    /// Whether the regular file `name` in a directory of `scope` takes part.
    public func includesFile(in scope: Scope, _ name: Name, path: () -> [UInt8]) -> Bool {
        if scope.filesAlwaysIncluded { return true }
        if scope.filesNeverIncluded { return false }
        let (include, exclude, _) = matchesHere(scope, name, isDirectory: false, path: path)
        if include { return true }
        return scope.verdict == .included && !exclude
    }
}
