import HashifySystem
import SystemPackage

/// The store's objects of both kinds as `gc` and `verify` see them: one
/// listing, one rule of what references an object, one check of what it holds.
///
/// - A hardlink object (`objects/`) is referenced while a guest name links
///   its inode (link count above 1); it must hold the content and the
///   identity its name says.
/// - A data object (`data/`) is referenced while a stub of any generation
///   of any overlay guest redirects to it; it must hold the content its
///   index record says.
struct StoreObjects {
    let store: Store

    /// Which object, of which kind.
    enum Kind {
        case hardlink(Store.Object)
        /// `digest` is the index record's (nil: the object has none).
        case data(redirect: [UInt8], digest: ContentDigest?)

        /// How reports name it: the hardlink object's name, or the data object's redirect.
        var name: String {
            switch self {
            case .hardlink(let o): return o.name.description
            case .data(let r, _): return String(decoding: r, as: UTF8.self)
            }
        }
    }

    /// One object of either kind.
    struct Entry {
        var kind: Kind
        var stat: FileStat
    }

    /// Every object of both kinds, with the redirects overlay guests
    /// reference (for the data objects: what keeps them).
    /// `everyRecord`: what removes objects needs every overlay record read
    /// whole (else it throws); `verify` checks what it can and reports the rest.
    func list(everyRecord: Bool = true) throws -> (entries: [Entry], referencedData: Set<[UInt8]>) {
        var entries = try store.listObjects().map { Entry(kind: .hardlink($0), stat: $0.stat) }
        let hasData = (try? store.directory.stat(DataObjects.indexName)) != nil || !OverlayGuest.all(in: store).isEmpty
        guard hasData, let data = try? store.dataObjects() else { return (entries, []) }
        let (referenced, _, _) = try Overlay.references(in: store, everyRecord: everyRecord)
        for o in try data.list() {
            entries.append(Entry(kind: .data(redirect: o.redirect, digest: o.digest), stat: o.stat))
        }
        return (entries, referenced)
    }

    /// Whether a guest still uses the object.
    static func isReferenced(_ e: Entry, referencedData: Set<[UInt8]>) -> Bool {
        switch e.kind {
        case .hardlink: return e.stat.linkCount > 1
        case .data(let r, _): return referencedData.contains(r)
        }
    }

    /// What `collectGarbage` removed (or, in a dry run, would remove), per kind.
    struct Collected {
        var objects = 0
        var bytes: UInt64 = 0
        var dataObjects = 0
        var dataBytes: UInt64 = 0
        /// Removed hardlink objects' inodes (their index records go too).
        var dropped = Set<InodeKey>()
        /// Unused objects that could not be removed ("objects/ab/NAME: why"): they stay, with their records.
        var notRemoved: [String] = []
    }

    /// Removes every object no guest uses. Each hardlink object is checked
    /// again right before its name goes (only the store's own name left);
    /// overlay guests' interrupted commands are finished or undone first, so
    /// their generations say what they reference.
    func collectGarbage(dryRun: Bool) throws -> Collected {
        if !dryRun {
            for g in OverlayGuest.all(in: store) { try Overlay.recover(g) }
            if let data = try? store.dataObjects() { Overlay.removeAbandonedReservations(store: store, objects: data) }
        }
        let (entries, referencedData) = try list()
        var out = Collected()
        var unusedData: [[UInt8]: UInt64] = [:]
        for e in entries where !Self.isReferenced(e, referencedData: referencedData) {
            switch e.kind {
            case .hardlink(let o):
                try removeUnlinked(o, dryRun: dryRun, into: &out)
            case .data(let r, _):
                unusedData[r] = e.stat.allocatedBytes
            }
        }
        // Only what was removed is counted (an immutable object stays, with its record).
        var removal = DataObjects.Removal(removed: Set(unusedData.keys))
        if !dryRun && !unusedData.isEmpty {
            removal = try store.dataObjects().remove(Set(unusedData.keys))
            if let error = removal.indexError { throw error }
        }
        out.dataObjects = removal.removed.count
        out.dataBytes = removal.removed.reduce(0) { $0 + (unusedData[$1] ?? 0) }
        for (r, error) in removal.refused.sorted(by: { $0.key.lexicographicallyPrecedes($1.key) }) {
            out.notRemoved.append("data\(escapedPath(r)): could not be removed (\(error))")
        }
        if !dryRun {
            try ContentIndex.remove(out.dropped, in: store)
        }
        return out
    }

    /// Removes a hardlink object no guest links any more (only the store's
    /// own name left), checked again right before its name goes.
    private func removeUnlinked(_ o: Store.Object, dryRun: Bool, into out: inout Collected) throws {
        let dir = try store.prefixDirectory(o.digest.firstByte)
        guard let st = try? dir.stat(o.name), st.linkCount == 1, st.inode == o.stat.inode else { return }
        if !dryRun {
            do { try dir.unlink(o.name) } catch {
                // Immutable, say: it stays, is not counted, and is named.
                out.notRemoved.append("objects/\(hexString([o.digest.firstByte]))/\(o.name): \(error)")
                return
            }
            out.dropped.insert(InodeKey(device: st.device, inode: st.inode))
        }
        out.objects += 1
        out.bytes += st.allocatedBytes
    }

    /// The hardlink part of `collectGarbage`, which `unify` runs after linking:
    /// the objects no guest links any more (a package update replaced their
    /// files in every guest, a killed run made them and linked nothing) go,
    /// with their index records. Needs no walk of the guests: a link count tells.
    func collectUnlinkedObjects() throws -> Collected {
        var out = Collected()
        for o in try store.listObjects() where o.stat.linkCount == 1 {
            try removeUnlinked(o, dryRun: false, into: &out)
        }
        try ContentIndex.remove(out.dropped, in: store)
        return out
    }

    /// What re-hashing one object found.
    struct Check {
        var kind: Kind
        /// What the content hashes to now (nil: it could not be read, or a data object has no record).
        var digest: ContentDigest?
        var contentChanged = false
        /// A hardlink object's identity (mode, owner, mtime, xattrs) is not the one its name says.
        var metadataChanged = false
        var missing = false
        var error: (any Error)?
    }

    /// Re-hashes every object of both kinds against what its name or record
    /// says; also reports the data objects stubs reference that are missing.
    /// Calls `checked` with the bytes read of each object that was read.
    func verify(buffer: UnsafeMutableRawBufferPointer, checked: (Entry, UInt64) -> Void) throws -> [Check] {
        let (entries, referencedData) = try list(everyRecord: false)
        var problems: [Check] = []
        for e in entries {
            var c = Check(kind: e.kind)
            do {
                switch e.kind {
                case .hardlink(let o):
                    let f = try store.prefixDirectory(o.digest.firstByte).openFileForReading(o.name)
                    let (digest, identity) = try ContentHasher.digest(of: f, buffer: buffer)
                    checked(e, e.stat.size)
                    c.digest = digest
                    c.contentChanged = digest != o.digest
                    c.metadataChanged = identity.key != o.metadataKey
                case .data(let r, let recorded):
                    // An object without a record is only a problem when a stub uses it.
                    guard let recorded else {
                        if referencedData.contains(r) { problems.append(c) }
                        continue
                    }
                    let f = try store.dataObjects().open(r)
                    let (digest, read) = try ContentHasher.contentDigest(of: f, size: e.stat.size, buffer: buffer)
                    checked(e, read)
                    c.digest = digest
                    c.contentChanged = digest != recorded
                }
            } catch {
                c.error = error
                if case .data = e.kind { c.missing = true }
            }
            if c.contentChanged || c.metadataChanged || c.error != nil { problems.append(c) }
        }
        if let data = try? store.dataObjects() {
            for r in referencedData where (try? data.stat(r))?.isRegular != true {
                problems.append(Check(kind: .data(redirect: r, digest: data.digests[r]), missing: true))
            }
        }
        return problems
    }
}
