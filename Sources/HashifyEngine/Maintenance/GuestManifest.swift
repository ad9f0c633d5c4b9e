import HashifySystem
import SystemPackage

/// `hashify manifest GUEST`: every entry of one guest as the guest sees it
/// (path, type, content digest, mode, owner, mtime, xattrs, symlink target),
/// each regular file marked shared or private with how many guests use its
/// copy. It answers "what is unified?" from the host, for audits, without
/// changing anything a guest sees: files are only read, through descriptors
/// opened without following symlinks.
public struct ManifestReport: Sendable, Codable {
    /// One entry of the guest.
    public struct Entry: Sendable, Codable {
        /// Guest-absolute, escaped as in every report (`\xNN` for bytes that are not printable ASCII).
        public var path: String
        /// file, directory, symlink, fifo, socket, char-device, block-device.
        public var type: String
        /// Permission bits with setuid/setgid/sticky, in octal.
        public var mode: String
        public var uid: UInt32
        public var gid: UInt32
        /// Seconds.nanoseconds since the epoch.
        public var mtime: String
        public var size: UInt64?
        /// SHA-256 of the content (regular files).
        public var digest: String?
        public var target: String?
        /// Name → value in hex.
        public var xattrs: [String: String] = [:]
        /// Regular files: "shared" (one copy for several guests, or a store object) or "private".
        public var sharing: String?
        /// Regular files: how many guests use this copy (1 when private).
        public var guests: Int?
    }
    public struct Totals: Sendable, Codable {
        public var entries = 0
        public var files = 0
        public var sharedFiles = 0
        public var sharedBytes: UInt64 = 0
        public var privateFiles = 0
        public var privateBytes: UInt64 = 0
        /// Entries that could not be read (they are listed without a digest).
        public var unreadable = 0
    }
    public var schema = 1
    public var command = "manifest"
    public var root: String
    public var guest: String?
    public var store: String
    /// hardlink (a plain guest) or overlay.
    public var mode: String
    public var entries: [Entry] = []
    public var totals = Totals()
    /// The entries that could not be read, each with why ("/PATH: reason").
    public var unreadablePaths: [String] = []
    public var notes: [String] = []
    /// 0, or 1 when an entry could not be read (the listing is not whole).
    public var exitStatus: Int32 { totals.unreadable > 0 ? 1 : 0 }
}

extension ManifestReport: GuestNaming {
    public mutating func name(_ names: GuestNames) { guest = names.name(of: root) }
}

public enum ManifestCommand {
    public static func run(root: FilePath, store storePath: FilePath?) throws -> ManifestReport {
        guard let canonical = RootValidation.canonical(root), let dir = try? Directory.open(path: canonical) else {
            throw InputError("\(root): no such directory")
        }
        let path = storePath ?? RootValidation.defaultStorePath(for: [root])
        try GuestStore.check([root], store: path)
        guard let store = try Store.open(at: path, create: false) else {
            throw InputError("\(path): no hashify store here (run unify first, or give --store)")
        }
        if Overlay.overlayGuests(among: [root], storePath: path).contains(root) {
            return try overlayManifest(root: root, store: store)
        }
        var report = ManifestReport(root: canonical.string, store: path.string, mode: "hardlink")
        // How many guests link each store object: this one (it is listed below) and every other guest the store knows.
        let objects = Set(try store.objectGenerations().keys)
        let remembered = store.rememberedGuests().filter { RootValidation.canonical($0) != canonical }
        let overlayGuests = Overlay.overlayGuests(among: remembered, storePath: path)
        let others = remembered.filter { !overlayGuests.contains($0) }
        var otherGuestsOfObject: [UInt64: Int] = [:]
        do {
            otherGuestsOfObject = try guestsLinkingObjects(others, store: store)
        } catch {
            report.notes.append("the store's other guests could not be read (\(error)): GUESTS counts this guest only")
        }
        let device = try dir.stat().device
        try list(dir, into: &report) { _, st, _ in
            guard st.device == device, objects.contains(st.inode) else { return ("private", 1) }
            return ("shared", 1 + (otherGuestsOfObject[st.inode] ?? 0))
        }
        return report
    }

    /// Store object inode → how many of `roots` link it.
    static func guestsLinkingObjects(_ roots: [FilePath], store: Store) throws -> [UInt64: Int] {
        if roots.isEmpty { return [:] }
        let walk = walkAll(try RootValidation.openRoots(roots), store: store)
        var count: [UInt64: Int] = [:]
        for (i, e) in walk.inventory.inodes.enumerated() where e.isStoreObject {
            count[e.inode] = Set(walk.inventory.names(of: Int32(i)).map { walk.inventory.guest(ofName: $0) }).count
        }
        return count
    }

    /// An overlay guest: the merged view (its mount, or a private read-only
    /// one); a file is shared while its data is still its stub's data object.
    static func overlayManifest(root: FilePath, store: Store) throws -> ManifestReport {
        var report = ManifestReport(
            root: (RootValidation.canonical(root) ?? root).string, store: store.path.string, mode: "overlay")
        var options = OverlayOptions(roots: [root])
        options.store = store.path
        let s = try Overlay.session(options, createRecords: false)  // holds the store's lock: no fold runs meanwhile
        // A killed fold is finished first (under the lock), as every overlay command does.
        guard let record = s.guests.first?.record, let state = try Overlay.recover(record), state.phase == .active
        else {
            throw InputError("\(root): not an active overlay guest")
        }
        let gen = try record.generation(state.generation)
        // Other guests' records only count guests: one that cannot be read is left out of the counts.
        let (_, perGuest, _) = try Overlay.references(in: store, everyRecord: false)
        var guestsOfObject: [[UInt8]: Int] = [:]
        for (_, _, scan) in perGuest { for r in scan.referenced { guestsOfObject[r, default: 0] += 1 } }
        let context = try Overlay.FoldContext.root(of: gen, reuse: false)
        let build = { (merged: Directory) throws in
            try list(merged, into: &report, context: context) { name, st, context in
                guard let r = try? (context as? Overlay.FoldContext)?.unchangedRedirect(name, size: st.size) else {
                    return ("private", 1)
                }
                return ("shared", guestsOfObject[r] ?? 1)
            }
        }
        let live = try Directory.open(path: record.rootPath)
        if OverlayMount.isMounted(gen, at: live) {
            try build(live)
        } else {
            try Overlay.withPrivateMount(record, gen, session: s, build)
            report.notes.append("not mounted: read through a private read-only mount of generation \(state.generation)")
        }
        // A file that cannot be read because its data object is gone says so, with the object.
        if !report.unreadablePaths.isEmpty {
            var objectOf: [String: [UInt8]] = [:]
            for f in Overlay.filesWithoutData(record, objects: s.objects) {
                objectOf["/" + escapedPath(f.path)] = f.redirect
            }
            report.unreadablePaths = report.unreadablePaths.map { line in
                guard let colon = line.range(of: ": ", options: .backwards),
                    let r = objectOf[String(line[..<colon.lowerBound])]
                else { return line }
                return
                    "\(line[..<colon.lowerBound]): its data object data\(escapedPath(r)) is missing from the store (hashify verify --repair puts back what another copy still holds)"
            }
        }
        return report
    }

    /// Lists a tree depth-first in name order; `sharing` tells a regular file's sharing and guest count.
    static func list(
        _ root: Directory, into report: inout ManifestReport, context: AnyObject? = nil,
        sharing: (FileName, FileStat, AnyObject?) -> (String, Int)
    ) throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        report.entries.append(
            entry(path: [0x2f], stat: try root.stat(), xattrs: (try? root.extendedAttributes()) ?? []))
        var traversal = TreeTraversal<AnyObject?>()
        traversal.mountPoints = .visit  // listed as directories, not entered
        traversal.skipVanished = true
        try traversal.run(root, context: context) { item, ctx in
            let (dir, name, st) = (item.directory, item.name, item.stat)
            var e = entry(
                path: [0x2f] + item.path, stat: st, xattrs: (try? extendedAttributes(in: dir, of: name)) ?? [])
            var step = TreeTraversal<AnyObject?>.Step.next
            if st.isDirectory {
                if !item.isMountPoint { step = .enter(try? (ctx as? Overlay.FoldContext)?.child(name)) }
            } else if st.isSymlink {
                e.target = (try? dir.readLink(name)).map(escapedPath)
            } else if st.isRegular {
                e.size = st.size
                report.totals.files += 1
                do {
                    let f = try dir.openFileForReading(name)
                    e.digest = try ContentHasher.contentDigest(of: f, size: st.size, buffer: buffer).0.hex
                } catch {
                    report.totals.unreadable += 1
                    report.unreadablePaths.append("\(e.path): \(error)")
                }
                let (how, guests) = sharing(name, st, ctx)
                e.sharing = how
                e.guests = guests
                if how == "shared" {
                    report.totals.sharedFiles += 1
                    report.totals.sharedBytes += st.size
                } else {
                    report.totals.privateFiles += 1
                    report.totals.privateBytes += st.size
                }
            }
            report.entries.append(e)
            return step
        }
        report.totals.entries = report.entries.count
    }

    static func entry(path: [UInt8], stat st: FileStat, xattrs: [ExtendedAttribute]) -> ManifestReport.Entry {
        let types: [UInt32: String] = [
            0o100000: "file", 0o040000: "directory", 0o120000: "symlink", 0o010000: "fifo",
            0o140000: "socket", 0o020000: "char-device", 0o060000: "block-device",
        ]
        var xa: [String: String] = [:]
        for a in xattrs { xa[escapedPath(a.name)] = a.value.map { String($0, radix: 16).leftPaddedZero(2) }.joined() }
        return ManifestReport.Entry(
            path: escapedPath(path), type: types[st.mode & 0o170000] ?? "unknown",
            mode: String(st.mode & 0o7777, radix: 8).leftPaddedZero(4), uid: st.uid, gid: st.gid,
            mtime: "\(st.modificationTime.seconds).\(String(st.modificationTime.nanoseconds).leftPaddedZero(9))",
            xattrs: xa)
    }
}

extension ManifestReport {
    /// One line per entry: SHARING GUESTS TYPE MODE UID:GID MTIME DIGEST PATH [-> TARGET] [XATTR-NAMES].
    public func humanReadable(verbose: Bool) -> String {
        var out = ""
        for e in entries {
            let sharing = e.sharing ?? "-"
            out +=
                sharing.rightPadded(8) + (e.guests.map(String.init) ?? "-").leftPadded(4) + "  "
                + e.type.rightPadded(12)
            out +=
                e.mode + "  " + "\(e.uid):\(e.gid)".rightPadded(11) + e.mtime + "  " + (e.digest ?? "-").rightPadded(64)
                + "  " + e.path
            if let t = e.target { out += " -> " + t }
            if !e.xattrs.isEmpty { out += "  [" + e.xattrs.keys.sorted().joined(separator: " ") + "]" }
            out += "\n"
        }
        let t = totals
        out += "\n\(guest ?? root) (\(mode) mode): \(t.entries) entries, \(t.files) files; "
        out +=
            "shared \(t.sharedFiles) (\(formatBytes(t.sharedBytes))), private \(t.privateFiles) (\(formatBytes(t.privateBytes)))"
        out += t.unreadable > 0 ? "; \(t.unreadable) could not be read\n" : "\n"
        for u in unreadablePaths { out += "unreadable \(u)\n" }
        for n in notes { out += "note      \(n)\n" }
        return out
    }
}

extension String {
    func leftPaddedZero(_ w: Int) -> String { count >= w ? self : String(repeating: "0", count: w - count) + self }
}
