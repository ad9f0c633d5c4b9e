import ArgumentParser
import HashifyEngine
import SystemPackage

/// `--config FILE`: the host's settings (`/etc/hashify/hashify.toml` when it exists).
struct ConfigOption: ParsableArguments {
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Read settings from FILE (default: /etc/hashify/hashify.toml, when it exists).", valueName: "file"))
    var config: String?

    /// The settings, read once per command; a bad file ends the command with
    /// its file, line and what is wrong (status 2).
    func load() -> HostSettings {
        HostSettings(config: runEngine { try HashifyConfig.load(config.map { FilePath($0) }) })
    }
}

/// `--store DIR`, the same for every command that uses a store.
struct StoreOption: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            """
            The store (default: the config's, else the .hashify store at or above the guests that knows them, \
            else .hashify in their nearest common parent; on the guests' filesystem).
            """, valueName: "dir"))
    var store: String?
}

/// `--no-wait`, the same for every command that takes the store's lock.
struct WaitOption: ParsableArguments {
    @Flag(help: "Exit with status 3 instead of waiting when another run holds the store.")
    var noWait = false

    var waitForLock: Bool { !noWait }
}

/// What a command takes from the config file (absent: the defaults).
struct HostSettings {
    let config: HashifyConfig?

    /// The store the command line gives, else the config's.
    func store(_ given: String?) -> FilePath? { given.map { FilePath($0) } ?? config?.store }

    /// The names of the host's guests, for the report.
    var names: GuestNames { config.guestNames() }
}

/// Where the managers keep their guests, for the commands that find them
/// (`unify --all`, and `status`, `mem` and `manifest` given no guest).
struct DiscoveryPlaces: ParsableArguments {
    @Option(help: "An LXC lxcpath to search for guests (repeatable; given, it replaces the default places).")
    var lxcpath: [String] = []
    @Option(help: "The nspawn machines directory to search (given, it replaces the default places).")
    var machines: String?

    var given: Bool { !lxcpath.isEmpty || machines != nil }

    /// The places to search: the config's (or the managers' defaults), or the ones given here alone.
    func places(_ config: HashifyConfig?) -> GuestDiscovery.Places {
        var places = config?.places ?? GuestDiscovery.Places()
        if given {
            places.lxcPaths = lxcpath.map { FilePath($0) }
            places.machines = FilePath(machines ?? "/nonexistent")
            places.incusPools = []
        }
        return places
    }
}

/// The host's guests as `unify --all` finds them: the config's, then (with
/// `discover`) those of LXC, nspawn and Incus/LXD dir pools that hashify can
/// use, with the store they share (the one given, the config's, or their default).
struct HostGuests {
    var roots: [FilePath]
    var store: FilePath?
    var discovered: [GuestDiscovery.Found]
    var names: GuestNames

    init(
        host: HostSettings, given: [FilePath], store given_store: String?, discover: Bool, places: DiscoveryPlaces,
        mode: HashifyConfig.Mode? = nil
    ) {
        let config = host.config
        var roots = given
        if roots.isEmpty, let config { roots = config.namedRoots.map(\.root) }
        store = host.store(given_store)
        discovered = []
        if discover {
            discovered = GuestDiscovery.find(places.places(config))
            let candidates = discovered.filter { $0.unusable == nil }.map { FilePath($0.root) }
            let discoveredStore = store ?? (candidates.isEmpty ? nil : RootValidation.defaultStorePath(for: candidates))
            let overlays = discoveredStore.map { Overlay.overlayGuests(among: candidates, storePath: $0) } ?? []
            let found = GuestDiscovery.usable(
                &discovered, store: discoveredStore, overlayGuests: overlays, mode: mode ?? config?.mode ?? .hardlink)
            roots += found.filter { !roots.contains($0) }
        }
        self.roots = roots
        names = config.guestNames(found: discover ? discovered : nil)
    }
}

extension HostGuests {
    /// The guests a report (`status`, `mem`) looks at: those given; with
    /// `--store` alone, the store's own (nil roots: the store says); else
    /// the host's as `unify --all` finds them (the config's guests, and
    /// discovery unless the config names guests without `all`).
    static func forReport(host: HostSettings, roots: [String], store: String?, places: DiscoveryPlaces) -> HostGuests {
        let storeOnly = roots.isEmpty && store != nil && !places.given
        // A config that names no guests (it sets the store, say) leaves them to discovery.
        let discover =
            roots.isEmpty && !storeOnly
            && (host.config.map { $0.all || $0.namedRoots.isEmpty } ?? true || places.given)
        var found = HostGuests(
            host: host, given: roots.map { FilePath($0) }, store: store, discover: discover, places: places)
        if storeOnly { found.roots = [] }
        return found
    }
}

extension Optional where Wrapped == HashifyConfig {
    /// The names of the host's guests: those of the container managers
    /// (`found`, when the command discovered them already; else looked up at
    /// the configured places) and the config's own entries.
    func guestNames(found: [GuestDiscovery.Found]? = nil) -> GuestNames {
        let managed = found ?? GuestDiscovery.find(self?.places ?? GuestDiscovery.Places())
        var names = GuestNames(managed.map { ($0.name, FilePath($0.root)) })
        for (name, root) in self?.namedRoots ?? [] { if let name { names.add(name, root: root) } }
        return names
    }
}

extension HashifyConfig.Mode: ExpressibleByArgument {}

/// The report with its guests named as the host knows them.
func named<R>(_ report: R, _ names: GuestNames) -> R {
    guard var n = report as? any GuestNaming else { return report }
    n.name(names)
    return n as! R
}
