import HashifyEngine
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The filter's per-directory shortcuts against an oracle that applies the
/// documented rule with plain `fnmatch` on whole paths: a directory is in when
/// an include matches it, or its parent is in and no exclude matches it; a file
/// is taken when an include matches it, or its directory is in and no exclude
/// matches it. Anchored patterns match the whole guest-absolute path
/// (`FNM_PATHNAME | FNM_PERIOD`), the others the last name.
@Suite("path filter equals an fnmatch oracle")
struct PathFilterTests {
    static func fnmatchBytes(_ pattern: [UInt8], _ s: [UInt8]) -> Bool {
        let p = pattern.map { CChar(bitPattern: $0) } + [0]
        let t = s.map { CChar(bitPattern: $0) } + [0]
        return fnmatch(p, t, FNM_PATHNAME | FNM_PERIOD) == 0
    }

    static func oracleMatches(_ patterns: [[UInt8]], _ path: [UInt8]) -> Bool {
        let name = Array(path[(path.lastIndex(of: 0x2f)! + 1)...])
        return patterns.contains { raw in
            var p = raw
            while p.count > 1 && p.last == 0x2f { p.removeLast() }
            return p.first == 0x2f ? fnmatchBytes(p, path) : fnmatchBytes(p, name)
        }
    }

    /// Whether the oracle takes the file at `components` (guest-absolute, the last one the file's name).
    static func oracle(excludes: [[UInt8]], includes: [[UInt8]], _ components: [[UInt8]]) -> Bool {
        var path: [UInt8] = []
        var parentIn = true
        for (i, c) in components.enumerated() {
            path += [0x2f] + c
            let isIn = oracleMatches(includes, path) || (parentIn && !oracleMatches(excludes, path))
            if i == components.count - 1 { return isIn }
            parentIn = isIn
        }
        return parentIn
    }

    /// What the filter decides for the same file, entering each directory as the walk does.
    static func filter(_ f: PathFilter, _ components: [[UInt8]]) -> Bool {
        var scope = f.rootScope
        var path: [UInt8] = []
        for (i, c) in components.enumerated() {
            path += [0x2f] + c
            let cName = c.map { CChar(bitPattern: $0) } + [0]
            let taken: Bool? = cName.withUnsafeBufferPointer { b in
                let name = PathFilter.Name(cString: b.baseAddress!, count: c.count)
                if i == components.count - 1 { return f.includesFile(in: scope, name, path: { path }) }
                scope = f.enter(scope, name, path: { path })
                return scope.verdict == .excluded ? false : nil
            }
            if let taken { return taken }
        }
        return false
    }

    /// Names that exercise the shortcuts: default-exclude names, a prefix of
    /// one (`/var` vs `/variant`), hidden names, names holding glob
    /// characters, and invalid UTF-8.
    static let names: [[UInt8]] =
        [
            "usr", "var", "variant", "etc", ".hidden", "lib", "x.pyc", "a*b", "[ab]", "b",
        ].map { Array($0.utf8) } + [[0xff, 0xfe, 0x2a], [0x61, 0x0a, 0x62]]

    static let paths: [[[UInt8]]] = {
        var all: [[[UInt8]]] = names.map { [$0] }
        for a in names { for b in names { all.append([a, b]) } }
        for a in names.prefix(6) { for b in names.prefix(6) { for c in names { all.append([a, b, c]) } } }
        return all
    }()

    /// (excludes, includes)
    static let cases: [([String], [String])] = [
        (PathFilter.defaultExcludes, []),
        (PathFilter.defaultExcludes, ["/var/lib"]),
        (PathFilter.defaultExcludes, ["*.pyc"]),
        (PathFilter.defaultExcludes + ["*.pyc"], ["/usr/lib"]),
        (["/usr/*"], ["/usr/lib/x.pyc"]),
        (["/*"], ["/etc/b", "/var"]),
        (["/var/"], ["/var/lib/"]),
        (["*"], ["b"]),
        (["/*/lib"], []),
        (["/u?r/l*", "/.hidden"], ["/usr/lib/.hidden"]),
        (["/.*"], []),
        (["/*/*"], ["/usr/[ab]"]),
        (["/[uv]*"], ["/usr/l[!x]b"]),
        (["/a\\*b", "a\\*b"], []),
        (["[ab]", "\\[ab]"], ["/etc/[ab]"]),
        (["/usr/[a/b]"], []),
        (["/usr\\/lib"], []),
        (["/"], []),
        (["x.pyc", "/etc/x.pyc"], ["/etc"]),
        (["/var/*/x.pyc"], ["/var/lib/*"]),
    ]

    @Test("shortcuts decide every path as fnmatch does", arguments: cases.indices)
    func matchesOracle(_ i: Int) {
        let (excludes, includes) = Self.cases[i]
        let ex = excludes.map { Array($0.utf8) }
        let inc = includes.map { Array($0.utf8) }
        let f = PathFilter(excludes: ex, includes: inc)
        var taken = 0
        for p in Self.paths {
            let expected = Self.oracle(excludes: ex, includes: inc, p)
            if expected { taken += 1 }
            #expect(
                Self.filter(f, p) == expected,
                "excludes \(excludes) includes \(includes) path /\(p.map { String(decoding: $0, as: UTF8.self) }.joined(separator: "/"))"
            )
        }
        #expect(taken > 0, "the case must take some path")
    }

    @Test("the default excludes are decided at the guest root: files below /usr need no match")
    func defaultsDecidedOnce() {
        let f = PathFilter(excludes: PathFilter.defaultExcludes.map { Array($0.utf8) }, includes: [])
        #expect(!f.rootScope.filesAlwaysIncluded)
        let usr = Array("usr".utf8CString)
        let scope = usr.withUnsafeBufferPointer {
            f.enter(f.rootScope, PathFilter.Name(cString: $0.baseAddress!, count: 3), path: { Array("/usr".utf8) })
        }
        #expect(scope.verdict == .included && scope.filesAlwaysIncluded)
    }
}
