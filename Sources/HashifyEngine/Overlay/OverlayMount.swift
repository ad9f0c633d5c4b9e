import Glibc
import HashifySystem
import SystemPackage

/// Mounting and inspecting a guest's overlay.
///
/// The options are the ones that make the layout correct: `metacopy=on`
/// (stubs hold metadata, objects data), `redirect_dir=on` (renamed
/// directories) and `index=on` (guest-local hard links stay one inode across
/// copy-up). The store's data directory goes under the metadata layer in one
/// of two layouts (`Layout`): a data-only layer where the kernel has them
/// (tried first), else an ordinary lower layer that the metadata layer hides.
/// Every generation carries what the second needs, so a guest converted on
/// one kernel mounts after the host boots another.
enum OverlayMount {
    static let superMagic: UInt64 = 0x794c_7630

    /// How a guest's metadata layer reaches the store's data objects.
    enum Layout: String, Sendable, Codable {
        /// `lowerdir=META::DATA` (Linux 6.5+, and kernels that backported it):
        /// the data directory is a data-only layer, reached only through a stub's redirect.
        case dataOnly = "data-only"
        /// `lowerdir=META:DATA` (Linux 4.19+): the data directory is an ordinary
        /// lower layer; the metadata layer hides its top directories (`DataLayerHiding`),
        /// so the guest sees only its own entries. This is composefs's fallback too.
        case lower = "lower"
    }

    /// The mount option string for a generation in a layout: its metadata
    /// layers top first (in the lower layout a stack has its hiding layer
    /// above them, `DataLayerHiding.prepare`), then the data directory.
    static func options(_ g: OverlayGuest.Generation, data: FilePath, layout: Layout) -> String {
        func esc(_ p: FilePath) -> String {
            var out = ""
            for c in p.string {
                if c == "\\" || c == "," || c == ":" { out.append("\\") }
                out.append(c)
            }
            return out
        }
        var lowers = g.isImage ? [esc(imageMountPath(g))] : g.layers.map { esc($0.path) }
        if layout == .lower, g.layers.count > 1 { lowers.insert(esc(DataLayerHiding.hidingPath(g)), at: 0) }
        let separator = layout == .dataOnly ? "::" : ":"
        return
            "lowerdir=\(lowers.joined(separator: ":"))\(separator)\(esc(data)),upperdir=\(esc(g.upperPath)),workdir=\(esc(g.workPath))"
            + ",metacopy=on,redirect_dir=on,index=on"
    }

    /// The layouts a mount tries, in order: data-only layers first, unless
    /// `HASHIFY_OVERLAY_LAYOUT=lower` asks for the fallback alone (to try it
    /// on a kernel that has both; the tests do).
    static var layoutsToTry: [Layout] {
        if let v = getenv("HASHIFY_OVERLAY_LAYOUT"), String(cString: v) == "lower" { return [.lower] }
        return [.dataOnly, .lower]
    }

    /// Mounts generation `g` on the directory `target` (reached through its
    /// descriptor, so the mount lands on the very directory that was checked)
    /// and returns the layout that the kernel took.
    ///
    /// Layers restored from a backup are new inodes: overlayfs' index then no
    /// longer matches the file handles it recorded (the upper root's
    /// `trusted.overlay.origin`, the index directory's upper) and refuses
    /// with ESTALE. When the generation holds no copy-ups (it was folded
    /// before the backup, as the README says), those records describe nothing
    /// and are dropped, and the mount is tried once more; otherwise the error stands.
    @discardableResult
    static func mount(_ g: OverlayGuest.Generation, data: FilePath, on target: Directory, readOnly: Bool = false)
        throws -> Layout
    {
        if let why = g.refusalOnThisKernel() { throw InputError(why) }
        if g.isImage {
            if let why = imageUnsupportedReason() { throw InputError("generation \(g.number): \(why)") }
            // The image is mounted where the overlay's options name it, and
            // detached once the overlay holds it (or failed): the overlay is
            // then its only user, and its unmount takes the image's mount and
            // loop device with it.
            let image = imageMountPath(g)
            try mountImage(g, at: image)
            defer { try? detachFilesystem(image) }
            return try mountOverlay(g, data: data, on: target, readOnly: readOnly)
        }
        return try mountOverlay(g, data: data, on: target, readOnly: readOnly)
    }

    /// The name, in a guest's record, of the directory its image is mounted on while its overlay is mounted.
    static let imageMountName = "image"

    static func imageMountPath(_ g: OverlayGuest.Generation) -> FilePath {
        g.path.removingLastComponent().appending(imageMountName)
    }

    /// Mounts generation `g`'s image read-only at `path` (made when missing):
    /// file-backed where EROFS takes a file (Linux 6.12+), else through a
    /// loop device attached read-only with autoclear (detached when unmounted).
    static func mountImage(_ g: OverlayGuest.Generation, at path: FilePath) throws {
        let record = try Directory.open(path: path.removingLastComponent())
        let name = FileName(imageMountName)
        do { try record.makeDirectory(name, mode: 0o700) } catch Errno.fileExists {}
        // Opened without following a symlink: the image is mounted on the record's own directory or nowhere.
        var target: Directory
        do { target = try record.openDirectory(name) } catch {
            throw InputError("\(path): not a directory of hashify's (\(error)); remove it")
        }
        if isMountPoint(target) {
            // An image a killed run left mounted: detached, and the directory itself opened again.
            try detachFilesystem(path)
            target = try record.openDirectory(name)
        }
        let image = try GuestImage.checked(in: g.directory, path: g.path)
        do {
            try mountFilesystem(
                source: "/proc/self/fd/\(image.fd)", target: target.procPath, type: "erofs", readOnly: true,
                options: "")
            return
        } catch Errno.notBlockDevice, Errno.invalidArgument {
            // No file-backed EROFS here: a loop device.
        } catch Errno.operationNotSupportedByDevice {
            throw InputError("this kernel has no EROFS (modprobe erofs; overlay guests' metadata is an EROFS image)")
        }
        let (device, handle) = try attachLoopDevice(image)
        try withExtendedLifetime(handle) {
            do {
                try mountFilesystem(source: device, target: target.procPath, type: "erofs", readOnly: true, options: "")
            } catch Errno.operationNotSupportedByDevice {
                throw InputError(
                    "this kernel has no EROFS (modprobe erofs; overlay guests' metadata is an EROFS image)")
            }
        }
    }

    private static func mountOverlay(
        _ g: OverlayGuest.Generation, data: FilePath, on target: Directory, readOnly: Bool
    ) throws -> Layout {
        var firstError: (any Error)?
        for layout in layoutsToTry {
            do {
                if layout == .lower && !g.isImage { try DataLayerHiding.prepare(g) }
                try mount(g, data: data, on: target, readOnly: readOnly, layout: layout)
                return layout
            } catch Errno.invalidArgument where layout == .dataOnly {
                // No data-only layers here (`::` is refused with EINVAL): the fallback.
                firstError = Errno.invalidArgument
            }
        }
        throw firstError ?? Errno.invalidArgument
    }

    private static func mount(
        _ g: OverlayGuest.Generation, data: FilePath, on target: Directory, readOnly: Bool, layout: Layout
    ) throws {
        let opts = options(g, data: data, layout: layout)
        func attempt() throws {
            try mountFilesystem(
                source: "hashify", target: target.procPath, type: "overlay", readOnly: readOnly, options: opts)
        }
        do {
            try attempt()
            return
        } catch Errno.staleNFSFileHandle where !Overlay.hasCopyUps(g) {
            try g.upper.removeExtendedAttribute("trusted.overlay.origin")
            if (try? g.work.stat(FileName("index"))) != nil { try g.work.removeTree(FileName("index")) }
            try attempt()
        } catch Errno.staleNFSFileHandle {
            throw InputError(
                "the overlay's index does not match its layers (restored from a backup?) and the guest has copy-ups; "
                    + "export it from where it was made")
        }
    }

    /// Unmounts what is mounted at `path` (never lazily: a busy guest stays
    /// mounted). A mount that was in use a moment ago (a reader just exited)
    /// is tried again a few times.
    static func unmount(_ path: FilePath) throws {
        var attempt = 0
        while true {
            do {
                try unmountFilesystem(path)
                return
            } catch Errno.resourceBusy where attempt < 4 {
                attempt += 1
                sleep(microseconds: 50_000)
            }
        }
    }

    /// Whether `dir` is the root of a mount (its mount differs from its parent's).
    static func isMountPoint(_ dir: Directory) -> Bool {
        guard let st = try? dir.stat(), let parent = try? dir.openDirectory(FileName("..")),
            let pst = try? parent.stat()
        else { return false }
        // A btrfs subvolume has a device of its own but is no mount: the mount IDs (Linux 5.8+) tell.
        if st.mountID != 0 && pst.mountID != 0 { return st.mountID != pst.mountID }
        return st.device != pst.device
    }

    /// The super options of the mount whose root `dir` is, from /proc/self/mountinfo.
    static func superOptions(of dir: Directory) -> String? {
        guard let id = try? dir.stat().mountID, id != 0,
            let info = try? Directory.open(path: "/proc/self").openFileForReading(FileName("mountinfo")).readAll()
        else { return nil }
        for line in info.split(separator: 0x0a) {
            let fields = line.split(separator: 0x20)
            guard let first = fields.first, UInt64(String(decoding: first, as: UTF8.self)) == id,
                let dash = fields.firstIndex(of: [0x2d]), fields.count > dash + 3
            else { continue }
            return String(decoding: fields[dash + 3], as: UTF8.self)
        }
        return nil
    }

    /// True when `dir` is an overlay mount of generation `g`.
    static func isMounted(_ g: OverlayGuest.Generation, at dir: Directory) -> Bool {
        mountedLayout(g, at: dir) != nil
    }

    /// The layout of the overlay mount of generation `g` at `dir`, or nil when `dir` is not one.
    static func mountedLayout(_ g: OverlayGuest.Generation, at dir: Directory) -> Layout? {
        guard isMountPoint(dir), dir.filesystemType == superMagic, let opts = superOptions(of: dir) else {
            return nil
        }
        let upper = "upperdir=\(mountinfoEscaped(g.upperPath))"
        guard opts.contains(upper + ",") || opts.hasSuffix(upper) else { return nil }
        let bottom = g.isImage ? imageMountPath(g) : g.layers[g.layers.count - 1].path
        return opts.contains("\(mountinfoEscaped(bottom))::") ? .dataOnly : .lower
    }

    /// A path as mountinfo shows it: space, tab, newline and backslash as octal.
    static func mountinfoEscaped(_ path: FilePath) -> String {
        var escaped = ""
        for c in path.string {
            switch c {
            case " ": escaped += "\\040"
            case "\t": escaped += "\\011"
            case "\n": escaped += "\\012"
            case "\\": escaped += "\\134"
            default: escaped.append(c)
            }
        }
        return escaped
    }

    /// Why this kernel cannot make or mount a generation's image, or nil:
    /// a stub is a sparse file, which EROFS holds from Linux 5.15 on (chunk-based files).
    static func imageUnsupportedReason() -> String? {
        let (major, minor) = kernelVersion()
        guard (major, minor) < (5, 15) else { return nil }
        return
            "overlay guests keep their metadata in EROFS images whose stubs are sparse files, which EROFS reads from Linux 5.15 on (this is Linux \(major).\(minor)); nothing changed"
    }

    /// Why this kernel or filesystem cannot hold overlay guests, or nil when it can.
    static func unsupportedReason(store: Store) -> String? {
        if let why = imageUnsupportedReason() { return why }
        let probe = FileName("xattr-probe")
        try? store.directory.unlink(probe)
        defer { try? store.directory.unlink(probe) }
        do {
            let f = try store.directory.createFile(probe, mode: 0o600)
            try f.setExtendedAttribute(ExtendedAttribute(name: Array("trusted.hashify.probe".utf8), value: [0x31]))
        } catch {
            return
                "the filesystem of the store \(store.path) has no trusted xattrs (\(error)); overlay layers need them"
        }
        return nil
    }
}
