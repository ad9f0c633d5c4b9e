import ArgumentParser
import HashifyEngine
import HashifySystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The `hashify` command: subcommands over HashifyEngine.
struct Hashify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hashify",
        abstract: "Share identical files of container guests: one copy on disk and in the page cache.",
        discussion: """
            hashify finds the files that container root filesystems ("guests") have in common \
            and makes them share one copy, without changing anything a guest can see: in hardlink \
            mode (unify) the copies become hard links to one object in a store beside the guests; \
            in overlay mode (overlay convert) each guest becomes a copy-on-write overlay over shared \
            data objects, so no guest can change another's files. Run unify again after every \
            round of updates; hashify mem shows what the guests' memory costs and who must restart.

            Exit status: 0 done; 1 done, but some files were skipped because of errors; \
            2 bad usage or input (nothing changed); 3 the store is locked by another run (--no-wait).
            """,
        version: "0.1.0",
        subcommands: [
            Unify.self, OverlayCommand.self, CloneCommand.self, Mem.self, KSMCommand.self, Status.self,
            ManifestCommandLine.self, Verify.self, GC.self, Split.self, Demo.self,
        ]
    )
}

/// Options every command that reports shares.
struct OutputOptions: ParsableArguments {
    @Flag(name: .long, help: "Print a machine-readable JSON report on stdout (schema: docs/json.md).")
    var json = false
    @Flag(name: [.short, .long], help: "List every skipped path.")
    var verbose = false
    @Flag(name: [.short, .long], help: "Print nothing but errors (the exit status tells the outcome).")
    var quiet = false
}

/// `--metrics FILE`, of the commands whose figures a monitoring system watches.
struct MetricsOption: ParsableArguments {
    @Option(
        help:
            "Also write the figures to FILE in Prometheus text format (node_exporter's textfile collector), atomically."
    )
    var metrics: String?

    func validate() throws {
        guard let m = metrics else { return }
        let parent = FilePath(m).removingLastComponent()
        var st = stat()
        if FilePath(m).lastComponent == nil || (!parent.isEmpty && parent.withPlatformString { lstat($0, &st) } != 0) {
            throw ValidationError("--metrics \(m): its directory does not exist")
        }
    }
}

/// Prints a one-line error and exits with status 2 (bad usage or input).
func fail(_ message: String, status: Int32 = 2) -> Never {
    printError("hashify: \(elided(message))")
    exit(status)
}

func printError(_ s: String) {
    var line = s
    if !line.hasSuffix("\n") { line += "\n" }
    writeStandardError(line)
}

/// Converts a command-line argument to path bytes without decoding them.
func argumentBytes(_ s: String) -> [UInt8] { Array(s.utf8) }

/// Writes to file descriptor 2 directly (no shared C FILE state).
func writeStandardError(_ s: String) {
    let bytes = Array(s.utf8)
    var off = 0
    while off < bytes.count {
        let n = bytes.withUnsafeBytes { write(2, $0.baseAddress! + off, $0.count - off) }
        if n <= 0 { return }
        off += n
    }
}
