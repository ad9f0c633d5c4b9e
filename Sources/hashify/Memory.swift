import ArgumentParser
import HashifyEngine
import SystemPackage

/// `hashify mem`: the guests' memory, what is shared, what is still duplicated, who must restart.
struct Mem: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mem",
        abstract: "Show the guests' memory: file-backed, shared between guests, still duplicated, and who must restart.",
        discussion: """
            Reads /proc (run as root to see every process). Each process belongs to the guest whose \
            root is its root directory (by device and inode), or to the host. File-backed mappings are \
            counted by the inode that holds their page cache: an overlay guest's files by their shared \
            data object (or the guest's own copy-up), reflinked copies as the separate copies they are \
            in memory. DUPLICATED is memory holding a content that is also resident under another \
            inode: what unifying (and restarting) would still save. The restart list names processes \
            that map a copy unify replaced, with what their restart would free. Nothing is changed.
            """)

    @OptionGroup var selection: GuestSelection
    @OptionGroup var output: OutputOptions

    func run() throws {
        let (options, host) = selection.resolve()
        let r = runEngine { try MemoryScanner.run(options) }
        emit(r, output: output, names: host.names) { r in
            func mib(_ b: UInt64) -> String { formatBytes(b) }
            let w = max(5, r.guests.map { $0.guest.count }.max() ?? 5)
            var out = "hashify mem\(r.partial ? " (partial: \(r.unreadableProcesses) processes could not be read)" : "")\n\n"
            out += "GUEST".rightPadded(w) + "  PROCS   FILE-BACKED      SHARED  DUPLICATED   ANONYMOUS  KSM-MERGED\n"
            for g in r.guests + [MemoryReport.Guest(guest: "total", figures: r.totals)] {
                let f = g.figures
                out += g.guest.rightPadded(w) + String(f.processes).leftPadded(7) + mib(f.fileBackedBytes).leftPadded(14)
                out += mib(f.sharedBytes).leftPadded(12) + mib(f.duplicatedBytes).leftPadded(12)
                out += mib(f.anonymousBytes).leftPadded(12) + mib(f.ksmMergedBytes).leftPadded(12) + "\n"
            }
            out += "\nstore     \(mib(r.storeCachedBytes)) of store objects in the page cache\n"
            if !r.duplicatedFiles.isEmpty {
                out += "\nstill duplicated in memory (unify, then restart what maps them):\n"
                for d in r.duplicatedFiles.prefix(10) { out += "  \(mib(d.duplicatedBytes).leftPadded(10))  \(d.copies) copies  \(d.path)\n" }
            }
            if !r.processesToRestart.isEmpty {
                out += "\nrestart to share memory (they map copies unify replaced):\n"
                for p in r.processesToRestart {
                    out += "  \(String(p.pid).leftPadded(7)) \(p.command.rightPadded(16)) \(p.guest)\(p.group.map { " [\($0)]" } ?? "")  frees \(mib(p.bytes))\n"
                }
            }
            for n in r.notes { out += "note      \(n)\n" }
            return out
        }
    }
}

/// The guests `mem` and `ksm status` look at.
struct GuestSelection: ParsableArguments {
    @Argument(help: "Guest root directories (default: the guests of the store).")
    var roots: [String] = []
    @OptionGroup var storeOption: StoreOption
    @OptionGroup var configOption: ConfigOption

    /// The selection, with the config (read once) for the report's names.
    func resolve() -> (MemoryOptions, HostSettings) {
        let host = configOption.load()
        var o = MemoryOptions(roots: roots.map { FilePath($0) })
        o.store = host.store(storeOption.store)
        return (o, host)
    }
}
