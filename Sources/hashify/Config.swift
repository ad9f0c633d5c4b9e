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
