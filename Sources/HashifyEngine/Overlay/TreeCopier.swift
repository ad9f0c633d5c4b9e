import HashifySystem
import SystemPackage

/// Copies a tree entry by entry with every attribute a guest can see:
/// type, mode, owner, mtime, every xattr, symlink target, device numbers and
/// which names are hard links of one another. Regular files are made by a
/// policy (a stub for a metadata layer, a full copy for an export); the copier
/// does everything else. The tree is read by `TreeTraversal` (relative to
/// directory descriptors, never following a symlink); a mount point inside
/// it fails the copy.
final class TreeCopier {
    /// What the copier knows of the regular file it asks the policy to make.
    struct SourceFile {
        var directory: Directory
        var name: FileName
        var stat: FileStat
        /// The file, open for reading (`O_NOFOLLOW`, `O_NOATIME`).
        var handle: OpenFile
        /// The path below the source root, for messages.
        var path: [UInt8]
        /// Where in the tree the file is (the policy's own per-directory state).
        var context: AnyObject?
        /// The file's xattrs, as the guest has them.
        var attributes: [ExtendedAttribute]

        /// Whether the file carries xattrs overlayfs would read as its own
        /// (`trusted.overlay.*`): such an inode must never become a data object
        /// itself, where an ordinary lower layer's lookup would obey them.
        var carriesOverlayNames: Bool { attributes.contains { $0.name.starts(with: TreeCopier.overlayPrefix) } }
    }

    /// Makes regular file `file.name` in `destination` (content or stub) and
    /// returns it open, for the copier to give it its attributes; or nil when
    /// it linked the source inode itself (a clone's shared objects), which has them.
    typealias RegularFilePolicy = (_ file: SourceFile, _ destination: Directory) throws -> OpenFile?
    /// Per-directory context the policy may keep (for a fold: the matching
    /// directories of the old layers); given the parent's context and the name.
    typealias ContextPolicy = (_ parent: AnyObject?, _ name: FileName) -> AnyObject?

    /// What becomes of a guest's own xattrs named `trusted.overlay.*` and of
    /// its character devices 0/0, both of which overlayfs would take for its own.
    enum OverlayNames {
        /// Copied as they are (a plain copy: an export).
        case keep
        /// Xattrs written as `trusted.overlay.overlay.*`, which overlayfs
        /// (Linux 6.7+) reads back as the guest's own; a 0/0 device fails the copy.
        case escape
    }
    let overlayNames: OverlayNames
    /// Guest xattrs written escaped (a generation holding any needs Linux 6.7 to show them).
    private(set) var escapedAttributes = 0
    let regularFile: RegularFilePolicy
    let context: ContextPolicy?
    /// Source inode → the first name made for it, while more names are to come.
    private var links: [UInt64: (Directory, FileName, UInt32)] = [:]
    private(set) var entries = 0
    var onEntry: ((Int) -> Void)?
    /// Fills a directory just made in the destination some other way (a
    /// fold links an unchanged subtree of the old layer), given the context
    /// the policy made for it; true when it did, attributes included: the
    /// copier then does not enter the source's.
    var subtree: ((_ context: AnyObject?, _ destination: Directory) throws -> Bool)?
    /// Makes a non-directory entry some other way before the source is
    /// opened (a fold links an unchanged entry of the old layer); true when it did.
    var unchanged: ((_ context: AnyObject?, _ name: FileName, _ destination: Directory) throws -> Bool)?
    /// Entries that vanish while being copied are left out (a live guest's
    /// tree read for a backup), instead of failing the copy.
    var skipVanished = false
    private(set) var vanished = 0
    /// Files whose stub could not hold their xattrs besides its own (a full
    /// xattr space): each made a whole copy instead, the first one's path kept.
    private(set) var keptWhole = 0
    private(set) var firstKeptWhole: [UInt8]?

    init(overlayNames: OverlayNames, context: ContextPolicy? = nil, regularFile: @escaping RegularFilePolicy) {
        self.overlayNames = overlayNames
        self.context = context
        self.regularFile = regularFile
    }

    /// Where an entry is copied to: the destination directory and the policy's context there.
    private struct Place {
        var destination: Directory
        var context: AnyObject?
    }

    /// Copies everything below `source` into the empty directory `destination`
    /// and gives `destination` the source root's attributes. A mount point
    /// inside the source fails the copy (`TreeTraversal.MountInside`).
    func copy(_ source: Directory, into destination: Directory, rootContext: AnyObject? = nil) throws {
        var traversal = TreeTraversal<Place>()
        traversal.skipVanished = skipVanished
        traversal.onVanished = { name, place in try? place.destination.removeTree(name) }
        try traversal.run(
            source, context: Place(destination: destination, context: rootContext),
            visit: { entry, place in try copyEntry(entry, into: place) },
            leave: { dir, place in try applyDirectoryAttributes(of: dir, stat: try dir.stat(), to: place.destination) })
        vanished = traversal.vanished
    }

    private func copyEntry(_ entry: TreeTraversal<Place>.Entry, into place: Place) throws -> TreeTraversal<Place>.Step {
        let (source, name, st, destination) = (entry.directory, entry.name, entry.stat, place.destination)
        entries += 1
        onEntry?(entries)
        switch st.fileType {
        case 0o040000:
            try destination.makeDirectory(name, mode: 0o700)
            let made = try destination.openDirectory(name)
            let childContext = context?(place.context, name)
            if let subtree, try subtree(childContext, made) { return .next }
            return .enter(Place(destination: made, context: childContext))
        case 0o100000:
            if st.linkCount > 1, let (dir, first, left) = links[st.inode] {
                try dir.link(first, to: destination, as: name)
                if left <= 1 { links[st.inode] = nil } else { links[st.inode] = (dir, first, left - 1) }
                return .next
            }
            if let unchanged, try unchanged(place.context, name, destination) {
                if st.linkCount > 1 { links[st.inode] = (destination, name, st.linkCount - 1) }
                return .next
            }
            let handle = try source.openFileForReading(name)
            let file = SourceFile(
                directory: source, name: name, stat: st, handle: handle, path: entry.path, context: place.context,
                attributes: try handle.extendedAttributes())
            if var made = try regularFile(file, destination) {
                try made.setOwner(uid: st.uid, gid: st.gid)
                try made.setMode(st.mode)
                do {
                    for a in file.attributes { try made.setExtendedAttribute(rename(a)) }
                } catch let e as Errno
                    where (e == .noSpace || e == .argListTooLong)
                    && made.extendedAttribute("trusted.overlay.metacopy") != nil
                {
                    // The stub's own xattrs and the file's do not fit together: the file stays whole.
                    try destination.unlink(name)
                    made = try destination.createFile(name, mode: 0o600)
                    // A descriptor of its own: the filler may be reading the file through `handle`.
                    try source.openFileForReading(name).cloneContent(to: made, size: st.size)
                    guard try made.stat().size == st.size else { throw Errno.ioError }
                    try made.setOwner(uid: st.uid, gid: st.gid)
                    try made.setMode(st.mode)
                    for a in file.attributes { try made.setExtendedAttribute(rename(a)) }
                    keptWhole += 1
                    if firstKeptWhole == nil { firstKeptWhole = entry.path }
                }
                try made.setModificationTime(st.modificationTime)
            }
            if st.linkCount > 1 { links[st.inode] = (destination, name, st.linkCount - 1) }
        case 0o120000:
            if let unchanged, try unchanged(place.context, name, destination) { return .next }
            try destination.makeSymlink(name, target: try source.readLink(name))
            try applyAttributes(of: source, name, stat: st, to: destination, isSymlink: true)
        default:
            // FIFOs, sockets, character and block devices.
            if let unchanged, try unchanged(place.context, name, destination) { return .next }
            if overlayNames == .escape, st.fileType == 0o020000, st.deviceNumber == 0 {
                throw InputError(
                    "\(escapedPath(entry.path)): a character device 0/0, which overlayfs would take for a whiteout (the file would vanish from the guest); overlay mode cannot hold it"
                )
            }
            try destination.makeNode(name, mode: st.mode & 0o170000 | 0o600, device: st.deviceNumber)
            try applyAttributes(of: source, name, stat: st, to: destination, isSymlink: false)
        }
        return .next
    }

    private func rename(_ a: ExtendedAttribute) -> ExtendedAttribute {
        guard overlayNames == .escape, a.name.starts(with: Self.overlayPrefix) else { return a }
        escapedAttributes += 1
        return ExtendedAttribute(
            name: Self.overlayPrefix + Array("overlay.".utf8) + a.name[Self.overlayPrefix.count...], value: a.value)
    }

    static let overlayPrefix = Array("trusted.overlay.".utf8)
    /// How overlayfs (and the copier) writes a guest's own `trusted.overlay.*` xattr in a layer.
    static let escapedPrefix = Array("trusted.overlay.overlay.".utf8)
    static let metacopyName = Array("trusted.overlay.metacopy".utf8)

    private func applyDirectoryAttributes(of source: Directory, stat st: FileStat, to destination: Directory) throws {
        try Self.copyDirectoryAttributes(of: source, stat: st, to: destination, rename)
    }

    /// Gives `destination` the owner, mode, xattrs (each through `rename`)
    /// and mtime of the directory `source` (mtime last).
    static func copyDirectoryAttributes(
        of source: Directory, stat st: FileStat, to destination: Directory,
        _ rename: (ExtendedAttribute) -> ExtendedAttribute = { $0 }
    ) throws {
        try destination.changeOwner(uid: st.uid, gid: st.gid)
        try destination.changeMode(st.mode)
        for a in try source.extendedAttributes() { try destination.setExtendedAttribute(rename(a)) }
        try destination.setModificationTime(st.modificationTime)
    }

    private func applyAttributes(
        of source: Directory, _ name: FileName, stat st: FileStat, to destination: Directory, isSymlink: Bool
    ) throws {
        try destination.changeOwner(of: name, uid: st.uid, gid: st.gid)
        if !isSymlink { try destination.changeMode(of: name, st.mode) }
        for a in try extendedAttributes(in: source, of: name) {
            try setExtendedAttribute(in: destination, of: name, rename(a))
        }
        try destination.setModificationTime(of: name, st.modificationTime)
    }
}
