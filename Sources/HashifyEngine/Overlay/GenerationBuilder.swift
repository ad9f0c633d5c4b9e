import ErofsImage
import HashifySystem
import SystemPackage

/// Builds the description of a generation (`GuestImage`) by reading a tree:
/// a plain guest (`convert`), or the merged view of an overlay guest's
/// generation (a fold, a clone). Regular files above `Overlay.inlineLimit`
/// become stubs; a `StubFiller` hashes them on several threads and finds or
/// makes their objects, and each stub gets its redirect when `finish` has
/// waited for them all.
///
/// Reading a merged view, the builder takes what the generation's upper
/// layer does not touch from the old generation's description as it is
/// (`FoldContext.unchangedNode`): a whole unchanged subtree costs no read of
/// the merged view, so a fold costs about what the guest changed.
final class GenerationBuilder {
    private(set) var tree: ErofsTree
    let filler: StubFiller
    /// Hash under a read lease (a plain guest's files: no writer may have them open).
    let lease: Bool
    /// Whether a file's own inode may become its object (a conversion's, not shared outside the guest).
    let linkSource: (TreeCopier.SourceFile) -> Bool
    /// Entries that vanish while being read are left out (a live source).
    var skipVanished = false
    /// A fold of its own stopped guest: a file the upper layer holds whole
    /// becomes the data object itself (linked, reserved until the switch
    /// makes the upper layer no guest's), nothing copied.
    var linkUpperFiles = false
    private(set) var vanished = 0
    /// Counts for the guest's report.
    private(set) var stubs = 0
    private(set) var inlineFiles = 0
    private(set) var filesUnchanged = 0
    private(set) var filesHashed = 0
    private(set) var entries = 0
    var onEntry: ((Int) -> Void)?
    /// Stubs waiting for their redirect (keyed by node in the filler).
    private var pending: [ErofsTree.NodeID] = []
    /// Source (device, inode) of a file with several names → its node.
    private var links: [[UInt64]: ErofsTree.NodeID] = [:]
    /// Old description's node → the node adopted for it (hard links stay links).
    private var adopted: [ErofsTree.NodeID: ErofsTree.NodeID] = [:]

    init(filler: StubFiller, lease: Bool, linkSource: @escaping (TreeCopier.SourceFile) -> Bool) {
        self.filler = filler
        self.lease = lease
        self.linkSource = linkSource
        tree = ErofsTree(root: .directory())
    }

    /// Where the walk is: the directory's node and its place in the old generation.
    private struct Place {
        var node: ErofsTree.NodeID
        var context: Overlay.FoldContext?
    }

    /// Describes everything below `source` (and the root's own attributes);
    /// `context` places the root in the old generation (nil: read everything).
    /// Waits for every hashed file; the description is then complete.
    func build(_ source: Directory, context: Overlay.FoldContext?) throws -> StubFiller.Counts {
        do {
            try describe(source, context: context)
        } catch {
            _ = try? filler.finish()
            throw error
        }
        let counts = try filler.finish()
        let results = filler.results
        for id in pending {
            guard let r = results[id] else { throw InputError("a file's data object was not found") }
            tree[id].xattrs.append(ExtendedAttribute(name: GuestImage.redirectName, value: r))
        }
        pending = []
        GuestImage.addHiding(&tree)
        return counts
    }

    /// Guest xattrs written escaped in the description (a generation holding any needs Linux 6.7).
    var escapedAttributes: Int {
        tree.nodes.reduce(0) { n, node in
            n + node.xattrs.filter { $0.name.starts(with: TreeCopier.escapedPrefix) }.count
        }
    }

    private func describe(_ source: Directory, context: Overlay.FoldContext?) throws {
        let rootStat = try source.stat()
        tree[ErofsTree.rootID] = node(.directory([]), rootStat, try source.extendedAttributes())
        var traversal = TreeTraversal<Place>()
        traversal.skipVanished = skipVanished
        func counted() {
            entries += 1
            onEntry?(entries)
        }
        // What the upper layer does not touch is the old description's, taken without a lookup in the merged view.
        traversal.takeUnread = { [self] name, place in
            guard let old = place.context?.unchangedNode(name) else { return false }
            counted()
            adopt(old.id, from: old.image, as: name.bytes, in: place.node)
            return true
        }
        try traversal.run(source, context: Place(node: ErofsTree.rootID, context: context)) { entry, place in
            counted()
            return try read(entry, in: place)
        }
        vanished = traversal.vanished
    }

    /// A node of the description with a source entry's attributes and its xattrs in the layer's form.
    private func node(_ kind: ErofsNode.Kind, _ st: FileStat, _ attributes: [ExtendedAttribute]) -> ErofsNode {
        ErofsNode(
            kind, permissions: UInt16(st.mode & 0o7777), uid: st.uid, gid: st.gid,
            modificationTime: st.modificationTime, xattrs: GuestImage.escaped(attributes).attributes)
    }

    /// Describes one entry read from the source.
    private func read(_ entry: TreeTraversal<Place>.Entry, in place: Place) throws -> TreeTraversal<Place>.Step {
        let (dir, name, st) = (entry.directory, entry.name, entry.stat)
        if st.isDirectory {
            let id = tree.add(
                node(.directory([]), st, try extendedAttributes(in: dir, of: name)), as: name.bytes, in: place.node)
            return .enter(Place(node: id, context: try place.context?.child(name)))
        }
        if st.linkCount > 1, let existing = links[[st.device, st.inode]] {
            tree.link(existing, as: name.bytes, in: place.node)
            return .next
        }
        let id: ErofsTree.NodeID
        switch st.fileType {
        case 0o100000:
            id = try regularFile(entry, in: place)
        case 0o120000:
            id = tree.add(
                node(.symlink(try dir.readLink(name)), st, try extendedAttributes(in: dir, of: name)), as: name.bytes,
                in: place.node)
        default:
            let kind: ErofsNode.Kind
            switch st.fileType {
            case 0o020000:
                if st.deviceNumber == 0 {
                    throw InputError(
                        "\(escapedPath(entry.path)): a character device 0/0, which overlayfs would take for a whiteout (the file would vanish from the guest); overlay mode cannot hold it"
                    )
                }
                kind = .characterDevice(rdev: st.deviceNumber)
            case 0o060000: kind = .blockDevice(rdev: st.deviceNumber)
            case 0o010000: kind = .fifo
            case 0o140000: kind = .socket
            default: throw InputError("\(escapedPath(entry.path)): a file of an unknown type")
            }
            id = tree.add(node(kind, st, try extendedAttributes(in: dir, of: name)), as: name.bytes, in: place.node)
        }
        if st.linkCount > 1 { links[[st.device, st.inode]] = id }
        return .next
    }

    /// Describes a regular file: inline when small; else a stub of the
    /// object it still has from the old generation, or of the object the
    /// filler finds or makes from its content.
    private func regularFile(_ entry: TreeTraversal<Place>.Entry, in place: Place) throws -> ErofsTree.NodeID {
        let (dir, name, st) = (entry.directory, entry.name, entry.stat)
        let handle = try dir.openFileForReading(name)
        // A file replaced since it was stat'd: vanished (the filler would find it changed).
        if skipVanished || st.size <= Overlay.inlineLimit, try handle.stat().inode != st.inode {
            throw Errno.noSuchFileOrDirectory
        }
        let attributes = try handle.extendedAttributes()
        if st.size <= Overlay.inlineLimit {
            inlineFiles += 1
            let bytes = try handle.readAll()
            guard bytes.count == st.size else {
                throw InputError("\(escapedPath(entry.path)): changed while being read (is the guest running?)")
            }
            return tree.add(node(.file(.inline(bytes)), st, attributes), as: name.bytes, in: place.node)
        }
        stubs += 1
        var stub = node(.file(.external(size: st.size)), st, attributes)
        stub.xattrs.append(ExtendedAttribute(name: TreeCopier.metacopyName, value: []))
        if let r = try place.context?.unchangedRedirect(name, size: st.size), filler.isLive(r) {
            filesUnchanged += 1
            stub.xattrs.append(ExtendedAttribute(name: GuestImage.redirectName, value: r))
            return tree.add(stub, as: name.bytes, in: place.node)
        }
        filesHashed += 1
        let id = tree.add(stub, as: name.bytes, in: place.node)
        if linkUpperFiles, let upper = place.context?.upper,
            let (own, ownStat) = try Self.linkableUpperFile(name, in: upper, matching: st)
        {
            let file = TreeCopier.SourceFile(
                directory: upper, name: name, stat: ownStat, handle: own, path: entry.path, attributes: attributes)
            filler.fill(file, lease: false, linkSource: true, key: id)
        } else {
            let file = TreeCopier.SourceFile(
                directory: dir, name: name, stat: st, handle: handle, path: entry.path, attributes: attributes)
            filler.fill(file, lease: lease, linkSource: linkSource(file), key: id)
        }
        pending.append(id)
        return id
    }

    /// The upper layer's own file under `name` when the merged file `st` is
    /// it whole: a regular file of one link, of the same size and mtime,
    /// carrying no `trusted.overlay.*` xattr (neither overlayfs' own nor a
    /// guest's escaped one: an object must carry none). Its inode may then
    /// become the data object once the fold's switch has made the upper
    /// layer no guest's. A read error throws.
    static func linkableUpperFile(_ name: FileName, in upper: Directory, matching st: FileStat) throws -> (
        OpenFile, FileStat
    )? {
        let file: OpenFile
        do { file = try upper.openFileForReading(name) } catch Errno.noSuchFileOrDirectory, Errno
            .tooManySymbolicLinkLevels, Errno.isDirectory
        {
            return nil
        }
        let own = try file.stat()
        guard own.isRegular, own.linkCount == 1, own.size == st.size, own.modificationTime == st.modificationTime,
            try !file.extendedAttributes().contains(where: { $0.name.starts(with: TreeCopier.overlayPrefix) })
        else { return nil }
        return (file, own)
    }

    /// Takes node `old` of the old generation's description (a whole subtree
    /// for a directory) as the entry `name` of `parent`: what the guest did
    /// not touch is described as it was, unread.
    private func adopt(
        _ old: ErofsTree.NodeID, from image: Overlay.OldImage, as name: [UInt8], in parent: ErofsTree.NodeID
    ) {
        var work: [(ErofsTree.NodeID, [UInt8], ErofsTree.NodeID)] = [(old, name, parent)]
        while let (old, name, parent) = work.popLast() {
            if let made = adopted[old] {
                tree.link(made, as: name, in: parent)
                continue
            }
            var node = image.tree[old]
            let children = image.tree.entries(of: old)
            if node.isDirectory { node.kind = .directory([]) }
            let id = tree.add(node, as: name, in: parent)
            if !node.isDirectory {
                if image.linkCounts[old] > 1 { adopted[old] = id }
                filesUnchanged += 1
                if case .file(.inline) = node.kind {
                    inlineFiles += 1
                } else if GuestImage.redirect(of: node) != nil {
                    stubs += 1
                }
            }
            for e in children.reversed() { work.append((e.node, e.name, id)) }
        }
    }
}
