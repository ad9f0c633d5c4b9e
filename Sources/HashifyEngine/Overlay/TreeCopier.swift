import HashifySystem
import SystemPackage

/// Copies a tree entry by entry with every attribute a guest can see:
/// type, mode, owner, mtime, every xattr, symlink target, device numbers and
/// which names are hard links of one another. Regular files are made by a
/// policy (a full copy for an export, a link of an object for a clone); the copier
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
        /// The file's xattrs, as the guest has them.
        var attributes: [ExtendedAttribute]

        /// Whether the file carries xattrs overlayfs would read as its own
        /// (`trusted.overlay.*`): such an inode must never become a data object
        /// itself, where an ordinary lower layer's lookup would obey them.
        var carriesOverlayNames: Bool { attributes.contains { $0.name.starts(with: TreeCopier.overlayPrefix) } }
    }

    /// Makes regular file `file.name` in `destination` (a full copy for an
    /// export, a clone) and returns it open, for the copier to give it its
    /// attributes; or nil when it linked the source inode itself (a clone's
    /// shared objects), which has them.
    typealias RegularFilePolicy = (_ file: SourceFile, _ destination: Directory) throws -> OpenFile?

    let regularFile: RegularFilePolicy
    /// Source inode → the first name made for it, while more names are to come.
    private var links: [UInt64: (Directory, FileName, UInt32)] = [:]
    private(set) var entries = 0
    var onEntry: ((Int) -> Void)?
    /// Entries that vanish while being copied are left out (a live guest's
    /// tree read for a backup), instead of failing the copy.
    var skipVanished = false
    private(set) var vanished = 0

    init(regularFile: @escaping RegularFilePolicy) {
        self.regularFile = regularFile
    }

    /// Copies everything below `source` into the empty directory `destination`
    /// and gives `destination` the source root's attributes. A mount point
    /// inside the source fails the copy (`TreeTraversal.MountInside`).
    func copy(_ source: Directory, into destination: Directory) throws {
        var traversal = TreeTraversal<Directory>()
        traversal.skipVanished = skipVanished
        traversal.onVanished = { name, destination in try? destination.removeTree(name) }
        try traversal.run(
            source, context: destination,
            visit: { entry, destination in try copyEntry(entry, into: destination) },
            leave: { dir, destination in
                try Self.copyDirectoryAttributes(of: dir, stat: try dir.stat(), to: destination)
            })
        vanished = traversal.vanished
    }

    private func copyEntry(_ entry: TreeTraversal<Directory>.Entry, into destination: Directory) throws
        -> TreeTraversal<Directory>.Step
    {
        let (source, name, st) = (entry.directory, entry.name, entry.stat)
        entries += 1
        onEntry?(entries)
        switch st.fileType {
        case 0o040000:
            try destination.makeDirectory(name, mode: 0o700)
            return .enter(try destination.openDirectory(name))
        case 0o100000:
            if st.linkCount > 1, let (dir, first, left) = links[st.inode] {
                try dir.link(first, to: destination, as: name)
                if left <= 1 { links[st.inode] = nil } else { links[st.inode] = (dir, first, left - 1) }
                return .next
            }
            let handle = try source.openFileForReading(name)
            let file = SourceFile(
                directory: source, name: name, stat: st, handle: handle, path: entry.path,
                attributes: try handle.extendedAttributes())
            if let made = try regularFile(file, destination) {
                try made.setOwner(uid: st.uid, gid: st.gid)
                try made.setMode(st.mode)
                for a in file.attributes { try made.setExtendedAttribute(a) }
                try made.setModificationTime(st.modificationTime)
            }
            if st.linkCount > 1 { links[st.inode] = (destination, name, st.linkCount - 1) }
        case 0o120000:
            try destination.makeSymlink(name, target: try source.readLink(name))
            try applyAttributes(of: source, name, stat: st, to: destination, isSymlink: true)
        default:
            // FIFOs, sockets, character and block devices.
            try destination.makeNode(name, mode: st.mode & 0o170000 | 0o600, device: st.deviceNumber)
            try applyAttributes(of: source, name, stat: st, to: destination, isSymlink: false)
        }
        return .next
    }

    static let overlayPrefix = Array("trusted.overlay.".utf8)
    /// How overlayfs (and the copier) writes a guest's own `trusted.overlay.*` xattr in a layer.
    static let escapedPrefix = Array("trusted.overlay.overlay.".utf8)
    static let metacopyName = Array("trusted.overlay.metacopy".utf8)

    /// Gives `destination` the owner, mode, xattrs and mtime of the directory `source` (mtime last).
    static func copyDirectoryAttributes(of source: Directory, stat st: FileStat, to destination: Directory) throws {
        try destination.changeOwner(uid: st.uid, gid: st.gid)
        try destination.changeMode(st.mode)
        for a in try source.extendedAttributes() { try destination.setExtendedAttribute(a) }
        try destination.setModificationTime(st.modificationTime)
    }

    private func applyAttributes(
        of source: Directory, _ name: FileName, stat st: FileStat, to destination: Directory, isSymlink: Bool
    ) throws {
        try destination.changeOwner(of: name, uid: st.uid, gid: st.gid)
        if !isSymlink { try destination.changeMode(of: name, st.mode) }
        for a in try extendedAttributes(in: source, of: name) {
            try setExtendedAttribute(in: destination, of: name, a)
        }
        try destination.setModificationTime(of: name, st.modificationTime)
    }
}
