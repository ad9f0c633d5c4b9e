import ErofsImage
import HashifySystem
import SystemPackage

extension Overlay {
    /// Builds generation `number` of `guest` from what `source`'s generation
    /// `generation` shows (read through its mount, or a private read-only
    /// one): what its upper layer does not touch is taken from its
    /// description unread, the rest is read and hashed, and the description
    /// is written as the new generation's image. For a fold, `source` is the
    /// guest itself; for a clone, the guest cloned: a clone of a generation
    /// with nothing to fold shares its image (a hard link: one file, one
    /// page-cache copy for both until one folds). The objects made for a
    /// build that fails are removed again.
    static func buildGeneration(
        _ number: Int, of guest: OverlayGuest, from source: OverlayGuest, generation: Int,
        session s: Session
    ) throws -> OverlayReport.Guest {
        var result = OverlayReport.Guest(root: guest.rootPath.string, action: .built)
        if let why = OverlayMount.imageUnsupportedReason() { throw InputError(why) }
        let old = try source.generation(generation)
        let next = try guest.makeGeneration(number)
        let live = try Directory.open(path: source.rootPath)
        let isLive = OverlayMount.isMounted(old, at: live)
        if source !== guest, old.isImage, !hasCopyUps(old) {
            try shareImage(of: old, with: next)
            result.filesUnchanged = (LayerReferences.read(old.imageLayer) ?? [:]).values.reduce(0, +)
            return result
        }
        let filler = StubFiller(objects: s.objects, threads: fillThreads)
        let builder = GenerationBuilder(filler: filler, lease: false) { _ in false }
        builder.skipVanished = isLive
        builder.linkUpperFiles = source === guest && !isLive
        do {
            let context = try FoldContext.root(of: old, reuse: !isLive)
            let build = { (merged: Directory) throws in
                merge(try builder.build(merged, context: context), into: &result)
                try GuestImage.write(builder.tree, into: next, number: number)
                // The objects made of the upper layer's own files are recorded only after the switch.
                let reserved = s.objects.reservations
                if !reserved.isEmpty {
                    try next.writeAtomically(reserved.flatMap(\.journalLine), as: foldObjectsJournalName)
                }
                let gen = try guest.generation(number)
                try copyRootAttributes(from: merged, to: gen.upper)
                try gen.markEscapedAttributes(builder.escapedAttributes)
            }
            if isLive { try build(live) } else { try withPrivateMount(source, old, session: s, build) }
            try s.objects.sync()
        } catch {
            s.objects.abandonReservations()
            s.objects.remove(filler.objectsMade)
            throw error
        }
        result.stubs = builder.stubs
        result.inlineFiles = builder.inlineFiles
        result.filesUnchanged = builder.filesUnchanged
        result.filesHashed = builder.filesHashed
        return result
    }

    /// Gives a new upper root the old upper root's owner, mode, mtime and
    /// xattrs but overlayfs' own (what the guest's root shows).
    static func copyLayerRootAttributes(from old: Directory, stat st: FileStat, to upper: Directory) throws {
        try upper.changeOwner(uid: st.uid, gid: st.gid)
        try upper.changeMode(st.mode)
        for a in try old.extendedAttributes() where !isOverlayOwn(a.name) { try upper.setExtendedAttribute(a) }
        try upper.setModificationTime(st.modificationTime)
    }

    /// A clone of a generation with nothing to fold: its image, digest,
    /// references and escape marker are hard links to the source's, and its
    /// empty upper root takes the source's attributes.
    static func shareImage(of old: OverlayGuest.Generation, with next: Directory) throws {
        for name in [
            GuestImage.fileName, GuestImage.digestName, LayerReferences.fileName(GuestImage.layerName),
            OverlayGuest.escapedMarker,
        ]
        where (try? old.directory.stat(name)) != nil {
            try old.directory.link(name, to: next, as: name)
        }
        try copyLayerRootAttributes(
            from: old.upper, stat: try old.upper.stat(), to: try next.openDirectory(FileName("upper")))
        try next.sync()
    }
}
