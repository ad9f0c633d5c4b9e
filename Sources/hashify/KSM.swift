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
            abstract:
                "Run CMD with all its anonymous memory mergeable (PR_SET_MEMORY_MERGE; Linux 6.7+ keeps it across exec).",
            discussion:
                "Example: hashify ksm run -- lxc-start -n web1 -F (the flag is inherited by every child). Exit status 2 when the kernel cannot do it."
        )
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
            let (options, _, names) = selection.resolve()
            let r = runEngine { try KSM.status(options) }
            emit(r, output: output, names: names)
        }
    }
}
