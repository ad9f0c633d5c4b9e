import ArgumentParser
import HashifyEngine
import HashifySystem
import SystemPackage

/// Exits with status 3: another run holds the store (and --no-wait was given).
func failStoreBusy() -> Never {
    fail("the store is in use by another hashify run (without --no-wait, hashify waits)", status: 3)
}

/// Runs an engine call, turning bad input into exit 2 and a busy store into exit 3.
func runEngine<T>(_ body: () throws -> T) -> T {
    do {
        return try body()
    } catch let e as InputError {
        fail(e.description)
    } catch is Store.Busy {
        failStoreBusy()
    } catch {
        fail("\(error)", status: 1)
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what is shared, the store's health and what a re-run would still gain.",
        discussion: """
            Without ROOTs, the host's guests as `unify --all` finds them (the config's, then those of \
            LXC, nspawn and Incus/LXD dir pools); with --store alone, the guests earlier runs on that \
            store were given. Nothing is changed.
            """)

    @Argument(help: "Guest root directories (default: the host's guests, as unify --all finds them).")
    var roots: [String] = []
    @OptionGroup var storeOption: StoreOption
    @OptionGroup var places: DiscoveryPlaces
    @OptionGroup var configOption: ConfigOption
    @OptionGroup var output: OutputOptions

    func run() throws {
        let host = configOption.load()
        let config = host.config
        let found = HostGuests.forReport(host: host, roots: roots, store: storeOption.store, places: places)
        if found.roots.isEmpty && found.store == nil {
            fail(
                "no guests found: \(config == nil ? "no config names any" : "the config names none") and LXC, nspawn and Incus have none where they keep them; give guest roots, --lxcpath or --store"
            )
        }
        let location = StoreLocation(store: found.store, roots: found.roots)
        var options = UnifyOptions(roots: [], config: config, processors: onlineProcessors())
        let names = found.names
        if let config { options.rootTrust = config.rootTrust(names: names) }
        let report = runEngine { try StatusCommand.run(location, unifyOptions: options) }
        emit(report, output: output, names: names)
    }
}

/// The guests and store a maintenance command works on, and what to do
/// when another run holds the store.
struct StoreArguments: ParsableArguments {
    @Argument(help: "Guest root directories (default: the ones the store remembers).")
    var roots: [String] = []
    @OptionGroup var storeOption: StoreOption
    @OptionGroup var wait: WaitOption
    @OptionGroup var configOption: ConfigOption

    /// The store and guests, with the config (read once) for the report's names.
    func resolve() -> (StoreLocation, HostSettings) {
        let host = configOption.load()
        return (StoreLocation(store: host.store(storeOption.store), roots: roots.map { FilePath($0) }), host)
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Re-hash every store object and compare it with its name.",
        discussion: """
            An object whose content or metadata changed (a guest wrote into a shared file in place, \
            or changed its mode) is reported with every guest path that links it. --repair gives each \
            of those paths its own copy of what it shows now and takes the object out of the store, \
            so the change cannot spread further. Exit status 1 when damage was found.
            """)

    @OptionGroup var target: StoreArguments
    @Flag(help: "Split the paths of damaged objects and remove those objects.")
    var repair = false
    @OptionGroup var output: OutputOptions

    func run() throws {
        let (location, host) = target.resolve()
        let report = runEngine { try VerifyCommand.run(location, repair: repair, waitForLock: target.wait.waitForLock) }
        try finish(report, output: output, names: host.names)
    }
}

struct GC: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Remove store objects no guest links any more, and leftovers of interrupted runs.",
        discussion: "Safe while guests run. Without ROOTs, the guests the store remembers are searched for leftovers.")

    @OptionGroup var target: StoreArguments
    @Flag(name: [.customShort("n"), .long], help: "Report what would be removed; change nothing.")
    var dryRun = false
    @OptionGroup var output: OutputOptions

    func run() throws {
        let (location, host) = target.resolve()
        let report = runEngine { try GCCommand.run(location, dryRun: dryRun, waitForLock: target.wait.waitForLock) }
        try finish(report, output: output, names: host.names)
    }
}

struct Split: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Give unified paths their own private copy again (to modify them in place).",
        discussion: """
            hashify split PATH...              each PATH (inside a guest root) gets its own copy
            hashify split --root ROOT [--include PATTERN]...
                                               every unified file of ROOT (or those matching)
            Each copy keeps content, mode, owner, mtime and xattrs; the path is replaced atomically.
            """)

    @Argument(help: "Paths of files inside guest roots.")
    var paths: [String] = []
    @Option(help: "A guest root: split its unified files (repeatable).")
    var root: [String] = []
    @Option(help: "With --root: only paths matching (guest-absolute glob; repeatable).")
    var include: [String] = []
    @OptionGroup var storeOption: StoreOption
    @Flag(name: [.customShort("n"), .long], help: "Report what would be split; change nothing.")
    var dryRun = false
    @OptionGroup var wait: WaitOption
    @OptionGroup var configOption: ConfigOption
    @OptionGroup var output: OutputOptions

    func validate() throws {
        if paths.isEmpty && root.isEmpty { throw ValidationError("give PATHs or --root ROOT") }
        if !paths.isEmpty && !include.isEmpty { throw ValidationError("--include goes with --root, not with PATHs") }
    }

    func run() throws {
        let host = configOption.load()
        let location = StoreLocation(
            store: host.store(storeOption.store), roots: root.map { FilePath($0) }, paths: paths.map { FilePath($0) })
        let report = runEngine {
            try SplitCommand.run(
                location, paths: paths.map { FilePath($0).lexicallyNormalized() },
                includes: include.map(argumentBytes), dryRun: dryRun, waitForLock: wait.waitForLock)
        }
        try finish(report, output: output, names: host.names)
    }
}
