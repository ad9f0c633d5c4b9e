import SystemPackage

/// The names guests are known by (`lxc:web1`, `nspawn:build`, a config
/// entry's name), by root: reports show a guest's name instead of its path
/// wherever one is known, and keep the path in `--json` beside it.
public struct GuestNames: Sendable {
    private var byRoot: [String: String] = [:]
    private var named: [(name: String, root: FilePath)] = []

    public init(_ pairs: [(name: String, root: FilePath)] = []) {
        for (name, root) in pairs { add(name, root: root) }
    }

    public mutating func add(_ name: String, root: FilePath) {
        named.append((name, root))
        byRoot[root.lexicallyNormalized().string] = name
        if let c = RootValidation.canonical(root) { byRoot[c.string] = name }
    }

    public var isEmpty: Bool { byRoot.isEmpty }

    /// The root of the guest called `name` (`lxc:web1`, or `web1` when one manager alone has it).
    public func root(named name: String) -> FilePath? {
        if let exact = named.last(where: { $0.name == name }) { return exact.root }
        let bare = named.filter { $0.name.split(separator: ":", maxSplits: 1).last.map(String.init) == name }
        return Set(bare.map(\.root)).count == 1 ? bare[0].root : nil
    }

    /// The name of the guest at `root` (as a report prints it), if it has one.
    public func name(of root: String) -> String? {
        if let n = byRoot[root] { return n }
        let p = FilePath(root)
        if let n = byRoot[p.lexicallyNormalized().string] { return n }
        return RootValidation.canonical(p).flatMap { byRoot[$0.string] }
    }
}

/// A report whose guests can be given their names.
public protocol GuestNaming {
    mutating func name(_ names: GuestNames)
}

/// Looks each root up once.
private struct NameCache {
    let names: GuestNames
    var seen: [String: String?] = [:]
    mutating func callAsFunction(_ root: String) -> String? {
        if let n = seen[root] { return n }
        let n = names.name(of: root)
        seen[root] = n
        return n
    }
}

extension UnifyReport: GuestNaming {
    public mutating func name(_ names: GuestNames) {
        var cache = NameCache(names: names)
        for i in guests.indices { guests[i].guest = cache(guests[i].root) }
        for i in skipped.indices { skipped[i].guest = cache(skipped[i].root) }
        for i in overlayGuests.indices { overlayGuests[i].guest = cache(overlayGuests[i].root) }
        for i in notLinked.indices { notLinked[i].guest = cache(notLinked[i].root) }
    }
}

extension StatusReport: GuestNaming {
    public mutating func name(_ names: GuestNames) {
        var cache = NameCache(names: names)
        for i in guests.indices { guests[i].guest = cache(guests[i].root) }
        for i in notLinked.indices { notLinked[i].guest = cache(notLinked[i].root) }
        if overlay != nil {
            for i in overlay!.guests.indices { overlay!.guests[i].guest = cache(overlay!.guests[i].root) }
        }
        for i in sharingBreakers.indices { sharingBreakers[i].guest = cache(sharingBreakers[i].root) }
    }
}

extension VerifyReport: GuestNaming {
    public mutating func name(_ names: GuestNames) {
        var cache = NameCache(names: names)
        for d in damaged.indices {
            for p in damaged[d].paths.indices { damaged[d].paths[p].guest = cache(damaged[d].paths[p].root) }
        }
        for i in skipped.indices { skipped[i].guest = cache(skipped[i].root) }
    }
}

/// A report whose only guest references are its skipped paths.
protocol SkipListing: GuestNaming {
    var skipped: [UnifyReport.SkippedPath] { get set }
}

extension SkipListing {
    public mutating func name(_ names: GuestNames) {
        var cache = NameCache(names: names)
        for i in skipped.indices { skipped[i].guest = cache(skipped[i].root) }
    }
}

extension GCReport: SkipListing {}
extension SplitReport: SkipListing {}

extension OverlayReport: GuestNaming {
    public mutating func name(_ names: GuestNames) {
        var cache = NameCache(names: names)
        for i in guests.indices { guests[i].guest = cache(guests[i].root) }
    }
}

extension MemoryReport: GuestNaming {
    public mutating func name(_ names: GuestNames) {
        var cache = NameCache(names: names)
        for i in guests.indices { if let n = cache(guests[i].guest) { guests[i].guest = n } }
        for i in processesToRestart.indices {
            if let n = cache(processesToRestart[i].guest) { processesToRestart[i].guest = n }
        }
    }
}

extension UnifyReport.Guest {
    /// The guest's name, or its root.
    public var label: String { guest ?? root }
}

extension UnifyReport.SkippedPath {
    /// `NAME:/path` for a named guest, the host path otherwise.
    public var location: String { guest.map { "\($0):\(path)" } ?? root + path }
}

extension OverlayReport.Guest {
    public var label: String { guest ?? root }
}

extension OverlayStatus.Guest {
    public var label: String { guest ?? root }
}

extension CloneReport: GuestNaming {
    public mutating func name(_ names: GuestNames) { sourceGuest = names.name(of: source) }
}

extension KSM.Status: GuestNaming {
    public mutating func name(_ names: GuestNames) {
        var cache = NameCache(names: names)
        for i in guests.indices { if let n = cache(guests[i].guest) { guests[i].guest = n } }
    }
}
