import ArgumentParser
import HashifyEngine
import SystemPackage

/// `hashify ksm …`: kernel samepage merging for the anonymous memory files cannot share.
struct KSMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ksm",
        abstract: "Kernel samepage merging for anonymous memory: run a command mergeable, show what ksmd merged.",
        discussion: """
            KSM merges identical anonymous pages (heaps, interpreter state) that unification cannot \
            share, because they belong to no file. It costs ksmd's CPU time and makes a write to a \
            merged page slower (it is copied first), and merged pages are a known timing side \
            channel between processes (see the README before enabling it for untrusted guests).
            """,
        subcommands: [Run.self, Status.self])

    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run CMD with all its anonymous memory mergeable (PR_SET_MEMORY_MERGE; Linux 6.7+ keeps it across exec).",
            discussion: "Example: hashify ksm run -- lxc-start -n web1 -F (the flag is inherited by every child). Exit status 2 when the kernel cannot do it.")
        @Argument(parsing: .captureForPassthrough, help: "The command and its arguments.")
        var command: [String] = []

        func run() throws {
            let argv = command.first == "--" ? Array(command.dropFirst()) : command
            if argv.isEmpty { fail("give the command to run: hashify ksm run -- CMD [ARGS...]") }
            if let w = KSM.notRunningWarning() { printError("hashify: warning: \(w)") }
            runEngine { try KSM.exec(argv) }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show ksmd's state and settings and, per guest, what its processes have merged.")
        @OptionGroup var selection: GuestSelection
        @OptionGroup var output: OutputOptions

        func run() throws {
            let (options, host) = selection.resolve()
            let r = runEngine { try KSM.status(options) }
            emit(r, output: output, names: host.names) { r in
                let s = r.settings
                func v(_ k: String) -> String { s[k].map(String.init) ?? "-" }
                var out = "hashify ksm status — ksmd \(r.running ? "running" : "not running")\n"
                out += "settings  pages_to_scan \(v("pages_to_scan")), sleep_millisecs \(v("sleep_millisecs")), max_page_sharing \(v("max_page_sharing")), merge_across_nodes \(v("merge_across_nodes"))\n"
                let page: Int64 = 4096
                out += "merged    pages_shared \(v("pages_shared")), pages_sharing \(v("pages_sharing")) (\(formatBytes(UInt64(max(0, (s["pages_sharing"] ?? 0) * page)))) saved), general_profit \(formatBytes(UInt64(max(0, s["general_profit"] ?? 0))))\n\n"
                let w = max(5, r.guests.map { $0.guest.count }.max() ?? 5)
                out += "GUEST".rightPadded(w) + "  PROCS  MERGE-ANY      MERGED      PROFIT\n"
                for g in r.guests {
                    out += g.guest.rightPadded(w) + String(g.processes).leftPadded(7) + String(g.mergeAnyProcesses).leftPadded(11)
                    out += formatBytes(g.mergedBytes).leftPadded(12) + formatBytes(UInt64(max(0, g.profitBytes))).leftPadded(12) + "\n"
                }
                for n in r.notes { out += "note      \(n)\n" }
                return out
            }
        }
    }
}
