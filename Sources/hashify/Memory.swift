import ArgumentParser
import HashifyEngine
import SystemPackage

/// `hashify mem`: the guests' memory, what is shared, what is still duplicated, who must restart.
struct Mem: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mem",
        abstract:
            "Show the guests' memory: file-backed, shared between guests, still duplicated, and who must restart.",
        discussion: """
            Reads /proc (run as root to see every process). Each process belongs to the guest whose \
            root is its root directory (by device and inode), or to the host. File-backed mappings are \
            counted by the inode that holds their page cache: an overlay guest's files by their shared \
            data object (or the guest's own copy-up), reflinked copies as the separate copies they are \
            in memory. DUPLICATED is memory holding a content that is also resident under another \
            inode; each duplicated file says what would merge it (unify, overlay mode for copies whose \
            owner, mode, mtime or xattrs differ, or nothing for files of 64 bytes or less in overlay \
            guests), and "unify would save" counts only what unify would. The restart list names \
            processes that map a copy unify replaced, with what their restart would free. --metrics \
            writes the figures for Prometheus (contrib/systemd runs it on a timer). Nothing is changed.
            """)

    @OptionGroup var selection: GuestSelection
    @OptionGroup var metricsOption: MetricsOption
    @OptionGroup var output: OutputOptions

    func run() throws {
        let (selected, host, names) = selection.resolve()
        var options = selected
        if let config = host.config { options.rootTrust = config.rootTrust(names: names) }
        let r = named(runEngine { try MemoryScanner.run(options) }, names)
        if let m = metricsOption.metrics { runEngine { try MetricsFile.write(r, to: FilePath(m)) } }
        emit(r, output: output)
    }
}

/// The guests `mem` and `ksm status` look at.
struct GuestSelection: ParsableArguments {
    @Argument(help: "Guest root directories (default: the host's guests, as unify --all finds them).")
    var roots: [String] = []
    @OptionGroup var storeOption: StoreOption
    @OptionGroup var places: DiscoveryPlaces
    @OptionGroup var configOption: ConfigOption

    /// The selection, with the config (read once) and the guests' names for the report.
    func resolve() -> (MemoryOptions, HostSettings, GuestNames) {
        let host = configOption.load()
        let found = HostGuests.forReport(host: host, roots: roots, store: storeOption.store, places: places)
        var o = MemoryOptions(roots: found.roots)
        o.store = found.store
        return (o, host, found.names)
    }
}
