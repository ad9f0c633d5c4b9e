import HashifySystem
import SystemPackage

extension Overlay {
    static let protectedAttributeName = Array("trusted.overlay.protattr".utf8)

    /// Puts in a new upper layer each entry of the old one that carries
    /// overlayfs' `trusted.overlay.protattr` (immutable or append-only, set
    /// through the mount): overlayfs reads it from the upper layer only, so
    /// once the old upper layer is a lower one the flag would be lost. A
    /// directory is made with the old one's attributes (it merges with the
    /// layers below); a regular file becomes a metadata-only copy-up
    /// (`trusted.overlay.metacopy`: its data is the layer below's at the same
    /// path) with its attributes and the flag. The directories on the way are
    /// made with their attributes too. Returns the entries carried.
    static func carryProtectedAttributes(
        _ protected: [(path: [UInt8], flag: [UInt8])], from old: Directory, to upper: Directory
    )
        throws -> Int
    {
        guard !protected.isEmpty else { return 0 }
        let rootTime = try upper.stat().modificationTime
        var times: [[UInt8]: (Directory, Timestamp)] = [:]
        // The directory at `path` in the new upper, made (with the old one's attributes) when missing.
        func directory(_ path: [UInt8]) throws -> (made: Directory, old: Directory) {
            if path.isEmpty { return (upper, old) }
            let (parentPath, name) = splitLast(path)
            let (parent, oldParent) = try directory(parentPath)
            let oldDir = try oldParent.openDirectory(name)
            if (try? parent.stat(name)) == nil {
                try parent.makeDirectory(name, mode: 0o700)
                let made = try parent.openDirectory(name)
                try copyCarriedAttributes(
                    from: try oldDir.stat(), attributes: try oldDir.extendedAttributes(), owner: made.changeOwner,
                    mode: made.changeMode, set: made.setExtendedAttribute)
                times[path] = (made, try oldDir.stat().modificationTime)
            }
            return (try parent.openDirectory(name), oldDir)
        }
        let flagName = ExtendedAttribute(name: protectedAttributeName, value: []).name
        for (path, flag) in protected {
            if path.isEmpty {
                try upper.setExtendedAttribute(ExtendedAttribute(name: flagName, value: flag))
                continue
            }
            let (parentPath, name) = splitLast(path)
            let (dest, oldParent) = try directory(parentPath)
            let st = try oldParent.stat(name)
            if st.isDirectory {
                let (made, _) = try directory(path)
                try made.setExtendedAttribute(ExtendedAttribute(name: flagName, value: flag))
            } else {
                let f = try dest.createFile(name, mode: 0o600)
                try f.truncate(st.size)
                try f.setExtendedAttribute(ExtendedAttribute(name: TreeCopier.metacopyName, value: []))
                try copyCarriedAttributes(
                    from: st, attributes: try extendedAttributes(in: oldParent, of: name), owner: f.setOwner,
                    mode: f.setMode, set: f.setExtendedAttribute)
                try f.setExtendedAttribute(ExtendedAttribute(name: flagName, value: flag))
                try f.setModificationTime(st.modificationTime)
            }
        }
        for (dir, t) in times.values { try dir.setModificationTime(t) }
        try upper.setModificationTime(rootTime)
        return protected.count
    }

    /// The flag overlayfs' protection xattr gives a file or directory, if any.
    static func protectedFlag(_ st: FileStat, _ attributes: [ExtendedAttribute]) -> [UInt8]? {
        guard st.isDirectory || st.isRegular else { return nil }
        return attributes.first { $0.name == protectedAttributeName }?.value
    }

    /// The entries below an upper layer's root (files, directories) that
    /// carry overlayfs' protection flag, with the flag's value (a stacked
    /// fold notes them in its own walk of the layer; a compaction asks here).
    static func protectedEntries(in upper: Directory) throws -> [(path: [UInt8], flag: [UInt8])] {
        var out: [(path: [UInt8], flag: [UInt8])] = []
        var traversal = TreeTraversal<Void>()
        try traversal.run(upper, context: ()) { entry, _ in
            if let flag = protectedFlag(entry.stat, try extendedAttributes(in: entry.directory, of: entry.name)) {
                out.append((entry.path, flag))
            }
            return entry.stat.isDirectory ? .enter(()) : .next
        }
        return out
    }

    /// Gives an entry carried into a new upper layer the old one's owner,
    /// mode and xattrs (the guest's own, as the layer holds them, and
    /// overlayfs' protection flag; none of overlayfs' other names).
    static func copyCarriedAttributes(
        from st: FileStat, attributes: [ExtendedAttribute], owner: (UInt32, UInt32) throws -> Void,
        mode: (UInt32) throws -> Void, set: (ExtendedAttribute) throws -> Void
    ) throws {
        try owner(st.uid, st.gid)
        try mode(st.mode)
        for a in attributes where !isOverlayOwn(a.name) { try set(a) }
    }

    /// Xattr names overlayfs writes for itself on an upper layer's entries
    /// (origin, impure, nlink …): `trusted.overlay.*` but for the guest's own, escaped ones.
    static func isOverlayOwn(_ name: [UInt8]) -> Bool {
        name.starts(with: TreeCopier.overlayPrefix) && !name.starts(with: TreeCopier.escapedPrefix)
    }
}
