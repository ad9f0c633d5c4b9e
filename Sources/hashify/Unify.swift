import ArgumentParser
import FoundationEssentials
import HashifyEngine
import HashifySystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

struct Unify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Hard-link identical files of guest roots to shared store objects (and fold overlay guests).",
        discussion: """
            Each ROOT is a guest's root directory (for LXC: /var/lib/lxc/NAME/rootfs). \
            Two files are merged only when their SHA-256 and their whole identity are equal: \
            type, mode (with setuid/setgid/sticky), owner, group, mtime to the nanosecond and every \
            extended attribute. Every path is replaced atomically; a file open for writing or \
            changed during the run is left for the next run.

            By default these trees are excluded: \(PathFilter.defaultExcludes.joined(separator: " ")); \
            dpkg configuration files are never unified. A PATTERN starting with / is a glob over \
            guest-absolute paths and covers everything below what it matches; one without / \
            matches single names. --include wins over --exclude.

            Roots that are overlay guests of the store (hashify overlay convert) are not walked: \
            their copy-ups are folded back into sharing when they are unmounted, and a mounted one \
            is reported for its next start.
            """
    )

    @Argument(help: "Guest root directories (default: the guests the config names).")
    var roots: [String] = []

    @Flag(
        help:
            "Also unify every guest the container managers on this host have: LXC (/var/lib/lxc), systemd-nspawn (/var/lib/machines), Incus/LXD dir pools."
    )
    var all = false

    @OptionGroup var places: DiscoveryPlaces

    @OptionGroup var storeOption: StoreOption

    @Option(
        help:
            "hardlink: link plain guests' files to store objects; overlay: convert stopped plain guests to overlay guests instead (running ones wait for a later run). Default: the config's, else hardlink."
    )
    var mode: HashifyConfig.Mode?

    @Flag(
        name: [.customShort("n"), .long],
        help: "Plan and report exactly what would be linked and saved; change nothing.")
    var dryRun = false

    @Option(name: .long, help: "Exclude matching paths (repeatable; added to the config's).")
    var exclude: [String] = []

    @Option(name: .long, help: "Include matching paths even when excluded (repeatable; added to the config's).")
    var include: [String] = []

    @Flag(help: "Do not apply the default exclude list.")
    var noDefaultExcludes = false

    @Option(
        help:
            "Leave files smaller than this many bytes alone (at least 1: empty files are never linked; default: the config's, else 1)."
    )
    var minSize: UInt64?

    @Flag(
        help:
            "Link guests whose root is not the host's root (unprivileged containers: LXC lxc.idmap, Incus not privileged, nspawn PrivateUsers, files shifted into an id range) as if it were: their root can then write a shared file in place for every guest. Default: the config's trust-guest-roots and trust-root, else such guests are left unlinked (overlay mode shares them safely)."
    )
    var trustGuestRoots = false

    @Flag(help: "Merge files that differ only in mtime (each merged path gets the kept file's mtime).")
    var ignoreMtime = false

    @Option(
        help:
            "Hashing threads (default: the config's, else the number of CPUs, at least 4 and at most 16: reads from disk overlap)."
    )
    var threads: Int?

    @OptionGroup var wait: WaitOption

    @OptionGroup var metricsOption: MetricsOption

    @OptionGroup var configOption: ConfigOption
    @OptionGroup var output: OutputOptions

    func validate() throws {
        if !all && places.given {
            throw ValidationError("--lxcpath and --machines go with --all")
        }
        if let m = minSize, m < 1 {
            throw ValidationError("--min-size must be at least 1 (empty files are never linked)")
        }
        if let t = threads, !(1...256).contains(t) {
            throw ValidationError("--threads must be from 1 to 256, not \(t)")
        }
    }

    func run() throws {
        let host = configOption.load()
        let config = host.config
        // The command line's roots replace the config's guests.
        let discovering = all || (roots.isEmpty && config?.all == true)
        let found = HostGuests(
            host: host, given: roots.map { FilePath($0) }, store: storeOption.store, discover: discovering,
            places: places, mode: mode)
        let (allRoots, discovered, names, storePath) = (found.roots, found.discovered, found.names, found.store)
        if discovering && allRoots.isEmpty {
            let left = discovered.map { "\($0.name) (\($0.root)): \($0.unusable ?? "")" }.joined(separator: "; ")
            fail("--all found no guest hashify can use" + (left.isEmpty ? "" : ": " + left))
        }
        if allRoots.isEmpty {
            fail(
                config == nil
                    ? "give at least one guest root, or --all"
                    : "give at least one guest root, or --all (\(config!.file?.string ?? "the config") names no guests)"
            )
        }
        // The config's settings, then the command line's on top.
        var options = UnifyOptions(roots: allRoots, config: config, processors: onlineProcessors())
        options.store = storePath
        options.dryRun = dryRun
        options.excludes += exclude.map(argumentBytes)
        options.includes += include.map(argumentBytes)
        if noDefaultExcludes { options.defaultExcludes = false }
        if let minSize { options.minimumSize = minSize }
        if ignoreMtime { options.ignoreModificationTime = true }
        if let threads { options.threads = threads }
        if let mode { options.mode = mode }
        options.waitForLock = wait.waitForLock
        if let config { options.rootTrust = config.rootTrust(names: names) }
        if trustGuestRoots { options.rootTrust.trustAll = true }
        var notes: [String] = []
        if let config {
            for root in allRoots {
                guard let g = config.guest(named: names.name(of: root.string), root: root) else { continue }
                options.guestExcludes[root] = g.excludes
                options.guestIncludes[root] = g.includes
            }
            for (name, g) in config.guests.sorted(by: { $0.key < $1.key }) where g.root == nil {
                if !allRoots.contains(where: { r in
                    names.name(of: r.string).map { $0 == name || $0.hasSuffix(":" + name) } ?? false
                }) {
                    notes.append("\(config.file?.string ?? "config"): [guest.\(name)] matches no guest of this run")
                }
            }
        }
        let progress = output.quiet || output.json ? nil : TerminalProgress.ifTerminal()
        var report = runEngine { try Unifier(options: options, progress: progress).run() }
        for d in discovered {
            report.notes.append(
                d.unusable.map { "\(d.name) (\(d.root)) left alone: \($0)" } ?? "\(d.name) is \(d.root)")
        }
        report.notes += notes
        report = named(report, names)
        if let m = metricsOption.metrics { runEngine { try MetricsFile.write(report, to: FilePath(m)) } }
        try finish(report, output: output)
    }
}

/// A report whose command exits with its status (0, or 1 when paths were skipped because of errors).
protocol StatusReporting: Encodable {
    var exitStatus: Int32 { get }
}

extension UnifyReport: StatusReporting {}
extension VerifyReport: StatusReporting {}
extension GCReport: StatusReporting {}
extension SplitReport: StatusReporting {}
extension ManifestReport: StatusReporting {}

/// Prints a report as `emit` does, then exits with the report's status.
func finish<R: StatusReporting & TextReport>(_ report: R, output: OutputOptions, names: GuestNames? = nil) throws {
    emit(report, output: output, names: names)
    if report.exitStatus != 0 { throw ExitCode(report.exitStatus) }
}

/// Prints a report as JSON or as its text, as the output options say, its guests named by `names`.
func emit<R: Encodable & TextReport>(_ report: R, output: OutputOptions, names: GuestNames? = nil) {
    let report = names.map { named(report, $0) } ?? report
    if output.json {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        if let data = try? encoder.encode(report) {
            print(String(decoding: data, as: UTF8.self))
        }
    } else if !output.quiet {
        print(report.humanReadable(verbose: output.verbose), terminator: "")
    }
}
