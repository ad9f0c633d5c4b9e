import HashifySystem
import SystemPackage

/// Copies a tree entry by entry with every attribute a guest can see:
/// type, mode, owner, mtime, every xattr, symlink target, device numbers and
/// which names are hard links of one another. Regular files are made by a
/// policy (a stub for a metadata layer, a full copy for an export); the copier
/// does everything else. Traversal is relative to directory descriptors, never
/// follows a symlink and refuses to cross into another mount.
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
    }

    /// Makes regular file `file.name` in `destination` (content or stub) and
    /// returns it open, for the copier to give it its attributes; or nil when
    /// it linked the source inode itself (a clone's shared objects), which has them.
    typealias RegularFilePolicy = (_ file: SourceFile, _ destination: Directory) throws -> OpenFile?
    /// Per-directory context the policy may keep (for a fold: the matching
    /// directories of the old layers); given the parent's context and the name.
    typealias ContextPolicy = (_ parent: AnyObject?, _ name: FileName) -> AnyObject?

    /// An error while copying one entry, with the entry's path below the source root.
    struct EntryFailed: Error, CustomStringConvertible {
        var path: [UInt8]
        var error: any Error
        var description: String { "/\(escapedPath(path)): \(error)" }
    }

    /// A source entry that is a mount point (the guest is in use, or the tree is not one filesystem).
    struct MountInside: Error, CustomStringConvertible {
        var path: [UInt8]
        var description: String {
            "\(escapedPath(path)) is a mount point (stop the guest and unmount what is mounted in it)"
        }
    }

    /// Writes guest xattrs named `trusted.overlay.*` as `trusted.overlay.overlay.*`
    /// (what overlayfs reads back as the guest's own): set for metadata layers.
    let escapeOverlayAttributes: Bool
    let regularFile: RegularFilePolicy
    let context: ContextPolicy?
    /// Source inode → the first name made for it, while more names are to come.
    private var links: [UInt64: (Directory, FileName, UInt32)] = [:]
    private var mountID: UInt64 = 0
    private(set) var entries = 0
    var onEntry: ((Int) -> Void)?
    /// Entries that vanish while being copied are left out (a live guest's
    /// tree read for a backup), instead of failing the copy.
    var skipVanished = false
    private(set) var vanished = 0

    init(escapeOverlayAttributes: Bool, context: ContextPolicy? = nil, regularFile: @escaping RegularFilePolicy) {
        self.escapeOverlayAttributes = escapeOverlayAttributes
        self.context = context
        self.regularFile = regularFile
    }

    /// Copies everything below `source` into the empty directory `destination`
    /// and gives `destination` the source root's attributes.
    func copy(_ source: Directory, into destination: Directory, rootContext: AnyObject? = nil) throws {
        let st = try source.stat()
        mountID = st.mountID
        try copyContents(source, into: destination, path: [], context: rootContext)
        try applyDirectoryAttributes(of: source, stat: st, to: destination)
    }

    private func copyContents(
        _ source: Directory, into destination: Directory, path: [UInt8], context parent: AnyObject?
    ) throws {
        var names = try source.entryNames()
        names.sort()
        for name in names {
            do {
                try copyEntry(name, of: source, into: destination, path: path, context: parent)
            } catch Errno.noSuchFileOrDirectory where skipVanished {
                vanished += 1
                try? destination.removeTree(name)
            } catch let e as EntryFailed {
                throw e
            } catch let e as MountInside {
                throw e
            } catch let e as InputError {
                throw e
            } catch {
                throw EntryFailed(path: path.isEmpty ? name.bytes : path + [0x2f] + name.bytes, error: error)
            }
        }
    }

    private func copyEntry(
        _ name: FileName, of source: Directory, into destination: Directory, path: [UInt8], context parent: AnyObject?
    ) throws {
        let st = try source.stat(name)
        let sub = path.isEmpty ? name.bytes : path + [0x2f] + name.bytes
        entries += 1
        onEntry?(entries)
        switch st.fileType {
        case 0o040000:
            if st.mountID != mountID { throw MountInside(path: sub) }
            let from = try source.openDirectory(name)
            try destination.makeDirectory(name, mode: 0o700)
            let to = try destination.openDirectory(name)
            try copyContents(from, into: to, path: sub, context: context?(parent, name))
            try applyDirectoryAttributes(of: from, stat: st, to: to)
        case 0o100000:
            if st.linkCount > 1, let (dir, first, left) = links[st.inode] {
                try dir.link(first, to: destination, as: name)
                if left <= 1 { links[st.inode] = nil } else { links[st.inode] = (dir, first, left - 1) }
                return
            }
            let handle = try source.openFileForReading(name)
            let file = SourceFile(directory: source, name: name, stat: st, handle: handle, path: sub, context: parent)
            if let made = try regularFile(file, destination) {
                try made.setOwner(uid: st.uid, gid: st.gid)
                try made.setMode(st.mode)
                for a in try handle.extendedAttributes() { try made.setExtendedAttribute(rename(a)) }
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
    }

    private func rename(_ a: ExtendedAttribute) -> ExtendedAttribute {
        guard escapeOverlayAttributes, a.name.starts(with: Self.overlayPrefix) else { return a }
        return ExtendedAttribute(
            name: Self.overlayPrefix + Array("overlay.".utf8) + a.name[Self.overlayPrefix.count...], value: a.value)
    }

    static let overlayPrefix = Array("trusted.overlay.".utf8)

    private func applyDirectoryAttributes(of source: Directory, stat st: FileStat, to destination: Directory) throws {
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
