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

    @Argument(help: "Guest root directories.")
    var roots: [String] = []

    @Flag(help: "Also unify every guest the container managers on this host have: LXC (/var/lib/lxc), systemd-nspawn (/var/lib/machines), Incus/LXD dir pools.")
    var all = false

    @Option(help: "With --all: an LXC lxcpath to search (repeatable; given, it replaces the default places).")
    var lxcpath: [String] = []

    @Option(help: "With --all: the nspawn machines directory (given, it replaces the default places).")
    var machines: String?

    @Option(help: "The store (default: .hashify in the nearest common parent of the roots; same filesystem).")
    var store: String?

    @Flag(name: [.customShort("n"), .long], help: "Plan and report exactly what would be linked and saved; change nothing.")
    var dryRun = false

    @Option(name: .long, help: "Exclude matching paths (repeatable).")
    var exclude: [String] = []

    @Option(name: .long, help: "Include matching paths even when excluded (repeatable).")
    var include: [String] = []

    @Flag(help: "Do not apply the default exclude list.")
    var noDefaultExcludes = false

    @Option(help: "Leave files smaller than this many bytes alone (at least 1: empty files are never linked).")
    var minSize: UInt64 = 1

    @Flag(help: "Merge files that differ only in mtime (each merged path gets the kept file's mtime).")
    var ignoreMtime = false

    @Option(help: "Hashing threads (default: the number of CPUs, at least 4 and at most 16: reads from disk overlap).")
    var threads: Int?

    @Flag(help: "Exit with status 3 instead of waiting when another run holds the store.")
    var noWait = false

    @Option(help: "Also write the run's figures to FILE in Prometheus text format (node_exporter's textfile collector), atomically.")
    var metrics: String?

    @OptionGroup var output: OutputOptions

    func validate() throws {
        if roots.isEmpty && !all { throw ValidationError("give at least one guest root, or --all") }
        if !all && (!lxcpath.isEmpty || machines != nil) { throw ValidationError("--lxcpath and --machines go with --all") }
        if minSize < 1 { throw ValidationError("--min-size must be at least 1 (empty files are never linked)") }
        if let t = threads, t < 1 { throw ValidationError("--threads must be at least 1") }
        if let m = metrics {
            let parent = FilePath(m).removingLastComponent()
            var st = stat()
            if FilePath(m).lastComponent == nil || (!parent.isEmpty && parent.withPlatformString { lstat($0, &st) } != 0) {
                throw ValidationError("--metrics \(m): its directory does not exist")
            }
        }
    }

    func run() throws {
        var discovered: [GuestDiscovery.Found] = []
        var allRoots = roots.map { FilePath($0) }
        if all {
            var places = GuestDiscovery.Places()
            if !lxcpath.isEmpty || machines != nil {
                places.lxcPaths = lxcpath.map { FilePath($0) }
                places.machines = FilePath(machines ?? "/nonexistent")
                places.incusPools = []
            }
            discovered = GuestDiscovery.find(places)
            let candidates = discovered.filter { $0.unusable == nil }.map { FilePath($0.root) }
            let storePath = store.map { FilePath($0) } ?? (candidates.isEmpty ? nil : RootValidation.defaultStorePath(for: candidates))
            let overlays = storePath.map { Overlay.overlayGuests(among: candidates, storePath: $0) } ?? []
            let found = GuestDiscovery.usable(&discovered, store: storePath, overlayGuests: overlays)
            allRoots += found.filter { !allRoots.contains($0) }
            if allRoots.isEmpty {
                let left = discovered.map { "\($0.name) (\($0.root)): \($0.unusable ?? "")" }.joined(separator: "; ")
                fail("--all found no guest hashify can use" + (left.isEmpty ? "" : ": " + left))
            }
        }
        var options = UnifyOptions(roots: allRoots)
        options.store = store.map { FilePath($0) }
        options.dryRun = dryRun
        options.excludes = exclude.map(argumentBytes)
        options.includes = include.map(argumentBytes)
        options.defaultExcludes = !noDefaultExcludes
        options.minimumSize = minSize
        options.ignoreModificationTime = ignoreMtime
        options.threads = threads ?? UnifyOptions.defaultThreads(processors: ProcessInfo.processInfo.activeProcessorCount)
        options.waitForLock = !noWait
        let progress = output.quiet || output.json ? nil : TerminalProgress.ifTerminal()
        var report = runEngine { try Unifier(options: options, progress: progress).run() }
        for d in discovered {
            report.notes.append(d.unusable.map { "\(d.name) (\(d.root)) left alone: \($0)" } ?? "\(d.name) is \(d.root)")
        }
        if let m = metrics { runEngine { try MetricsFile.write(report, to: FilePath(m)) } }
        try finish(report, output: output) { $0.humanReadable(verbose: output.verbose) }
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

/// Prints a report as `emit` does, then exits with the report's status.
func finish<R: StatusReporting>(_ report: R, output: OutputOptions, human: (R) -> String) throws {
    emit(report, output: output, human: human)
    if report.exitStatus != 0 { throw ExitCode(report.exitStatus) }
}

/// The text lines for skipped paths and notes that the maintenance reports end with.
func skippedAndNotes(_ skipped: [UnifyReport.SkippedPath], notes: [String] = []) -> String {
    skipped.map { "skipped   \($0.root)\($0.path): \($0.detail)\n" }.joined() + notes.map { "note      \($0)\n" }.joined()
}

/// Prints a report as JSON or as text, as the output options say.
func emit<R: Encodable>(_ report: R, output: OutputOptions, human: (R) -> String) {
    if output.json {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        if let data = try? encoder.encode(report) {
            print(String(decoding: data, as: UTF8.self))
        }
    } else if !output.quiet {
        print(human(report), terminator: "")
    }
}
