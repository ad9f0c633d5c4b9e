import HashifySystem
import SystemPackage

/// Options of `hashify mem`.
public struct MemoryOptions: Sendable {
    public var roots: [FilePath]
    public var store: FilePath?
    public init(roots: [FilePath]) { self.roots = roots }
}

/// Builds `hashify mem`'s report from /proc: each process is given to the
/// guest whose root is its root (by device and inode), its file-backed
/// mappings are resolved to the inode that holds their page cache (an overlay
/// guest's mapping to its data object or copy-up), and inodes are grouped by
/// content (the store knows the digests of its objects; other inodes are
/// hashed only when another mapped inode has the same size).
public enum MemoryScanner {
    /// A guest root as `mem` matches processes against it.
    struct GuestRoot {
        var label: String
        var canonical: FilePath
        var stat: FileStat
        /// For a mounted overlay guest: stub inode → redirect, the upper layer, the overlay's device.
        var stubs: [UInt64: [UInt8]] = [:]
        var upper: Directory?
        var overlayDevice: UInt64?
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
            guests = try loadGuests(rootPaths, store: store)
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

        /// Each mapping to the inode that holds its pages (an overlay stub's data object or copy-up).
        mutating func resolveMappings() {
            for (maps, guest) in processes {
                var keys: [Physical] = []
                for m in maps.mapped {
                    var key = Physical(device: m.device, inode: m.inode)
                    var source = Source.mapFile(pid: maps.pid, range: m.range)
                    var digest: ContentDigest?
                    if let o = guests.firstIndex(where: { $0.overlayDevice == m.device }),
                        let redirect = guests[o].stubs[m.inode]
                    {
                        if let (dir, name, st) = copyUp(of: m.path, in: guests[o]) {
                            key = Physical(device: st.device, inode: st.inode)
                            source = .upper(dir, name)
                        } else if let objects, let st = try? objects.stat(redirect) {
                            key = Physical(device: st.device, inode: st.inode)
                            source = .dataObject(redirect)
                            digest = objects.digests[redirect]
                        }
                    }
                    var info = physical[key] ?? PhysicalInfo(source: source, deleted: m.deleted, path: m.path)
                    info.resident += m.pss
                    info.guests.insert(guest)
                    if info.digest == nil { info.digest = digest }
                    physical[key] = info
                    keys.append(key)
                }
                resolved.append(keys)
            }
        }

        /// Contents: the store's digests, else hashing where another inode has the same size.
        mutating func digestContents() {
            if let store {
                for o in (try? store.listObjects()) ?? [] {
                    storeDigests.insert(o.digest)
                    let k = Physical(device: o.stat.device, inode: o.stat.inode)
                    if physical[k] != nil {
                        physical[k]!.digest = o.digest
                        physical[k]!.size = o.stat.size
                    }
                    report.storeCachedBytes += cachedBytes(
                        try? store.prefixDirectory(o.digest.firstByte).openFileForReading(o.name),
                        size: o.stat.size)
                }
            }
            if let objects {
                for o in (try? objects.list()) ?? [] {
                    if let d = o.digest { storeDigests.insert(d) }
                    report.storeCachedBytes += cachedBytes(try? objects.open(o.redirect), size: o.stat.size)
                }
            }
            var bySize: [UInt64: Int] = [:]
            for (k, info) in physical {
                if info.size == nil { physical[k]!.size = (try? open(info.source, objects: objects)?.stat())??.size }
                if let s = physical[k]!.size { bySize[s, default: 0] += 1 }
            }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
            defer { buffer.deallocate() }
            for (k, info) in physical where info.digest == nil {
                guard let size = info.size, size > 0, bySize[size, default: 0] > 1 || info.deleted,
                    let f = try? open(info.source, objects: objects)
                else { continue }
                physical[k]!.digest = try? ContentHasher.contentDigest(of: f, size: size, buffer: buffer).0
            }
        }

        /// Duplicates: the same content resident under several inodes that guests map (what unify
        /// can still merge: the host's own files are not unified); the copy with most pages is the one kept.
        mutating func findDuplicates() {
            var byContent: [ContentDigest: [Physical]] = [:]
            for (k, info) in physical where info.resident > 0 && info.guests.contains(where: { $0 >= 0 }) {
                if let d = info.digest { byContent[d, default: []].append(k) }
            }
            for (_, ks) in byContent where ks.count > 1 {
                let kept = ks.max { physical[$0]!.resident < physical[$1]!.resident }!
                let extra = ks.filter { $0 != kept }
                duplicate.formUnion(extra)
                let cached = extra.reduce(UInt64(0)) { sum, k in
                    sum + cachedBytes(try? open(physical[k]!.source, objects: objects), size: physical[k]!.size ?? 0)
                }
                report.duplicatedFiles.append(
                    MemoryReport.DuplicatedFile(
                        path: escapedPath(physical[kept]!.path), copies: ks.count,
                        duplicatedBytes: extra.reduce(0) { $0 + physical[$1]!.resident }, cachedBytes: cached))
            }
            report.duplicatedFiles.sort { $0.duplicatedBytes > $1.duplicatedBytes }
            report.duplicatedFiles = Array(report.duplicatedFiles.prefix(20))
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
    static func loadGuests(_ rootPaths: [FilePath], store: Store?) throws -> [GuestRoot] {
        var guests: [GuestRoot] = []
        for checked in try RootValidation.checkedRoots(rootPaths, allowingRepeats: true) {
            let (c, dir, st) = (checked.canonical, checked.directory, checked.stat)
            var g = GuestRoot(label: checked.given.string, canonical: c, stat: st)
            if let store, let record = try? OverlayGuest.open(store: store, canonicalRoot: c, create: false),
                let state = try? record.readState(), let gen = try? record.generation(state.generation),
                OverlayMount.isMounted(gen, at: dir)
            {
                g.overlayDevice = st.device
                g.upper = gen.upper
                var scan = Overlay.LayerScan()
                scan.scan(gen.meta)
                g.stubs = scan.stubInodes
            }
            guests.append(g)
        }
        return guests
    }

    /// The guest roots `mem` and `ksm status` look at: given, or the store's guests.
    static func guestPaths(_ options: MemoryOptions) throws -> ([FilePath], Store?, [String]) {
        let storePath =
            options.store ?? (options.roots.isEmpty ? nil : RootValidation.defaultStorePath(for: options.roots))
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

    /// The guest's copy-up of a mapped file, when its upper layer holds one
    /// (the mapping's path, with the guest root's prefix taken off when the kernel printed it).
    static func copyUp(of path: [UInt8], in guest: GuestRoot) -> (Directory, FileName, FileStat)? {
        guard let upper = guest.upper else { return nil }
        var p = path
        let prefix = Array(guest.canonical.string.utf8)
        if p.count > prefix.count, p.starts(with: prefix), p[prefix.count] == 0x2f { p = Array(p[prefix.count...]) }
        let parts = p.split(separator: 0x2f).map { FileName(bytes: $0) }
        guard let last = parts.last else { return nil }
        var dir = upper
        for c in parts.dropLast() {
            guard let d = try? dir.openDirectory(c) else { return nil }
            dir = d
        }
        guard let st = try? dir.stat(last), st.isRegular else { return nil }
        return (dir, last, st)
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
