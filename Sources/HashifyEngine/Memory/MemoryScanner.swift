import Crypto
import ErofsImage
import HashifySystem
import SystemPackage

/// Options of `hashify mem`.
public struct MemoryOptions: Sendable {
    public var roots: [FilePath]
    public var store: FilePath?
    /// Whose roots hardlink mode trusts: the others' copies are merged by overlay mode only.
    public var rootTrust = RootTrustPolicy()
    public init(roots: [FilePath]) { self.roots = roots }
}

/// Builds `hashify mem`'s report from /proc: each process is given to the
/// guest whose root is its root (by device and inode), its file-backed
/// mappings are resolved to the inode that holds their page cache (an overlay
/// guest's mapping to its copy-up, else to the data object of the stub at the
/// mapping's path: one lookup per mapped file, never a scan of the layers),
/// and inodes are grouped by content (the store's index knows the digests of
/// what it hashed; other inodes are hashed only when another mapped inode has
/// the same size). Its cost follows what is mapped, not what the guests hold.
public enum MemoryScanner {
    /// A guest root as `mem` matches processes against it.
    struct GuestRoot {
        var label: String
        var canonical: FilePath
        var stat: FileStat
        /// For a mounted overlay guest: its metadata and upper layers (of the
        /// generation in force), and the overlay's device.
        /// An overlay guest's metadata layers, top first.
        var layers: [Directory] = []
        /// The generation's image, for a guest of this version (then `layers` is empty): read
        /// path by path as mappings ask (a whole image parsed per guest would cost more than the scan).
        var image: ErofsReader?
        var upper: Directory?
        var overlayDevice: UInt64?
        /// A plain guest whose root is not trusted (why): unify leaves it unlinked.
        var untrusted: String?
        /// The layers' directories looked up so far, by path: the mapped files of a
        /// guest lie in a few directories, each opened once.
        var directories = LayerDirectories()
        /// NAME when the root is LXC's `…/NAME/rootfs` (its processes' cgroup is `lxc.payload.NAME`).
        var lxcName: String? {
            guard canonical.lastComponent?.string == "rootfs" else { return nil }
            return canonical.removingLastComponent().lastComponent?.string
        }
    }

    /// The inode that holds the page cache of some mappings.
    struct Physical: Hashable {
        var device: UInt64
        var inode: UInt64
    }

    /// How to open a physical inode to hash it.
    enum Source {
        case mapFile(pid: Int, range: [UInt8])
        case dataObject([UInt8])
        case upper(Directory, FileName)
    }

    struct PhysicalInfo {
        var resident: UInt64 = 0
        var guests = Set<Int>()
        var digest: ContentDigest?
        var size: UInt64?
        var source: Source
        var deleted: Bool
        var path: [UInt8]
        /// Mapped through an overlay guest (its copy-up, data object or own file).
        var overlay = false
    }

    public static func run(_ options: MemoryOptions) throws -> MemoryReport {
        let started = MonotonicInstant.now()
        var scan = try MemoryScan(options)
        scan.readProcesses()
        scan.resolveMappings()
        scan.digestContents()
        scan.findDuplicates()
        scan.tallyGuests()
        scan.report.seconds = started.secondsElapsed
        return scan.report
    }

    /// One `mem` run, phase by phase: read every process's mappings, resolve
    /// them to the inodes holding their page cache, know those inodes'
    /// contents, find contents resident more than once, and tally per guest.
    struct MemoryScan {
        var report = MemoryReport()
        let guests: [GuestRoot]
        let store: Store?
        let objects: DataObjects?
        let proc: Directory
        /// Every process read, with the index of its guest (-1: the host).
        var processes: [(ProcessMaps, Int)] = []
        var physical: [Physical: PhysicalInfo] = [:]
        /// By process: the physical inode of each of its mappings.
        var resolved: [[Physical]] = []
        var storeDigests = Set<ContentDigest>()
        var duplicate = Set<Physical>()

        init(_ options: MemoryOptions) throws {
            // The guests: given, or the store's.
            let (rootPaths, store, notes) = try guestPaths(options)
            report.notes += notes
            self.store = store
            objects = store.flatMap { try? $0.dataObjects() }
            guests = try loadGuests(rootPaths, store: store, rootTrust: options.rootTrust)
            for g in guests {
                if let why = g.untrusted {
                    report.notes.append(
                        "\(g.label): unify leaves it unlinked (its root is not the host's root: \(why)); overlay mode shares its files copy-on-write"
                    )
                }
            }
            guard let proc = try? Directory.open(path: "/proc") else { throw InputError("/proc is not mounted") }
            self.proc = proc
        }

        /// Every process but this one, with its guest.
        mutating func readProcesses() {
            let me = Int(currentProcessID())
            for name in (try? proc.entryNames()) ?? [] {
                guard let pid = Int(String(decoding: name.bytes, as: UTF8.self)), pid != me else { continue }
                let guest = guest(of: pid, among: guests, proc: proc)
                do {
                    guard let maps = try ProcessMaps.read(pid: pid, in: proc) else { continue }
                    if maps.mapped.isEmpty && maps.anonymousPss == 0 { continue }  // kernel threads
                    processes.append((maps, guest))
                } catch Errno.permissionDenied {
                    report.unreadableProcesses += 1
                } catch Errno.notPermitted {
                    report.unreadableProcesses += 1
                } catch {
                    continue  // it exited while being read
                }
            }
        }

        /// Each mapping to the inode that holds its pages (an overlay guest's
        /// copy-up, or its stub's data object), each distinct mapped inode resolved once.
        mutating func resolveMappings() {
            var overlayResolved: [Physical: (Physical, Source, ContentDigest?)] = [:]
            let overlayGuests = Dictionary(
                guests.indices.compactMap { i in guests[i].overlayDevice.map { ($0, i) } },
                uniquingKeysWith: { a, _ in a })
            for (maps, guest) in processes {
                var keys: [Physical] = []
                for m in maps.mapped {
                    var key = Physical(device: m.device, inode: m.inode)
                    var source = Source.mapFile(pid: maps.pid, range: m.range)
                    var digest: ContentDigest?
                    if let o = overlayGuests[m.device], !m.deleted {
                        if overlayResolved[key] == nil {
                            overlayResolved[key] =
                                resolveOverlay(m.path, inode: m.inode, in: guests[o], objects: objects) ?? (
                                    key, source, nil
                                )
                        }
                        (key, source, digest) = overlayResolved[key]!
                    }
                    var info = physical[key] ?? PhysicalInfo(source: source, deleted: m.deleted, path: m.path)
                    if overlayGuests[m.device] != nil { info.overlay = true }
                    info.resident += m.pss
                    info.guests.insert(guest)
                    if info.digest == nil { info.digest = digest }
                    physical[key] = info
                    keys.append(key)
                }
                resolved.append(keys)
            }
        }

        /// Contents: the store index's digests of the mapped inodes it
        /// vouches for (unchanged since hashed), else hashing where another
        /// inode has the same size; deleted inodes are hashed to learn whether
        /// the store holds their content (a restart would let them go).
        mutating func digestContents() {
            var stats: [Physical: FileStat] = [:]
            for (k, info) in physical {
                guard let st = (try? open(info.source, objects: objects)?.stat()) ?? nil else { continue }
                stats[k] = st
                if physical[k]!.size == nil { physical[k]!.size = st.size }
            }
            if let store {
                _ = ContentIndex.read(from: store) { r in
                    let k = Physical(device: r.key.device, inode: r.key.inode)
                    guard physical[k]?.digest == nil, let st = stats[k], r.isTrusted, r.size == st.size,
                        r.changeTime == st.changeTime, r.modificationTime == st.modificationTime
                    else { return }
                    physical[k]!.digest = r.digest
                }
                report.storeCachedBytes = storeCachedBytes(store)
            }
            // An inode whose content is unknown is hashed only when another mapped
            // inode could hold the same: one of its size whose first 4 KiB are the
            // same too (journald's files, of one size in every guest, differ there).
            var bySize: [UInt64: [Physical]] = [:]
            for (k, info) in physical { if let s = info.size, s > 0 { bySize[s, default: []].append(k) } }
            var candidates = Set<Physical>()
            for (size, ks) in bySize where ks.contains(where: { physical[$0]!.digest == nil }) {
                if ks.count == 1 {
                    if physical[ks[0]]!.deleted { candidates.insert(ks[0]) }
                    continue
                }
                var byHead: [[UInt8]: [Physical]] = [:]
                for k in ks {
                    let head = (try? open(physical[k]!.source, objects: objects)).flatMap { f in
                        f.flatMap { Self.head(of: $0, size: size) }
                    }
                    byHead[head ?? [], default: []].append(k)
                }
                for (head, group) in byHead {
                    for k in group
                    where physical[k]!.digest == nil && (group.count > 1 || head.isEmpty || physical[k]!.deleted) {
                        candidates.insert(k)
                    }
                }
            }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
            defer { buffer.deallocate() }
            for k in candidates {
                guard let size = physical[k]!.size, let f = try? open(physical[k]!.source, objects: objects) else {
                    continue
                }
                physical[k]!.digest = try? ContentHasher.contentDigest(of: f, size: size, buffer: buffer).0
            }
            // What the store holds, asked only of the contents of deleted inodes.
            for info in physical.values where info.deleted {
                guard let d = info.digest, !storeDigests.contains(d) else { continue }
                if objects?.redirects[d] != nil || (store.map { MemoryScanner.holdsObject(d, in: $0) } ?? false) {
                    storeDigests.insert(d)
                }
            }
        }

        /// SHA-256 of a file's first 4 KiB (nil when it cannot be read).
        static func head(of f: OpenFile, size: UInt64) -> [UInt8]? {
            var bytes = [UInt8](repeating: 0, count: Int(min(size, 4096)))
            var got = 0
            while got < bytes.count {
                let n =
                    (try? bytes.withUnsafeMutableBytes { b in
                        try f.read(into: UnsafeMutableRawBufferPointer(rebasing: b[got...]), at: UInt64(got))
                    }) ?? 0
                if n <= 0 { return nil }
                got += n
            }
            return Array(SHA256.hash(data: bytes))
        }

        /// Page cache the store's objects hold (`cachestat(2)` of each).
        func storeCachedBytes(_ store: Store) -> UInt64 {
            var total: UInt64 = 0
            for o in (try? store.listObjects()) ?? [] {
                total += cachedBytes(
                    try? store.prefixDirectory(o.digest.firstByte).openFileForReading(o.name), size: o.stat.size)
            }
            if let objects {
                for o in (try? objects.list()) ?? [] {
                    total += cachedBytes(try? objects.open(o.redirect), size: o.stat.size)
                }
            }
            return total
        }

        /// Duplicates: the same content resident under several inodes that
        /// guests map (the host's own files are not unified); the copy with most
        /// pages is the one kept. Of each, what would merge its extra copies:
        /// `unify` merges plain guests' copies of one identity (mode, owner,
        /// mtime, xattrs) and, by its fold, overlay guests' copy-ups; overlay
        /// mode merges copies whose identities differ (its objects hold content
        /// only); nothing merges files of 64 bytes or less, which stay whole in
        /// each overlay guest.
        mutating func findDuplicates() {
            var byContent: [ContentDigest: [Physical]] = [:]
            for (k, info) in physical where info.resident > 0 && info.guests.contains(where: { $0 >= 0 }) {
                if let d = info.digest { byContent[d, default: []].append(k) }
            }
            for (_, ks) in byContent where ks.count > 1 {
                // The copy kept (and named) is a live one: a deleted copy goes at its processes' restart.
                func rank(_ k: Physical) -> (Int, UInt64) { (physical[k]!.deleted ? 0 : 1, physical[k]!.resident) }
                let kept = ks.max { rank($0) < rank($1) }!
                let extra = ks.filter { $0 != kept }
                duplicate.formUnion(extra)
                let cached = extra.reduce(UInt64(0)) { sum, k in
                    sum + cachedBytes(try? open(physical[k]!.source, objects: objects), size: physical[k]!.size ?? 0)
                }
                var d = MemoryReport.DuplicatedFile(
                    path: escapedPath(physical[kept]!.path), copies: ks.count,
                    duplicatedBytes: extra.reduce(0) { $0 + physical[$1]!.resident }, cachedBytes: cached)
                (d.unifyWouldSaveBytes, d.overlayModeWouldSaveBytes, d.restartWouldFreeBytes) = merges(
                    of: ks, kept: kept)
                d.mergedBy =
                    d.unifyWouldSaveBytes > 0
                    ? (d.overlayModeWouldSaveBytes > 0 ? "unify, then overlay mode" : "unify")
                    : (d.overlayModeWouldSaveBytes > 0
                        ? "overlay mode" : (d.restartWouldFreeBytes > 0 ? "a restart" : "nothing"))
                report.unifyWouldSaveBytes += d.unifyWouldSaveBytes
                report.overlayModeWouldSaveBytes += d.overlayModeWouldSaveBytes
                report.duplicatedFiles.append(d)
            }
            report.duplicatedFiles.sort { $0.duplicatedBytes > $1.duplicatedBytes }
            report.duplicatedFiles = Array(report.duplicatedFiles.prefix(20))
        }

        /// Resident bytes of the extra copies of one content that unify would
        /// merge, and those only overlay mode would (see `findDuplicates`): a
        /// copy a guest of an untrusted root maps is one unify leaves alone.
        func merges(of copies: [Physical], kept: Physical) -> (unify: UInt64, overlayMode: UInt64, restart: UInt64) {
            let size = physical[copies[0]]!.size ?? 0
            let mergeable = size > Overlay.inlineLimit
            // Classes unify merges within: overlay guests' copies (by a fold), plain copies by identity.
            var classes: [String: [UInt64]] = [:]
            var restart: UInt64 = 0
            for k in copies {
                let info = physical[k]!
                // A copy unify replaced already (deleted, still mapped): no run links it, a restart frees it.
                if info.deleted && k != kept {
                    restart += info.resident
                    continue
                }
                var cls = "overlay"
                if !info.overlay && info.guests.contains(where: { $0 >= 0 && guests[$0].untrusted != nil }) {
                    cls = "untrusted \(k.device):\(k.inode)"  // unify never links it
                } else if !info.overlay {
                    let identity = (try? open(info.source, objects: objects)).flatMap { f in
                        f.flatMap { try? MetadataIdentity(stat: $0.stat(), xattrs: $0.extendedAttributes()) }
                    }
                    cls = identity.map { "plain " + $0.key } ?? "plain \(k.device):\(k.inode)"
                }
                classes[cls, default: []].append(info.resident)
            }
            var unify: UInt64 = 0
            var keepers: [UInt64] = []
            for (cls, resident) in classes {
                let top = resident.max()!
                if cls == "overlay" && !mergeable {
                    keepers += resident  // stay whole in each overlay guest
                    continue
                }
                unify += resident.reduce(0, +) - top
                keepers.append(top)
            }
            let rest = keepers.isEmpty ? 0 : keepers.reduce(0, +) - keepers.max()!
            return (unify, mergeable ? rest : 0, restart)
        }

        /// Per guest: file-backed, shared, duplicated, anonymous and KSM-merged bytes, and who must restart.
        mutating func tallyGuests() {
            // Replaced copies: deleted inodes whose content lives on in the store or under a live inode.
            let liveDigests = Set(physical.values.filter { !$0.deleted }.compactMap(\.digest)).union(storeDigests)
            let replaced = Set(
                physical.filter { $0.value.deleted && $0.value.digest.map(liveDigests.contains) == true }.map(\.key))
            var figures = [MemoryReport.Figures](repeating: MemoryReport.Figures(), count: guests.count + 1)
            for (i, (maps, guest)) in processes.enumerated() {
                let slot = guest < 0 ? guests.count : guest
                figures[slot].processes += 1
                figures[slot].anonymousBytes += maps.anonymousPss
                figures[slot].ksmMergedBytes += maps.ksmMerged
                var restartBytes: UInt64 = 0
                for (m, k) in zip(maps.mapped, resolved[i]) {
                    figures[slot].fileBackedBytes += m.pss
                    if physical[k]!.guests.count > 1 { figures[slot].sharedBytes += m.pss }
                    if duplicate.contains(k) { figures[slot].duplicatedBytes += m.pss }
                    if replaced.contains(k) { restartBytes += m.pss }
                }
                if replaced.contains(where: { resolved[i].contains($0) }) {
                    report.processesToRestart.append(
                        MemoryReport.Restart(
                            pid: maps.pid, guest: guest < 0 ? "host" : guests[guest].label,
                            group: ProcessMaps.group(pid: maps.pid, in: proc), command: maps.command,
                            bytes: restartBytes))
                }
            }
            for (i, f) in figures.enumerated() where f.processes > 0 || i < guests.count {
                report.guests.append(MemoryReport.Guest(guest: i < guests.count ? guests[i].label : "host", figures: f))
                report.totals.fileBackedBytes += f.fileBackedBytes
                report.totals.sharedBytes += f.sharedBytes
                report.totals.duplicatedBytes += f.duplicatedBytes
                report.totals.anonymousBytes += f.anonymousBytes
                report.totals.ksmMergedBytes += f.ksmMergedBytes
                report.totals.processes += f.processes
            }
            report.processesToRestart.sort { $0.bytes > $1.bytes }
            report.partial = report.unreadableProcesses > 0
            if report.partial {
                report.notes.append(
                    "\(report.unreadableProcesses) processes could not be read (not root, or /proc mounted with hidepid): their memory is left out"
                )
            }
        }
    }

    /// The guest roots, checked, with what `mem` needs of the overlay guests among them.
    static func loadGuests(_ rootPaths: [FilePath], store: Store?, rootTrust: RootTrustPolicy? = nil) throws
        -> [GuestRoot]
    {
        var guests: [GuestRoot] = []
        for checked in try RootValidation.checkedRoots(rootPaths, allowingRepeats: true) {
            let (c, dir, st) = (checked.canonical, checked.directory, checked.stat)
            var g = GuestRoot(label: c.string, canonical: c, stat: st)
            if let store, let record = try? OverlayGuest.open(store: store, canonicalRoot: c, create: false),
                let state = try? record.readState(), let gen = try? record.generation(state.generation),
                OverlayMount.isMounted(gen, at: dir)
            {
                g.overlayDevice = st.device
                g.layers = gen.layers.compactMap(\.directory)
                if gen.isImage {
                    g.image = (try? GuestImage.checked(in: gen.directory, path: gen.path)).flatMap {
                        try? ErofsReader(file: $0)
                    }
                }
                g.upper = gen.upper
            }
            let isOverlayGuest =
                store.flatMap { try? OverlayGuest.open(store: $0, canonicalRoot: c, create: false) } != nil
            if let rootTrust, !isOverlayGuest { g.untrusted = rootTrust.untrustedReason(c, directory: dir) }
            guests.append(g)
        }
        return guests
    }

    /// The guest roots `mem` and `ksm status` look at: given, or the store's guests.
    static func guestPaths(_ options: MemoryOptions) throws -> ([FilePath], Store?, [String]) {
        let storePath =
            options.store ?? (options.roots.isEmpty ? nil : RootValidation.defaultStorePath(for: options.roots))
        if let given = options.store, !options.roots.isEmpty { try GuestStore.check(options.roots, store: given) }
        let store = try storePath.flatMap { try Store.open(at: $0, create: false) }
        if options.store != nil && store == nil { throw InputError("\(options.store!): no hashify store here") }
        var rootPaths = options.roots
        if rootPaths.isEmpty, let store {
            rootPaths =
                store.rememberedGuests()
                + OverlayGuest.all(in: store).filter { (try? $0.readState()) != nil }.map(\.rootPath)
        }
        let notes = rootPaths.isEmpty ? ["no guest roots given and no store: every process counts as the host's"] : []
        return (rootPaths, store, notes)
    }

    /// The index of the guest whose root is the process's root, or -1 (the host).
    /// Failing that, a process in LXC's `lxc.payload.NAME` cgroup belongs to
    /// the guest whose root is `…/NAME/rootfs` (LXC's own layout).
    static func guest(of pid: Int, among guests: [GuestRoot], proc: Directory) -> Int {
        if let st = try? Directory.open(path: FilePath("/proc/\(pid)/root")).stat(),
            let i = guests.firstIndex(where: { $0.stat.device == st.device && $0.stat.inode == st.inode })
        {
            return i
        }
        // The cgroup is read only when some guest is an LXC rootfs.
        guard guests.contains(where: { $0.lxcName != nil }), let group = ProcessMaps.group(pid: pid, in: proc),
            group.hasPrefix("lxc:")
        else { return -1 }
        let name = String(group.dropFirst(4))
        return guests.firstIndex { $0.lxcName == name } ?? -1
    }

    /// The inode holding the pages of an overlay guest's mapping: its
    /// copy-up when the upper layer holds one, a whole file a stacked
    /// metadata layer holds, else the data object the topmost stub at the
    /// mapping's path redirects to (that stub, or one above it, being the mapped inode).
    static func resolveOverlay(_ path: [UInt8], inode: UInt64, in guest: GuestRoot, objects: DataObjects?) -> (
        Physical, Source, ContentDigest?
    )? {
        if let upper = guest.upper, let (dir, name, st) = lookup(path, in: upper, layer: 1, guest: guest) {
            return (Physical(device: st.device, inode: st.inode), .upper(dir, name), nil)
        }
        // The topmost metadata layer holding the path decides: a stub of an
        // object (the mapped inode being it or one above it in the chain), a
        // file of its own (an upper layer a fold stacked), or, for a
        // metadata-only copy-up, the layers below.
        guard let objects else { return nil }
        if let image = guest.image {
            // The image holds the path: a stub names its object; an inline file shares nothing.
            var p = path[...]
            let prefix = Array(guest.canonical.string.utf8)
            if p.count > prefix.count, p.starts(with: prefix), p[prefix.count] == 0x2f { p = p[prefix.count...] }
            guard let node = try? image.node(atPath: Array(p)), let redirect = GuestImage.redirect(of: node),
                let object = try? objects.stat(redirect)
            else {
                return nil
            }
            return (
                Physical(device: object.device, inode: object.inode), .dataObject(redirect), objects.digests[redirect]
            )
        }
        var mappedSeen = false
        for (i, layer) in guest.layers.enumerated() {
            guard let (dir, name, st) = lookup(path, in: layer, layer: 2 + i, guest: guest, anyType: true) else {
                continue
            }
            guard st.isRegular, let file = try? dir.openFileForReading(name) else { return nil }
            mappedSeen = mappedSeen || st.inode == inode
            guard file.extendedAttribute("trusted.overlay.metacopy") != nil else {
                return (Physical(device: st.device, inode: st.inode), .upper(dir, name), nil)
            }
            guard let redirect = file.extendedAttribute("trusted.overlay.redirect") else { continue }
            guard mappedSeen, DataObjects.isValidRedirect(redirect), let object = try? objects.stat(redirect) else {
                return nil
            }
            return (
                Physical(device: object.device, inode: object.inode), .dataObject(redirect), objects.digests[redirect]
            )
        }
        return nil
    }

    /// The regular file at a mapping's path in one of a guest's layers (the
    /// path with the guest root's prefix taken off when the kernel printed it),
    /// looked up one component at a time without following symlinks.
    static func lookup(_ path: [UInt8], in root: Directory, layer: Int, guest: GuestRoot, anyType: Bool = false) -> (
        Directory, FileName, FileStat
    )? {
        var p = path[...]
        let prefix = Array(guest.canonical.string.utf8)
        if p.count > prefix.count, p.starts(with: prefix), p[prefix.count] == 0x2f { p = p[prefix.count...] }
        guard let slash = p.lastIndex(of: 0x2f), slash + 1 < p.endIndex else { return nil }
        let last = FileName(bytes: p[(slash + 1)...])
        guard let dir = guest.directories.directory(Array(p[..<slash]), layer: layer, root: root),
            let st = try? dir.stat(last), st.isRegular || anyType
        else { return nil }
        return (dir, last, st)
    }

    /// Whether the store has a hardlink object of content `digest` (one
    /// prefix directory listed, not the store).
    static func holdsObject(_ digest: ContentDigest, in store: Store) -> Bool {
        let hex = Array(digest.hex.utf8)
        guard let dir = try? store.prefixDirectory(digest.firstByte), let names = try? dir.entryNames() else {
            return false
        }
        return names.contains { $0.bytes.starts(with: hex) }
    }

    /// Directories of an overlay guest's layers by path below the layer, opened
    /// one component at a time without following symlinks, each once (nil: there is none).
    final class LayerDirectories {
        private var opened: [Int: [[UInt8]: Directory?]] = [:]

        func directory(_ path: [UInt8], layer: Int, root: Directory) -> Directory? {
            if path.isEmpty { return root }
            if let known = opened[layer]?[path] { return known }
            let slash = path.lastIndex(of: 0x2f) ?? path.startIndex
            let name = FileName(bytes: path[(path[slash] == 0x2f ? slash + 1 : slash)...])
            let parent = directory(Array(path[..<slash]), layer: layer, root: root)
            let d = parent.flatMap { try? $0.openDirectory(name) }
            opened[layer, default: [:]][path] = d
            return d
        }
    }

    static func open(_ source: Source, objects: DataObjects?) throws -> OpenFile? {
        switch source {
        case .mapFile(let pid, let range): return try OpenFile.open(path: Array("/proc/\(pid)/map_files/".utf8) + range)
        case .dataObject(let redirect): return try objects?.open(redirect)
        case .upper(let dir, let name): return try dir.openFileForReading(name)
        }
    }

    static func cachedBytes(_ file: OpenFile?, size: UInt64) -> UInt64 {
        guard let file else { return 0 }
        return file.cachedBytes(size: size)
    }
}
