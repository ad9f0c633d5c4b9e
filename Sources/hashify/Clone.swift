import ArgumentParser
import HashifyEngine
import SystemPackage

/// `hashify clone SRC DST`: a new guest from an existing one in seconds.
struct CloneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clone",
        abstract: "Make a new guest from an existing (unified) one in seconds.",
        discussion: """
            Hardlink mode: files of SRC that are store objects are linked, everything else (dpkg \
            conffiles and the default-excluded mutable trees among it) is copied with every \
            attribute; guest-local hard links are kept. An overlay guest shares its source's image (or, when \
            the source has copy-ups, gets one of its own) over the same data objects and an empty \
            upper layer, and is mounted. DST must not exist; \
            the clone is built under a temporary name and appears in one step, so a killed clone \
            leaves nothing under DST's name. --lxc NAME also writes LXCPATH/NAME/config from the \
            source container's, with the new name and rootfs and without its MAC addresses \
            (DST must be LXCPATH/NAME/rootfs).
            """)
    @Argument(help: "The guest to clone.")
    var source: String
    @Argument(help: "The new guest's root (must not exist).")
    var destination: String
    @OptionGroup var storeOption: StoreOption
    @Option(help: "Write an LXC config for the clone under this container name.")
    var lxc: String?
    @Flag(help: "Overlay guests: leave the clone unmounted.")
    var noMount = false
    @OptionGroup var wait: WaitOption
    @OptionGroup var configOption: ConfigOption
    @OptionGroup var output: OutputOptions

    func run() throws {
        var o = CloneOptions(source: FilePath(source), destination: FilePath(destination))
        let host = configOption.load()
        o.store = host.store(storeOption.store)
        o.lxcName = lxc
        o.mount = !noMount
        o.waitForLock = wait.waitForLock
        let r = runEngine { try Clone.run(o) }
        try finish(r, output: output, names: host.names)
    }
}

extension CloneReport: StatusReporting {}
