import HashifySystem
import SystemPackage

/// Where maintenance commands find the store and the guests: `--store`, or
/// the default store of the given roots, or the store that knows a guest
/// holding the given paths; roots given, or those the store remembers.
public struct StoreLocation: Sendable {
    public var store: FilePath?
    public var roots: [FilePath]
    /// Paths inside guests (split's): their guest's store is the default.
    public var paths: [FilePath]
    public init(store: FilePath?, roots: [FilePath], paths: [FilePath] = []) {
        self.store = store
        self.roots = roots
        self.paths = paths
    }

    func resolve() throws -> (FilePath, Store, [FilePath]) {
        for r in roots where (try? Directory.open(path: r)) == nil { throw InputError("\(r): no such directory") }
        let found =
            roots.isEmpty
            ? paths.first.flatMap(RootValidation.storeKnowingGuest(of:)) : RootValidation.defaultStorePath(for: roots)
        guard let path = store ?? found else {
            throw InputError(
                paths.isEmpty
                    ? "give --store or the guest roots"
                    : "\(paths[0]): no store knows a guest holding it (give --store or --root)")
        }
        try GuestStore.check(roots, store: path)
        guard let s = try Store.open(at: path, create: false) else {
            throw InputError("\(path): no hashify store here (run unify first, or give --store)")
        }
        let guests = roots.isEmpty ? s.rememberedGuests() : roots
        return (path, s, guests)
    }
}

/// Walks every file of the roots (no excludes) and marks store objects.
func walkAll(_ roots: [GuestRoot], store: Store, filter: PathFilter = PathFilter(excludes: [], includes: []))
    -> Walker.Result
{
    var walk = Walker(filter: filter, minimumSize: 1).walk(roots, conffiles: [])
    for inode in ((try? store.objectGenerations()) ?? [:]).keys {
        if let i = walk.inventory.index(ofInode: inode) { walk.inventory.inodes[Int(i)].isStoreObject = true }
    }
    return walk
}

func skippedPaths(_ skips: [Skip], roots: [GuestRoot]) -> [UnifyReport.SkippedPath] {
    skips.map {
        var p = UnifyReport.SkippedPath(
            root: roots[$0.guest].path.string, path: escapedPath($0.path), reason: $0.reason.code,
            detail: $0.reason.description, error: $0.reason.isError)
        if case .failed(let e) = $0.reason {
            p.operation = e.operation.rawValue
            p.errno = e.errno
        }
        return p
    }
}

// MARK: status

/// `hashify status`: what is shared now, the store's health, what a re-run would gain.
public struct StatusReport: Sendable, Codable {
    public struct StoreHealth: Sendable, Codable {
        public var objects = 0
        public var bytes: UInt64 = 0
        /// Objects no guest links any more (gc removes them).
        public var unreferencedObjects = 0
        public var unreferencedBytes: UInt64 = 0
        /// Objects with at least 90% of the filesystem's link limit.
        public var objectsNearLinkLimit = 0
        public var linkLimit = 0
        public var indexEntries = 0
        public var unfinishedRuns = 0
    }
    public var schema = 1
    public var command = "status"
    public var store: String
    public var guests: [UnifyReport.Guest] = []
    public var storeHealth = StoreHealth()
    /// What `unify` would still link and save now.
    public var rerunWouldLinkPaths = 0
    public var rerunWouldSaveBytes: UInt64 = 0
    /// Overlay guests, data objects and the copy-on-write reserve (absent without overlay guests).
    public var overlay: OverlayStatus?
    /// Guests `unify` leaves unlinked because their root is not trusted; those
    /// with `pathsShared` share store objects already (undo: `split --root` or `overlay convert`).
    public var notLinked: [UnifyReport.NotLinked] = []
    /// What keeps files of a guest from staying shared.
    public var sharingBreakers: [SharingBreaker] = []
    public var notes: [String] = []

    /// Something in a guest that keeps its files from staying shared.
    public struct SharingBreaker: Sendable, Codable {
        public var root: String
        /// `prelink`, or `held-open-for-writing`.
        public var kind: String
        /// The guest path it concerns.
        public var path: String
        public var detail: String
        /// The guest's name, when it has one.
        public var guest: String?
    }
}

public enum StatusCommand {
    public static func run(_ location: StoreLocation, unifyOptions: UnifyOptions) throws -> StatusReport {
        let (path, store, guests) = try location.resolve()
        var report = StatusReport(store: path.string)
        if !guests.isEmpty {
            var options = unifyOptions
            options.roots = guests
            options.store = path
            options.dryRun = true
            let plan = try Unifier(options: options).run()
            report.guests = plan.guests
            report.rerunWouldLinkPaths = plan.totals.pathsLinked
            report.rerunWouldSaveBytes = plan.totals.bytesSaved
            report.notLinked = plan.notLinked
            report.notes = plan.notes
        } else {
            report.notes.append("no guest roots known: give them to see per-guest figures")
        }
        let limit = store.objects.linkLimit
        report.storeHealth.linkLimit = limit
        for o in try store.listObjects() {
            report.storeHealth.objects += 1
            report.storeHealth.bytes += o.stat.allocatedBytes
            if o.stat.linkCount == 1 {
                report.storeHealth.unreferencedObjects += 1
                report.storeHealth.unreferencedBytes += o.stat.allocatedBytes
            }
            if limit > 0 && Int(o.stat.linkCount) * 10 >= limit * 9 { report.storeHealth.objectsNearLinkLimit += 1 }
        }
        report.storeHealth.indexEntries = ContentIndex.count(in: store)
        report.storeHealth.unfinishedRuns = store.unfinishedRuns().count
        report.overlay = Overlay.status(store: store)
        if report.overlay != nil { report.notes.removeAll { $0.hasPrefix("no guest roots known") } }
        report.sharingBreakers = SharingBreakers.find(
            roots: guests.map(\.string) + (report.overlay?.guests.map(\.root) ?? []), store: store)
        return report
    }
}

/// Finds what keeps guests' files from staying shared: prelink installed
/// (it rewrites every library and program in place in each guest, so
/// unified copies are replaced by private ones after each of its runs), and
/// files that runs in a row found open for writing (a process holds them:
/// they are never linked while it does).
enum SharingBreakers {
    static let prelinkPaths: [[String]] = [
        ["usr", "sbin", "prelink"], ["usr", "bin", "prelink"], ["etc", "prelink.conf"],
    ]

    static func find(roots: [String], store: Store) -> [StatusReport.SharingBreaker] {
        var out: [StatusReport.SharingBreaker] = []
        for root in roots {
            guard let dir = try? Directory.open(path: FilePath(root)) else { continue }
            if let p = prelinkPaths.first(where: { exists($0, in: dir) }) {
                let cron = exists(["etc", "cron.daily", "prelink"], in: dir) ? " (its daily cron job runs it)" : ""
                out.append(
                    .init(
                        root: root, kind: "prelink", path: "/" + p.joined(separator: "/"),
                        detail:
                            "prelink is installed\(cron): it rewrites libraries and programs in place in each guest, so they do not stay shared; remove it (apt purge prelink) or disable it"
                    ))
            }
        }
        let scanned = Set(roots)
        for h in store.heldOpen() where h.runs >= 2 && scanned.contains(h.root) {
            out.append(
                .init(
                    root: h.root, kind: "held-open-for-writing", path: h.path,
                    detail:
                        "open for writing in the last \(h.runs) runs: never linked while a process holds it (a database or log? exclude it)"
                ))
        }
        return out
    }

    /// Whether the guest path exists, looked up one component at a time without following symlinks.
    static func exists(_ components: [String], in root: Directory) -> Bool {
        var dir = root
        for c in components.dropLast() {
            guard let d = try? dir.openDirectory(FileName(c)) else { return false }
            dir = d
        }
        return (try? dir.stat(FileName(components.last!))) != nil
    }
}

// MARK: verify

/// `hashify verify`: every store object re-hashed and compared with its name.
public struct VerifyReport: Sendable, Codable {
    public struct Damaged: Sendable, Codable {
        public var object: String
        /// What the content hashes to now.
        public var digest: String
        public var contentChanged: Bool
        public var metadataChanged: Bool
        public var paths: [UnifyReport.SkippedPath]
        public var repaired = false
    }
    public var schema = 1
    public var command = "verify"
    public var store: String
    public var repair: Bool
    public var objectsChecked = 0
    public var bytesRead: UInt64 = 0
    public var damaged: [Damaged] = []
    /// Overlay mode's data objects re-hashed, and those damaged or missing.
    public var dataObjectsChecked = 0
    public var damagedDataObjects: [Overlay.DamagedObject] = []
    /// Overlay guests' images (of their generation in force) that do not match the SHA-256 written
    /// with them, cannot be read, or whose reference list says other than they hold: each names the
    /// guest and the image. Such a guest is refused (not mounted or folded) until it is restored.
    public var damagedImages: [String] = []
    public var pathsSplit = 0
    public var skipped: [UnifyReport.SkippedPath] = []
    /// 0 every object intact; 1 damage found (repaired or not) or errors.
    public var exitStatus: Int32 {
        damaged.isEmpty && damagedDataObjects.isEmpty && damagedImages.isEmpty && skipped.allSatisfy { !$0.error }
            ? 0 : 1
    }
}

public enum VerifyCommand {
    public static func run(_ location: StoreLocation, repair: Bool, waitForLock: Bool) throws -> VerifyReport {
        _ = prepareProcessForUnification()
        let (path, store, guests) = try location.resolve()
        if repair { try store.lock(wait: waitForLock) }
        var report = VerifyReport(store: path.string, repair: repair)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        var bad: [(Store.Object, ContentDigest, Bool, Bool)] = []
        let checks = try StoreObjects(store: store).verify(buffer: buffer) { entry, read in
            if case .hardlink = entry.kind { report.objectsChecked += 1 } else { report.dataObjectsChecked += 1 }
            report.bytesRead += read
        }
        for c in checks {
            switch c.kind {
            case .hardlink(let o):
                if let error = c.error {
                    report.skipped.append(
                        UnifyReport.SkippedPath(
                            root: path.string, path: "/objects/" + o.name.description,
                            reason: "verify-failed", detail: "\(error)", error: true))
                } else if let digest = c.digest {
                    bad.append((o, digest, c.contentChanged, c.metadataChanged))
                }
            case .data(_, let recorded):
                report.damagedDataObjects.append(
                    Overlay.DamagedObject(
                        object: c.kind.name, recordedDigest: recorded?.hex ?? "", digest: c.digest?.hex ?? "",
                        missing: c.missing))
            }
        }
        report.damagedDataObjects.sort { $0.object < $1.object }
        report.damagedImages = Overlay.damagedImages(in: store)
        // A damaged data object is never given to another stub: its record leaves the data index
        // (the stubs that name it still read it; the report names them for an operator to repair).
        let changed = checks.compactMap { c -> [UInt8]? in
            if case .data(let r, let recorded) = c.kind, recorded != nil, c.contentChanged { return r }
            return nil
        }
        if !changed.isEmpty {
            if !repair { try store.lock(wait: waitForLock) }
            try store.dataObjects().forget(Set(changed))
            for i in report.damagedDataObjects.indices
            where changed.contains(where: { String(decoding: $0, as: UTF8.self) == report.damagedDataObjects[i].object }
            ) {
                report.damagedDataObjects[i].neverReused = true
            }
        }
        if repair { try restoreDataObjects(&report, checks: checks, store: store, plainGuests: guests) }
        if bad.isEmpty { return report }
        // Every guest path that links a damaged object.
        let roots = guests.isEmpty ? [] : try RootValidation.openRoots(guests)
        let walk = walkAll(roots, store: store)
        let inventory = walk.inventory
        var dropped = Set<InodeKey>()
        for (o, digest, content, meta) in bad {
            var d = VerifyReport.Damaged(
                object: o.name.description, digest: digest.hex, contentChanged: content,
                metadataChanged: meta, paths: [])
            let names =
                inventory.index(of: InodeKey(device: o.stat.device, inode: o.stat.inode)).map {
                    Array(inventory.names(of: $0))
                } ?? []
            d.paths = names.map {
                UnifyReport.SkippedPath(
                    root: roots[Int(inventory.guest(ofName: $0))].path.string,
                    path: escapedPath(inventory.path(ofName: $0)),
                    reason: "links-damaged-object", detail: "links the damaged object", error: false)
            }
            if repair {
                // Each path gets its own copy of what it shows now; then the object leaves the store.
                let journal = try RunJournal(store: store, runID: makeRunID())
                let splitter = Splitter(inventory: inventory, roots: roots, journal: journal)
                splitter.run(names)
                journal.finish()
                report.pathsSplit += splitter.split
                report.skipped += skippedPaths(splitter.skips, roots: roots)
                let dir = try store.prefixDirectory(o.digest.firstByte)
                if splitter.skips.isEmpty, let st = try? dir.stat(o.name), st.linkCount == 1 {
                    try dir.unlink(o.name)
                    dropped.insert(InodeKey(device: st.device, inode: st.inode))
                    d.repaired = true
                }
            }
            report.damaged.append(d)
        }
        if repair { try ContentIndex.remove(dropped, in: store) }
        return report
    }
}

extension VerifyCommand {
    /// `verify --repair` for data objects, which in overlay mode hold the
    /// only copy of a shared file's data: each missing or damaged one whose
    /// digest is known gets its content back from another copy (a hardlink
    /// object of that content, sound by this run's check; else a whole file
    /// of that size and digest in a plain guest of the store or in an overlay
    /// guest's copy-ups and whole files); without one, the guests' files that
    /// read it are listed as lost.
    static func restoreDataObjects(
        _ report: inout VerifyReport, checks: [StoreObjects.Check], store: Store, plainGuests: [FilePath]
    ) throws {
        let data = try store.dataObjects()
        var wanted: [[UInt8]: ContentDigest] = [:]
        var badHardlink = Set<[UInt8]>()
        for c in checks {
            switch c.kind {
            case .data(let r, let recorded):
                if let d = recorded ?? data.digests[r], c.missing || c.contentChanged { wanted[r] = d }
            case .hardlink(let o): badHardlink.insert(o.name.bytes)
            }
        }
        func restored(_ r: [UInt8], from source: String) {
            let name = String(decoding: r, as: UTF8.self)
            guard let i = report.damagedDataObjects.firstIndex(where: { $0.object == name }) else { return }
            report.damagedDataObjects[i].restored = true
            report.damagedDataObjects[i].restoredFrom = source
            wanted[r] = nil
        }
        guard !wanted.isEmpty else { return }
        var sources: [ContentDigest: Store.Object] = [:]
        for o in try store.listObjects() where !badHardlink.contains(o.name.bytes) { sources[o.digest] = o }
        for (r, digest) in wanted {
            if let o = sources[digest],
                let f = try? store.prefixDirectory(o.digest.firstByte).openFileForReading(o.name),
                try data.restore(r, digest: digest, from: f, size: o.stat.size)
            {
                restored(r, from: "objects/" + o.name.description)
            }
        }
        guard !wanted.isEmpty else { return }
        // The stubs that read what is still wanted tell its size: whole files of that size are hashed.
        let readers = Overlay.files(naming: Set(wanted.keys), in: store)
        var bySize: [UInt64: [(redirect: [UInt8], digest: ContentDigest)]] = [:]
        for (r, d) in wanted { if let size = readers[r]?.size { bySize[size, default: []].append((r, d)) } }
        var trees = Overlay.wholeFileTrees(in: store)
        for root in plainGuests { if let dir = try? Directory.open(path: root) { trees.append((root.string, dir)) } }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        for (label, tree) in trees where !bySize.isEmpty {
            var traversal = TreeTraversal<Void>()
            try? traversal.run(tree, context: ()) { entry, _ in
                if entry.stat.isDirectory { return .enter(()) }
                guard entry.stat.isRegular, let candidates = bySize[entry.stat.size],
                    let f = try? entry.directory.openFileForReading(entry.name),
                    f.extendedAttribute("trusted.overlay.metacopy") == nil,
                    let (d, _) = try? ContentHasher.contentDigest(of: f, size: entry.stat.size, buffer: buffer),
                    let match = candidates.first(where: { $0.digest == d }),
                    (try? data.restore(match.redirect, digest: d, from: f, size: entry.stat.size)) == true
                else { return .next }
                restored(match.redirect, from: "\(label): /\(escapedPath(entry.path))")
                bySize[entry.stat.size]?.removeAll { $0.redirect == match.redirect }
                if bySize[entry.stat.size]?.isEmpty == true { bySize[entry.stat.size] = nil }
                return .next
            }
        }
        for r in wanted.keys {
            let name = String(decoding: r, as: UTF8.self)
            guard let i = report.damagedDataObjects.firstIndex(where: { $0.object == name }) else { continue }
            report.damagedDataObjects[i].filesLost = readers[r]?.files ?? []
        }
    }
}

// MARK: gc

/// `hashify gc`: unreferenced objects and leftovers removed.
public struct GCReport: Sendable, Codable {
    public var schema = 1
    public var command = "gc"
    public var store: String
    public var dryRun: Bool
    public var objectsRemoved = 0
    public var bytesFreed: UInt64 = 0
    public var temporariesRemoved = 0
    /// Overlay mode's data objects no generation of any guest references.
    public var dataObjectsRemoved = 0
    public var dataBytesFreed: UInt64 = 0
    public var skipped: [UnifyReport.SkippedPath] = []
    /// Unused objects that could not be removed (immutable, say), with why.
    public var notRemoved: [String] = []
    public var notes: [String] = []
    public var exitStatus: Int32 { skipped.contains { $0.error } || !notRemoved.isEmpty ? 1 : 0 }
}

public enum GCCommand {
    public static func run(_ location: StoreLocation, dryRun: Bool, waitForLock: Bool) throws -> GCReport {
        _ = prepareProcessForUnification()
        let (path, store, guests) = try location.resolve()
        if !dryRun { try store.lock(wait: waitForLock) }
        var report = GCReport(store: path.string, dryRun: dryRun)
        let collected = try StoreObjects(store: store).collectGarbage(dryRun: dryRun)
        report.objectsRemoved = collected.objects
        report.bytesFreed = collected.bytes
        report.dataObjectsRemoved = collected.dataObjects
        report.dataBytesFreed = collected.dataBytes
        report.notRemoved = collected.notRemoved
        if let first = collected.notRemoved.first {
            report.notes.append(
                "\(collected.notRemoved.count) unused object\(collected.notRemoved.count == 1 ? "" : "s") could not be removed (\(first)\(collected.notRemoved.count > 1 ? ", …" : "")): they stay"
            )
        }
        if !dryRun {
            if !store.unfinishedRuns().isEmpty {
                if guests.isEmpty {
                    report.notes.append("an interrupted run left temporary names; give the guest roots to remove them")
                } else {
                    let roots = try RootValidation.openRoots(guests)
                    var walk = walkAll(roots, store: store)
                    var skips: [Skip] = []
                    report.temporariesRemoved = Recovery.clean(walk: &walk, roots: roots, store: store, skips: &skips)
                    report.skipped = skippedPaths(skips, roots: roots)
                }
            }
        }
        return report
    }
}

// MARK: split

/// `hashify split`: private copies again.
public struct SplitReport: Sendable, Codable {
    public var schema = 1
    public var command = "split"
    public var store: String
    public var dryRun: Bool
    public var pathsSplit = 0
    public var notUnified = 0
    public var skipped: [UnifyReport.SkippedPath] = []
    public var exitStatus: Int32 { skipped.contains { $0.error } ? 1 : 0 }
}

public enum SplitCommand {
    /// Splits `paths` (host paths inside known roots), or, when `paths` is
    /// empty, every unified file of `location.roots` matching `includes`
    /// (all of them without includes).
    public static func run(
        _ location: StoreLocation, paths: [FilePath], includes: [[UInt8]],
        dryRun: Bool, waitForLock: Bool
    ) throws -> SplitReport {
        _ = prepareProcessForUnification()
        let (storePath, store, guests) = try location.resolve()
        var report = SplitReport(store: storePath.string, dryRun: dryRun)
        var byRoot: [FilePath: [[UInt8]]] = [:]
        if paths.isEmpty {
            for r in guests { byRoot[r] = includes }
        } else {
            // Each path lies below a root; its rest is resolved from the root without following symlinks.
            for given in paths {
                // The guest root is found among the path's leading components, each
                // resolved as the host sees it (relative, through host symlinks); what
                // lies below the root is never resolved (a guest's symlinks are not followed).
                var absolute = given
                if given.isRelative, let cwd = RootValidation.canonical(".") { absolute = cwd.pushing(given) }
                absolute.lexicallyNormalize()
                let components = Array(absolute.components)
                var found: (root: FilePath, rest: ArraySlice<FilePath.Component>)?
                for k in stride(from: 1, to: components.count, by: 1) {
                    let prefix = FilePath(root: "/", components[..<k])
                    guard let c = RootValidation.canonical(prefix) else { break }
                    if let r = guests.first(where: { $0 == c || RootValidation.canonical($0) == c }) {
                        found = (r, components[k...])
                        break
                    }
                }
                guard let (root, rel) = found else {
                    throw InputError("\(given): not below a guest root this store knows (give --root ROOT)")
                }
                var pattern: [UInt8] = []
                for c in rel {
                    pattern.append(0x2f)
                    for b in Array(c.string.utf8) {
                        if b == 0x2a || b == 0x3f || b == 0x5b || b == 0x5c { pattern.append(0x5c) }
                        pattern.append(b)
                    }
                }
                byRoot[root, default: []].append(pattern)
            }
        }
        if !dryRun { try store.lock(wait: waitForLock) }
        let order = guests.filter { byRoot[$0] != nil }
        let roots = try RootValidation.openRoots(order)
        var names: [Int32] = []
        var inventories: [(Walker.Result, [Int32])] = []
        for (i, root) in roots.enumerated() {
            let patterns = byRoot[order[i]] ?? []
            let filter = PathFilter(excludes: patterns.isEmpty ? [] : [Array("/*".utf8)], includes: patterns)
            let selected = walkAll([root], store: store, filter: filter)
            if !paths.isEmpty && selected.inventory.names.count < patterns.count {
                throw InputError("\(order[i]): some of the given paths are not regular files in this guest")
            }
            // Every name of a selected inode in the guest is split with it (one
            // copy for all: guest-local hard links stay hard links), so a
            // selection by pattern walks the whole guest to find them.
            let walk = patterns.isEmpty ? selected : walkAll([root], store: store)
            let chosen = Set(selected.inventory.inodes.map(\.inode))
            names = []
            for (i, e) in walk.inventory.inodes.enumerated() where chosen.contains(e.inode) {
                if e.isStoreObject {
                    names += walk.inventory.names(of: Int32(i))
                } else {
                    report.notUnified += Int(e.nameCount)
                }
            }
            inventories.append((walk, names))
        }
        for (i, (walk, names)) in inventories.enumerated() {
            if dryRun {
                report.pathsSplit += names.count
                continue
            }
            let journal = try RunJournal(store: store, runID: makeRunID())
            let splitter = Splitter(inventory: walk.inventory, roots: [roots[i]], journal: journal)
            splitter.run(names)
            journal.finish()
            report.pathsSplit += splitter.split
            report.skipped += skippedPaths(splitter.skips, roots: [roots[i]])
            // A guest split whole shares nothing with this store any more: it may go to another.
            if paths.isEmpty && includes.isEmpty && splitter.skips.isEmpty { store.forgetGuests([order[i]]) }
        }
        return report
    }
}
