import ArgumentParser
import HashifyEngine
import SystemPackage

/// `hashify overlay …`: copy-on-write guests on overlayfs.
struct OverlayCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "overlay",
        abstract: "Copy-on-write guests: each guest an overlay of its own metadata over shared data objects.",
        discussion: """
            In overlay mode a guest sees its complete tree through an overlayfs mount: a metadata \
            image of stubs (an EROFS image written once: each file's mode, owner, times and xattrs) \
            over the store's data objects, one per distinct content. Reads of equal files share one inode and one page-cache copy; \
            any write, chmod, chown or setxattr copies the file up into that guest's own upper \
            directory, so no guest can change another's files. `hashify unify` folds what a guest's \
            updates wrote back into sharing while the guest is unmounted (stopped).

            Needs root, Linux 5.15 or later with EROFS (data-only layers, Linux 6.5+, are used where \
            the kernel has them, else the store's data is an ordinary lower layer the image hides) \
            and trusted xattrs on the store's filesystem; guests and store on one filesystem \
            (or, for btrfs subvolume guests, one btrfs filesystem: objects are then reflinks).
            """,
        subcommands: [Convert.self, Mount.self, Umount.self, Fold.self, Export.self])

    /// Roots and store of the overlay commands.
    struct Target: ParsableArguments {
        @Argument(help: "Guest root directories (for LXC: /var/lib/lxc/NAME/rootfs).")
        var roots: [String] = []
        @OptionGroup var storeOption: StoreOption
        @OptionGroup var wait: WaitOption
        @OptionGroup var configOption: ConfigOption

        func validate() throws {
            if roots.isEmpty { throw ValidationError("give at least one guest root") }
        }

        /// The options, with the config (read once) for the report's names.
        func resolve() -> (OverlayOptions, HostSettings) {
            let host = configOption.load()
            var o = OverlayOptions(roots: roots.map { FilePath($0) })
            o.store = host.store(storeOption.store)
            o.waitForLock = wait.waitForLock
            return (o, host)
        }
    }

    struct Convert: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Turn stopped plain guests into overlay guests and mount them.",
            discussion: """
                The guest's files become stubs in a metadata image and data objects in the store \
                (its own inodes, linked: no data is copied, except for files that are also linked \
                from outside the guest). ROOT stays as the mount point. Killed at any moment, the \
                guest is afterwards either the plain directory it was or fully converted; the next \
                run finishes or undoes the work. Refuses a running guest, a ROOT that is already a \
                mount point, and kernels or filesystems that cannot hold overlay guests.
                """)
        @OptionGroup var target: Target
        @Flag(help: "Leave the converted guest unmounted (hashify overlay mount mounts it).")
        var noMount = false
        @OptionGroup var output: OutputOptions

        func run() throws {
            var (o, host) = target.resolve()
            o.mount = !noMount
            try report(runEngine { try Overlay.convert(o) }, output: output, names: host.names)
        }
    }

    struct Mount: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Mount overlay guests on their roots (as a container's pre-start hook does).",
            discussion:
                "The guest's image is mounted read-only (file-backed on Linux 6.12+, else through a loop device with autoclear) and detached once the overlay holds it. Options: the image over the store's data as a data-only layer (lowerdir=IMAGE::DATA) where the kernel has them, else as an ordinary lower layer (IMAGE:DATA); metacopy=on, redirect_dir=on, index=on. status shows which."
        )
        @OptionGroup var target: Target
        @OptionGroup var output: OutputOptions
        func run() throws {
            let (o, host) = target.resolve()
            try report(runEngine { try Overlay.mount(o) }, output: output, names: host.names)
        }
    }

    struct Umount: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Unmount overlay guests; refuses, naming them, while processes use a guest.")
        @OptionGroup var target: Target
        @OptionGroup var output: OutputOptions
        func run() throws {
            let (o, host) = target.resolve()
            try report(runEngine { try Overlay.umount(o) }, output: output, names: host.names)
        }
    }

    struct Fold: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Fold unmounted overlay guests' copy-ups back into sharing (what unify does for them).",
            discussion: """
                Files the guest's updates wrote into its upper layer are hashed and become stubs of \
                shared objects; the guest sees exactly what it saw. The next generation's image is \
                written from the old one and what the upper layer changed (what the guest did not \
                touch is taken unread) and switched to in one step, so a killed or failed fold \
                leaves the previous one in force. A mounted guest is left for its next start. \
                Plain guests are refused (unify them).
                """)
        @OptionGroup var target: Target
        @Flag(
            help:
                "Make a guest converted by an earlier version (directory layers) an image even with nothing to fold."
        )
        var compact = false
        @OptionGroup var output: OutputOptions
        func run() throws {
            var (o, host) = target.resolve()
            o.compact = compact
            try report(runEngine { try Overlay.fold(o) }, output: output, names: host.names)
        }
    }

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy an overlay guest out as a plain directory, or turn it back into one.",
            discussion: """
                With DEST: a plain copy of everything the guest shows (every attribute and hard link) \
                at DEST, which must not exist; the guest is unchanged (a backup of one guest). \
                Without: the guest itself becomes a plain directory again (it must be stopped); \
                killed at any moment, it is either still the overlay guest or the plain directory.
                """)
        @Argument(help: "The overlay guest's root.")
        var root: String
        @Argument(help: "Where the plain copy goes (default: in place of the guest).")
        var destination: String?
        @OptionGroup var storeOption: StoreOption
        @OptionGroup var wait: WaitOption
        @OptionGroup var configOption: ConfigOption
        @OptionGroup var output: OutputOptions

        func run() throws {
            let host = configOption.load()
            var o = OverlayOptions(roots: [FilePath(root)])
            o.store = host.store(storeOption.store)
            o.waitForLock = wait.waitForLock
            o.destination = destination.map { FilePath($0) }
            try report(runEngine { try Overlay.export(o) }, output: output, names: host.names)
        }
    }
}

extension OverlayReport: StatusReporting {}

/// Prints an overlay report (a line per guest) and exits with its status.
private func report(_ r: OverlayReport, output: OutputOptions, names: GuestNames) throws {
    try finish(r, output: output, names: names)
}
