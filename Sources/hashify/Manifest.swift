import ArgumentParser
import HashifyEngine
import SystemPackage

/// `hashify manifest GUEST`: what is unified in one guest, for audits.
struct ManifestCommandLine: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "manifest",
        abstract:
            "List one guest's entries, each regular file marked shared or private with how many guests use its copy.",
        discussion: """
            One line per entry, as the guest sees it: SHARING GUESTS TYPE MODE UID:GID MTIME SHA-256 PATH \
            (-> symlink target) [xattr names]; --json gives every xattr value too. A file is shared when \
            its copy is a store object (hardlink mode: GUESTS counts the guests the store knows that link \
            it) or its overlay stub's data object (overlay mode). Every file is read to give its digest; \
            nothing is changed. GUEST is a root directory or a name: lxc:NAME, nspawn:NAME, a config \
            entry, or a bare NAME when only one guest has it.
            """)
    @Argument(help: "The guest: its root directory or its name.")
    var guest: String
    @OptionGroup var storeOption: StoreOption
    @OptionGroup var places: DiscoveryPlaces
    @OptionGroup var configOption: ConfigOption
    @OptionGroup var output: OutputOptions

    func run() throws {
        let host = configOption.load()
        // Names as unify --all finds the guests (the config's, then the managers', --lxcpath's).
        let names =
            guest.contains("/")
            ? host.names : HostGuests(host: host, given: [], store: nil, discover: true, places: places).names
        let root: FilePath
        if guest.contains("/") {
            root = FilePath(guest)
        } else if let r = names.root(named: guest) {
            root = r
        } else {
            fail("\(guest): no guest of that name (give its root directory, or lxc:NAME / nspawn:NAME)")
        }
        let report = runEngine { try ManifestCommand.run(root: root, store: host.store(storeOption.store)) }
        try finish(report, output: output, names: names)
    }
}
