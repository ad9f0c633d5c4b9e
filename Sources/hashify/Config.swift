import ArgumentParser
import HashifyEngine
import SystemPackage

/// `--config FILE`: the host's settings (`/etc/hashify/hashify.toml` when it exists).
struct ConfigOption: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Read settings from FILE (default: /etc/hashify/hashify.toml, when it exists).", valueName: "file"))
    var config: String?

    /// The settings; a bad file ends the command with its file, line and what is wrong (status 2).
    var settings: HashifyConfig? { runEngine { try HashifyConfig.load(config.map { FilePath($0) }) } }

    /// The store the config names, unless the command line gives one.
    func store(_ given: String?) -> FilePath? { given.map { FilePath($0) } ?? settings?.store }
}

extension HashifyConfig {
    /// The names of the host's guests: the container managers' (at the configured places) and the config's own entries.
    var guestNames: GuestNames {
        var names = GuestNames.discover(places)
        for (name, root) in namedRoots { if let name { names.add(name, root: root) } }
        return names
    }
}

extension Optional where Wrapped == HashifyConfig {
    var guestNames: GuestNames { self?.guestNames ?? GuestNames.discover(GuestDiscovery.Places()) }
}

extension HashifyConfig.Mode: ExpressibleByArgument {}

/// The report with its guests named as the host knows them.
func named<R>(_ report: R, _ names: GuestNames) -> R {
    guard var n = report as? any GuestNaming else { return report }
    n.name(names)
    return n as! R
}
