import HashifySystem
import SystemPackage
import TOMLKit

/// The host's settings for hashify, read from `/etc/hashify/hashify.toml`
/// (or `--config FILE`): the store, the mode, where the guests are, the
/// excludes and includes (global and per guest), the minimum size and the
/// threads. Command-line options override it. A file that does not parse or
/// holds an unknown key, a value of the wrong type or a relative path is
/// refused with its file, line and what is wrong, before anything changes.
public struct HashifyConfig: Sendable {
    /// Where the config is read from when `--config` is not given.
    public static let defaultPath = FilePath("/etc/hashify/hashify.toml")

    /// How `unify` shares the files of plain guests.
    public enum Mode: String, Sendable, CaseIterable {
        /// Hard links to store objects (guests stay plain directories).
        case hardlink
        /// Stopped plain guests are converted to overlay guests; running ones wait for a later run.
        case overlay
    }

    /// Settings of one guest (`[guest.NAME]`).
    public struct Guest: Sendable, Equatable {
        /// A guest no container manager knows, given by its root.
        public var root: FilePath?
        public var excludes: [[UInt8]] = []
        public var includes: [[UInt8]] = []
        /// `trust-root`: hardlink mode links this guest even though its root is
        /// not the host's root (true), or never trusts it (false); nil: `trust-guest-roots` decides.
        public var trustRoot: Bool?
    }

    /// The file the settings came from.
    public var file: FilePath?
    public var store: FilePath?
    public var mode: Mode = .hardlink
    public var threads: Int?
    public var minimumSize: UInt64?
    public var defaultExcludes: Bool?
    public var ignoreModificationTime: Bool?
    /// `trust-guest-roots`: hardlink mode links guests whose root is not the
    /// host's root (unprivileged containers) as if it were.
    public var trustGuestRoots: Bool?
    public var excludes: [[UInt8]] = []
    public var includes: [[UInt8]] = []
    /// `[guests] all`: every guest of the container managers (as `unify --all`).
    public var all = false
    public var lxcPaths: [FilePath]?
    public var machines: FilePath?
    public var incusPools: [FilePath]?
    /// `[guests] roots`: more guest roots, by path.
    public var roots: [FilePath] = []
    /// Per-guest settings by name: `web1` or `lxc:web1` (the name `--all` reports).
    public var guests: [String: Guest] = [:]

    public init() {}

    /// Reads the config at `path`; nil when `path` is the default and no file
    /// is there, and when the file sets nothing (all comments, as the example
    /// the Debian package installs): hashify then runs exactly as without one.
    public static func load(_ path: FilePath?) throws -> HashifyConfig? {
        let file = path ?? defaultPath
        let bytes: [UInt8]
        do {
            switch try OpenFile.readSmallFile(path: Array(file.string.utf8), limit: 1 << 20) {
            case .success(let b): bytes = b
            case .failure(let why): throw InputError("\(file): \(why) (a config file is TOML text)")
            }
        } catch let e as InputError {
            throw e
        } catch Errno.noSuchFileOrDirectory where path == nil {
            return nil
        } catch {
            throw InputError("\(file): \(error)")
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw InputError("\(file): not UTF-8 text (TOML files are UTF-8)")
        }
        let table = try document(text, file: file.string)
        if table.isEmpty { return nil }
        var config = try Reader(text: text, file: file.string).config(table)
        config.file = file
        return config
    }

    /// Parses TOML text; errors name `file` and the line.
    public static func parse(_ text: String, file: String) throws -> HashifyConfig {
        try Reader(text: text, file: file).config(document(text, file: file))
    }

    /// The TOML document of `text`; errors name `file` and the line.
    private static func document(_ text: String, file: String) throws -> TOMLTable {
        do {
            return try TOMLTable(string: text)
        } catch let e as TOMLParseError {
            throw InputError("\(file):\(e.source.begin.line): \(e.description)")
        } catch {
            throw InputError("\(file): \(error)")
        }
    }

    /// The guest settings for a guest named `name` (`lxc:web1`) or rooted at `root`.
    public func guest(named name: String?, root: FilePath) -> Guest? {
        if let name {
            if let g = guests[name] { return g }
            if let colon = name.firstIndex(of: ":"), let g = guests[String(name[name.index(after: colon)...])] {
                return g
            }
        }
        return guests.values.first { $0.root == root }
    }

    /// The places `--all` searches, as configured (the managers' defaults for what is not).
    public var places: GuestDiscovery.Places {
        var p = GuestDiscovery.Places()
        if let l = lxcPaths { p.lxcPaths = l }
        if let m = machines { p.machines = m }
        if let i = incusPools { p.incusPools = i }
        return p
    }

    /// Whose roots hardlink mode trusts: `trust-guest-roots` for all, and
    /// each `[guest.NAME] trust-root`, its guest found by `root` or by name in `names`.
    public func rootTrust(names: GuestNames) -> RootTrustPolicy {
        var p = RootTrustPolicy()
        p.trustAll = trustGuestRoots ?? false
        for (name, g) in guests {
            guard let trusted = g.trustRoot, let root = g.root ?? names.root(named: name) else { continue }
            p.byRoot[RootValidation.canonical(root) ?? root] = trusted
        }
        return p
    }

    /// Roots the config names by path: `[guests] roots` and every `[guest.NAME] root`, with their names.
    public var namedRoots: [(name: String?, root: FilePath)] {
        roots.map { (nil, $0) } + guests.sorted { $0.key < $1.key }.compactMap { g in g.value.root.map { (g.key, $0) } }
    }
}

/// Turns a parsed TOML table into settings, checking every key and type.
private struct Reader {
    let file: String
    let lines: [Substring]

    init(text: String, file: String) {
        self.file = file
        lines = text.split(separator: "\n", omittingEmptySubsequences: false)
    }

    func config(_ t: TOMLTable) throws -> HashifyConfig {
        var c = HashifyConfig()
        try known(
            t, at: [],
            [
                "store", "mode", "threads", "min-size", "default-excludes", "ignore-mtime", "exclude", "include",
                "trust-guest-roots", "guests", "guest",
            ])
        c.store = try path(t, "store", at: [])
        if let m = try string(t, "mode", at: []) {
            guard let mode = HashifyConfig.Mode(rawValue: m) else {
                throw fault(
                    at: [], "mode",
                    "must be \(HashifyConfig.Mode.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: " or ")), not \"\(m)\""
                )
            }
            c.mode = mode
        }
        if let n = try integer(t, "threads", at: []) {
            guard n >= 1 && n <= 256 else { throw fault(at: [], "threads", "must be from 1 to 256, not \(n)") }
            c.threads = n
        }
        if let n = try integer(t, "min-size", at: []) {
            guard n >= 1 else {
                throw fault(at: [], "min-size", "must be at least 1 (empty files are never linked), not \(n)")
            }
            c.minimumSize = UInt64(n)
        }
        c.defaultExcludes = try bool(t, "default-excludes", at: [])
        c.ignoreModificationTime = try bool(t, "ignore-mtime", at: [])
        c.trustGuestRoots = try bool(t, "trust-guest-roots", at: [])
        c.excludes = try patterns(t, "exclude", at: [])
        c.includes = try patterns(t, "include", at: [])
        if let g = try table(t, "guests", at: []) {
            let at = ["guests"]
            try known(g, at: at, ["all", "lxcpath", "machines", "incus-pools", "roots"])
            c.all = try bool(g, "all", at: at) ?? false
            c.lxcPaths = try paths(g, "lxcpath", at: at)
            c.machines = try path(g, "machines", at: at)
            c.incusPools = try paths(g, "incus-pools", at: at)
            c.roots = try paths(g, "roots", at: at) ?? []
        }
        if let guests = try table(t, "guest", at: []) {
            for name in guests.keys.sorted() {
                let at = ["guest", name]
                guard let g = try table(guests, name, at: ["guest"]) else { continue }
                try known(g, at: at, ["root", "exclude", "include", "trust-root"])
                c.guests[name] = HashifyConfig.Guest(
                    root: try path(g, "root", at: at),
                    excludes: try patterns(g, "exclude", at: at),
                    includes: try patterns(g, "include", at: at),
                    trustRoot: try bool(g, "trust-root", at: at))
            }
        }
        return c
    }

    // MARK: typed look-ups

    func known(_ t: TOMLTable, at table: [String], _ keys: Set<String>) throws {
        for k in t.keys.sorted() where !keys.contains(k) {
            let expected = keys.sorted().joined(separator: ", ")
            throw fault(
                at: table, k,
                "unknown key (\(table.isEmpty ? "top level" : "[\(table.joined(separator: "."))]") takes \(expected))")
        }
    }

    func value(_ t: TOMLTable, _ key: String, at table: [String], _ type: TOMLType, _ what: String) throws -> (
        any TOMLValueConvertible
    )? {
        guard let v = t[key] else { return nil }
        if v.type != type { throw fault(at: table, key, "must be \(what), not \(Reader.article(v.type))") }
        return v
    }

    func string(_ t: TOMLTable, _ key: String, at table: [String]) throws -> String? {
        try value(t, key, at: table, .string, "a string")?.string
    }

    func integer(_ t: TOMLTable, _ key: String, at table: [String]) throws -> Int? {
        try value(t, key, at: table, .int, "an integer")?.int
    }

    func bool(_ t: TOMLTable, _ key: String, at table: [String]) throws -> Bool? {
        try value(t, key, at: table, .bool, "true or false")?.bool
    }

    func table(_ t: TOMLTable, _ key: String, at table: [String]) throws -> TOMLTable? {
        try value(t, key, at: table, .table, "a table")?.table
    }

    func strings(_ t: TOMLTable, _ key: String, at table: [String]) throws -> [String]? {
        guard let a = try value(t, key, at: table, .array, "an array of strings")?.array else { return nil }
        return try a.map { v in
            guard let s = v.string else {
                throw fault(at: table, key, "must be an array of strings, but holds \(Reader.article(v.type))")
            }
            return s
        }
    }

    func patterns(_ t: TOMLTable, _ key: String, at table: [String]) throws -> [[UInt8]] {
        let list = try strings(t, key, at: table) ?? []
        if list.contains("") { throw fault(at: table, key, "holds an empty pattern") }
        return list.map { Array($0.utf8) }
    }

    func absolute(_ s: String, _ key: String, at table: [String]) throws -> FilePath {
        guard s.hasPrefix("/") else { throw fault(at: table, key, "must be an absolute path, not \"\(s)\"") }
        return FilePath(s).lexicallyNormalized()
    }

    func path(_ t: TOMLTable, _ key: String, at table: [String]) throws -> FilePath? {
        guard let s = try string(t, key, at: table) else { return nil }
        return try absolute(s, key, at: table)
    }

    func paths(_ t: TOMLTable, _ key: String, at table: [String]) throws -> [FilePath]? {
        guard let list = try strings(t, key, at: table) else { return nil }
        return try list.map { try absolute($0, key, at: table) }
    }

    // MARK: where in the file

    /// An error naming the file, the line of `key` in `table` (when found) and what is wrong.
    func fault(at table: [String], _ key: String, _ message: String) -> InputError {
        let name = (table + [key]).map(Reader.quotedIfNeeded).joined(separator: ".")
        if let line = line(of: key, in: table) { return InputError("\(file):\(line): \(name): \(message)") }
        return InputError("\(file): \(name): \(message)")
    }

    /// "a string", "an integer".
    static func article(_ t: TOMLType) -> String {
        let name = "\(t)"
        return ("aeiou".contains(name.first ?? "x") ? "an " : "a ") + name
    }

    static func quotedIfNeeded(_ k: String) -> String {
        k.allSatisfy { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" } && !k.isEmpty ? k : "\"\(k)\""
    }

    /// The first line that defines `key` in `[table]` (or the table header itself).
    func line(of key: String, in table: [String]) -> Int? {
        var current: [String] = []
        var headerLine: Int?
        for (i, raw) in lines.enumerated() {
            let l = raw.trimmingCharacters(in: " \t\r")
            if l.hasPrefix("[") {
                let inner = l.drop { $0 == "[" }.prefix { $0 != "]" }
                current = Reader.splitKey(String(inner))
                if current == table + [key] { return i + 1 }
                if current == table { headerLine = i + 1 }
                continue
            }
            guard current == table, let eq = l.firstIndex(of: "=") else { continue }
            let k = Reader.splitKey(String(l[..<eq]))
            if k.first == key { return i + 1 }
        }
        return headerLine
    }

    /// `a."b.c".d` → ["a", "b.c", "d"] (whitespace and quotes removed).
    static func splitKey(_ s: String) -> [String] {
        var parts: [String] = []
        var cur = ""
        var quote: Character?
        for ch in s {
            if let q = quote {
                if ch == q { quote = nil } else { cur.append(ch) }
            } else if ch == "\"" || ch == "'" {
                quote = ch
            } else if ch == "." {
                parts.append(cur)
                cur = ""
            } else if ch != " " && ch != "\t" {
                cur.append(ch)
            }
        }
        parts.append(cur)
        return parts
    }
}

extension StringProtocol {
    func trimmingCharacters(in set: String) -> Substring {
        let s = self[...]
        guard let start = s.firstIndex(where: { !set.contains($0) }) else { return "" }
        let end = s.lastIndex(where: { !set.contains($0) })!
        return Substring(s[start...end])
    }
}
