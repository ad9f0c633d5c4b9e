import ArgumentParser
import FoundationEssentials
import HashifyEngine
import HashifySystem
import SystemPackage

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Build sample guests from host files, unify them and show what was saved.",
        discussion: """
            Copies parts of the host's /usr (with owners, modes, mtimes and xattrs) into three \
            guests in a new temporary directory and (as root) starts one perl process per guest, \
            chrooted. Shows disk use and the processes' total Pss, runs unify, restarts the \
            processes, shows both again and how many inodes are now shared, then removes what it made.
            """
    )

    @Option(help: "Where to make the temporary directory.")
    var directory: String = "/var/tmp"

    @Option(help: "How many guests.")
    var guests: Int = 3

    @Option(help: "MiB of host files per guest.")
    var mib: UInt64 = 48

    @Flag(help: "Keep the sample guests and store (their path is printed).")
    var keep = false

    @OptionGroup var output: OutputOptions

    func validate() throws {
        if guests < 2 { throw ValidationError("--guests must be at least 2") }
        if mib < 1 { throw ValidationError("--mib must be at least 1") }
    }

    func run() throws {
        var maker = DemoGuests(parent: FilePath(directory))
        maker.guestCount = guests
        maker.bytesPerGuest = mib << 20
        say("building \(guests) sample guests from host files in \(directory) …")
        let built: DemoGuests.Built
        do { built = try maker.build() } catch let e as InputError { fail(e.description) }
        var status: Int32 = 0
        defer {
            if keep {
                say("kept: \(built.directory)")
            } else {
                try? removeTree(built.directory)
            }
        }
        // One long-running program per guest, to show memory as well as disk.
        var programs = DemoProcesses()
        var pssBefore: UInt64?
        if let why = DemoProcesses.unavailableReason {
            say("  (no memory figures: \(why))")
        } else {
            try programs.install(into: built.roots)
            programs.start(in: built.roots)
            pssBefore = programs.totalPss()
        }
        defer { programs.stop() }
        let before = try DiskUsage.measure(built.roots)
        say("  \(built.roots.count) guests, \(before.files) files, \(formatBytes(before.bytes)) on disk (du)")
        let options = UnifyOptions(roots: built.roots)
        let progress = output.quiet || output.json ? nil : TerminalProgress.ifTerminal()
        let report = try Unifier(options: options, progress: progress).run()
        emit(report, output: output)
        let after = try DiskUsage.measure(built.roots)
        let saved = before.bytes - min(before.bytes, after.bytes)
        let percent = before.bytes == 0 ? 0 : Int((Double(saved) / Double(before.bytes) * 100).rounded())
        say(
            """
            disk use (du of all guests): before \(formatBytes(before.bytes)), after \(formatBytes(after.bytes)) \
            — \(formatBytes(saved)) saved (\(percent)%)
            now shared: \(after.sharedInodes) inodes, linked from \(after.sharedPaths) paths \
            (one copy each on disk and in the page cache)
            """)
        if let pssBefore {
            programs.stop()
            programs.start(in: built.roots)
            let pssAfter = programs.totalPss()
            let name = programs.argv[0].split(separator: "/").last.map(String.init) ?? "program"
            say(
                """
                memory (total Pss of one \(name) process per guest): before \(formatBytes(pssBefore)), \
                after unify and a restart \(formatBytes(pssAfter)) (hashify mem shows who maps what)
                """)
        }
        status = report.exitStatus
        if status != 0 { throw ExitCode(status) }
    }

    func say(_ s: String) {
        if !output.quiet && !output.json { print(s) }
    }
}
