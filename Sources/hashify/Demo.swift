import ArgumentParser
import FoundationEssentials
import HashifyEngine
import HashifySystem
import SystemPackage

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Build sample guests from host files, unify them in both modes and show what each gives.",
        discussion: """
            Copies parts of the host's /usr (with owners, modes, mtimes and xattrs) into three \
            guests in a new temporary directory and (as root) starts one perl process per guest, \
            chrooted. Hardlink mode: shows disk use and the processes' total Pss, runs unify, \
            restarts the processes, shows both again and how many inodes are now shared. Overlay \
            mode (as root, where the kernel has overlayfs with metacopy): makes the same guests \
            again, converts them to overlay guests, shows disk and Pss the same way, then writes \
            to a file all guests share in one of them and shows that the others still read the \
            original (copy-on-write). Removes everything it made.
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

    @Flag(help: "Hardlink mode only (no overlay guests are made).")
    var noOverlay = false

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
        if !noOverlay { try overlayHalf(maker: maker, plainPss: pssBefore, hardlinkBytes: after.bytes) }
        say(
            """

            which mode: hardlink mode is the fastest and works on any filesystem and kernel, but a file \
            shared by hard links is one file: a guest that can write it (its root, a bad package script) \
            changes it in every guest. Overlay mode gives the same disk and memory saving with \
            copy-on-write: a write stays in its guest. Use overlay mode for guests you do not fully \
            trust or whose root is not yours; hardlink mode for guests you manage alike.
            """)
    }

    /// The overlay half: the same sample guests made again and converted.
    func overlayHalf(maker: DemoGuests, plainPss: UInt64?, hardlinkBytes: UInt64) throws {
        say("\noverlay mode (copy-on-write) — the same \(guests) sample guests, made again …")
        if let why = DemoProcesses.unavailableReason {
            say("  (skipped: \(why.replacingOccurrences(of: "the memory part", with: "overlay mode")))")
            return
        }
        let built: DemoGuests.Built
        do { built = try maker.build() } catch let e as InputError { fail(e.description) }
        let store = built.directory.appending("store")
        var programs = DemoProcesses()
        var mounted = false
        defer {
            programs.stop()
            if mounted {
                var o = OverlayOptions(roots: built.roots)
                o.store = store
                _ = try? Overlay.umount(o)
            }
            if keep { say("kept: \(built.directory)") } else { try? removeTree(built.directory) }
        }
        try programs.install(into: built.roots)
        let before = try DiskUsage.measure(built.roots)
        var options = OverlayOptions(roots: built.roots)
        options.store = store
        let report: OverlayReport
        do { report = try Overlay.convert(options) } catch let e as InputError {
            say("  (skipped: \(e.description))")
            return
        }
        mounted = true
        emit(report, output: output)
        // The guests' trees now live in the store: data objects, metadata images, upper layers.
        let after = try DiskUsage.measure([store])
        let saved = before.bytes - min(before.bytes, after.bytes)
        say(
            """
            disk use: \(formatBytes(before.bytes)) as plain copies, \(formatBytes(after.bytes)) in the store \
            (data objects and metadata images; hardlink mode: \(formatBytes(hardlinkBytes))) — \
            \(formatBytes(saved)) saved
            """)
        if let plainPss {
            programs.start(in: built.roots)
            let name = programs.argv[0].split(separator: "/").last.map(String.init) ?? "program"
            say(
                "memory (total Pss of one \(name) process per overlay guest): \(formatBytes(programs.totalPss())) "
                    + "(as plain copies: \(formatBytes(plainPss)))")
            programs.stop()
        }
        // Copy-on-write: one guest writes to a file every guest shares.
        let sample = DemoGuests.samplePath.joined(separator: "/")
        let first = built.roots[0].appending(sample)
        let line = Array("guest1 wrote this line.\n".utf8)
        try appendToFile(first, line)
        let firstReads = try readWholeFile(first)
        let othersUnchanged = try built.roots.dropFirst().allSatisfy {
            try readWholeFile($0.appending(sample)) == DemoGuests.sampleContent
        }
        say(
            """
            copy-on-write: guest1 appended a line to /\(sample), a file all \(guests) guests share: \
            guest1 reads \(firstReads.count) bytes with its line; \
            \(othersUnchanged ? "the other guests still read the original \(DemoGuests.sampleContent.count) bytes" : "ANOTHER GUEST SEES THE CHANGE") \
            (in hardlink mode that file is one inode with \(guests) names: the write would reach every guest)
            """)
        if !othersUnchanged { throw ExitCode(1) }
    }

    func say(_ s: String) {
        if !output.quiet && !output.json { print(s) }
    }
}

/// The whole content of the file at `path` (the demo's own sample file).
func readWholeFile(_ path: FilePath) throws -> [UInt8] {
    try Directory.open(path: path.removingLastComponent()).openFileForReading(FileName(path.lastComponent!.string))
        .readAll()
}

/// Appends `bytes` to the existing file at `path`.
func appendToFile(_ path: FilePath, _ bytes: [UInt8]) throws {
    try Directory.open(path: path.removingLastComponent()).openForAppending(
        FileName(path.lastComponent!.string), mode: 0o644
    ).write(bytes)
}
