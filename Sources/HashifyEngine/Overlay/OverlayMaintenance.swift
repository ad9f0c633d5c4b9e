import ErofsImage
import HashifySystem
import SystemPackage

/// What `status` shows of overlay mode: each overlay guest, the data
/// objects, and the copy-on-write reserve (the disk that copy-ups hold now and
/// would claim when guests rewrite shared files).
public struct OverlayStatus: Sendable, Codable {
    /// One overlay guest.
    public struct Guest: Sendable, Codable {
        public var root: String
        public var generation: Int
        public var mounted: Bool
        /// Metadata layers the generation stacks (each fold adds one; a compaction makes one again).
        public var layers = 1
        /// How the mount stacks the store's data objects: "data-only" (a data-only
        /// layer, Linux 6.5+) or "lower" (an ordinary lower layer the metadata
        /// layer hides, any kernel from 4.19); nil when not mounted.
        public var layout: String?
        /// Regular files whose data is a shared object (stubs).
        public var sharedFiles = 0
        /// Their size: what rewriting every shared file would copy up.
        public var sharedBytes: UInt64 = 0
        /// Allocated bytes of the guest's upper layer: what its copy-ups hold now.
        public var copyUpBytes: UInt64 = 0
        /// Whether the upper layer holds anything a fold would take back.
        public var foldPending = false
        /// Data objects the guest's stubs name that the store does not hold: its only copy of
        /// those files is gone (`verify` lists them; a backup restores them).
        public var missingDataObjects = 0
        /// The guest's name, when it has one.
        public var guest: String?
    }
    public var guests: [Guest] = []
    public var dataObjects = 0
    public var dataBytes: UInt64 = 0
    /// Data objects no generation's metadata layer references (gc removes them).
    public var unreferencedDataObjects = 0
    public var unreferencedDataBytes: UInt64 = 0
    /// Free bytes on the store's filesystem (for unprivileged writers: what `df` shows as available).
    public var freeBytes: UInt64 = 0
    /// What a routine update of every overlay guest is taken to copy up: a
    /// tenth of each guest's shared bytes (a package update rewrites that
    /// order of a guest's files), at least its current copy-ups again.
    public var routineUpdateBytes: UInt64 = 0
    public var warnings: [String] = []
}

extension Overlay {
    /// The data redirects the stubs of a metadata layer (or metacopy files of an upper layer) reference,
    /// with the count and size of such stubs.
    struct LayerScan {
        /// How many stubs redirect to each object.
        var counts: [[UInt8]: Int] = [:]
        var referenced: Set<[UInt8]> { Set(counts.keys) }
        var stubs = 0
        var stubBytes: UInt64 = 0
        var allocatedBytes: UInt64 = 0
        var entries = 0
        /// Metadata layers scanned into this one.
        var layers = 0
        /// What stopped the scan before its end (then `referenced` may lack redirects).
        var failure: String?

        /// Scans a layer: an image from its description, a directory entry by entry.
        mutating func scan(_ layer: OverlayGuest.Layer) {
            guard layer.isImage else { return scan(layer.directory!) }
            do {
                let tree = try GuestImage.read(in: layer.holder, path: layer.path.removingLastComponent())
                let summary = GuestImage.stubSummary(of: tree)
                counts.merge(summary.counts, uniquingKeysWith: +)
                stubs += summary.stubs
                stubBytes += summary.bytes
                entries += tree.nodes.count - 1
                allocatedBytes += (try layer.holder.stat(GuestImage.fileName)).allocatedBytes
            } catch {
                failure = "\(error)"
            }
        }

        mutating func scan(_ dir: Directory) {
            var traversal = TreeTraversal<Void>()
            traversal.mountPoints = .visit
            traversal.skipVanished = true
            do {
                try traversal.run(dir, context: ()) { entry, _ in
                    let (name, st) = (entry.name, entry.stat)
                    entries += 1
                    if st.isDirectory { return entry.isMountPoint ? .next : .enter(()) }
                    allocatedBytes += st.allocatedBytes
                    guard st.isRegular, let f = try? entry.directory.openFileForReading(name),
                        f.extendedAttribute("trusted.overlay.metacopy") != nil,
                        let r = f.extendedAttribute("trusted.overlay.redirect"), DataObjects.isValidRedirect(r)
                    else { return .next }
                    counts[r, default: 0] += 1
                    stubs += 1
                    stubBytes += st.size
                    return .next
                }
            } catch {
                failure = "\(error)"
            }
        }
    }

    /// Every data redirect any layer of any guest record references (each
    /// generation's own metadata layer and, to be safe, upper layer, whether
    /// it is in force, stacked by the one in force, or left by a killed run),
    /// and per record its scan of the generation in force (every layer it
    /// stacks). Throws when a layer could not be read whole (then what it
    /// references is not known: nothing may be collected).
    static func references(in store: Store, everyRecord: Bool = true) throws -> (
        Set<[UInt8]>, [(OverlayGuest, OverlayGuest.State?, LayerScan)], problems: [String]
    ) {
        var all = Set<[UInt8]>()
        var perGuest: [(OverlayGuest, OverlayGuest.State?, LayerScan)] = []
        var problems: [String] = []
        // What removes objects needs every record; a report shows the ones it can read (and names the others).
        if everyRecord { try OverlayGuest.requireReadableRecords(in: store) }
        for g in OverlayGuest.all(in: store) {
            do {
                let (referenced, current) = try references(of: g)
                all.formUnion(referenced)
                perGuest.append((g, try? g.readState(), current))
            } catch {
                if everyRecord { throw error }
                problems.append("\(error)")
            }
        }
        return (all, perGuest, problems)
    }

    /// What one record's layers reference (every generation's, to be safe),
    /// and its scan of the generation in force. Throws when a layer could not be read whole.
    static func references(of g: OverlayGuest) throws -> (Set<[UInt8]>, LayerScan) {
        var all = Set<[UInt8]>()
        let state = try? g.readState()
        let inForce = state.flatMap { try? g.layerReferences($0.generation) } ?? []
        // The generation in force's layers must all be there: one missing is a damaged record, not "nothing referenced".
        for ref in inForce where (try? g.layer(ref)) == nil {
            throw g.damaged("generation \(state?.generation ?? 0) lacks its metadata \(ref)")
        }
        var current = LayerScan()
        for n in g.generationNumbers() {
            do { _ = try g.directory.openDirectory(OverlayGuest.generationName(n)) } catch {
                throw InputError("\(g.rootPath): its overlay generation \(n) cannot be read (\(error))")
            }
            for sub in [GuestImage.layerName, "meta", "upper"] {
                let layer: OverlayGuest.Layer
                do { layer = try g.layer("g\(n)/\(sub)") } catch Errno.noSuchFileOrDirectory {
                    continue
                } catch {
                    throw InputError(
                        "\(g.rootPath): a layer of its overlay generation \(n) cannot be read (\(error))")
                }
                var scan = LayerScan()
                scan.scan(layer)
                if let failure = scan.failure {
                    throw InputError(
                        "\(g.rootPath): a layer of its overlay generation \(n) could not be read whole: \(failure)")
                }
                all.formUnion(scan.referenced)
                if n == state?.generation, sub == "upper" {
                    current.allocatedBytes = scan.allocatedBytes
                    current.entries = scan.entries
                } else if inForce.contains("g\(n)/\(sub)") {
                    current.counts.merge(scan.counts, uniquingKeysWith: +)
                    current.stubs += scan.stubs
                    current.stubBytes += scan.stubBytes
                    current.layers += 1
                }
            }
        }
        return (all, current)
    }

    /// The files of every overlay guest (its generation in force) whose stubs
    /// name one of `redirects`, as "ROOT: /PATH", per redirect.
    static func files(naming redirects: Set<[UInt8]>, in store: Store) -> [[UInt8]: (files: [String], size: UInt64)] {
        var out: [[UInt8]: (files: [String], size: UInt64)] = [:]
        guard !redirects.isEmpty else { return out }
        for g in OverlayGuest.all(in: store) {
            guard let state = try? g.readState(), let gen = try? g.generation(state.generation) else { continue }
            for layer in gen.layers {
                for stub in (try? stubs(in: layer, naming: redirects)) ?? [] {
                    out[stub.redirect, default: ([], stub.size)].files.append(
                        "\(g.rootPath): /\(escapedPath(stub.path))")
                }
            }
        }
        return out
    }

    /// The stubs of a metadata layer whose redirect is one of `redirects`: their paths, redirects and sizes.
    static func stubs(in layer: OverlayGuest.Layer, naming redirects: Set<[UInt8]>) throws -> [(
        path: [UInt8], redirect: [UInt8], size: UInt64
    )] {
        if layer.isImage {
            return GuestImage.stubs(
                in: try GuestImage.read(in: layer.holder, path: layer.path.removingLastComponent()), naming: redirects)
        }
        return try stubs(in: layer.directory!, naming: redirects)
    }

    /// The stubs of a directory layer whose redirect is one of `redirects`.
    static func stubs(in layer: Directory, naming redirects: Set<[UInt8]>) throws -> [(
        path: [UInt8], redirect: [UInt8], size: UInt64
    )] {
        var out: [(path: [UInt8], redirect: [UInt8], size: UInt64)] = []
        var traversal = TreeTraversal<Void>()
        try traversal.run(layer, context: ()) { entry, _ in
            if entry.stat.isDirectory { return .enter(()) }
            if entry.stat.isRegular, let f = try? entry.directory.openFileForReading(entry.name),
                let r = f.extendedAttribute("trusted.overlay.redirect"), redirects.contains(r)
            {
                out.append((entry.path, r, entry.stat.size))
            }
            return .next
        }
        return out
    }

    /// The whole files (no stubs) an overlay guest's layers in force hold: its
    /// copy-ups, small files kept whole, files no stub could be made of; with
    /// a label naming each tree.
    static func wholeFileTrees(in store: Store) -> [(label: String, directory: Directory)] {
        var out: [(label: String, directory: Directory)] = []
        for g in OverlayGuest.all(in: store) {
            guard let state = try? g.readState(), let gen = try? g.generation(state.generation) else { continue }
            out.append(("\(g.rootPath) (copy-ups, \(g.path.appending("g\(gen.number)/upper")))", gen.upper))
            for layer in gen.layers {
                if let dir = layer.directory { out.append(("\(g.rootPath) (layer \(layer.path))", dir)) }
            }
        }
        return out
    }

    /// The files of a guest's generation in force whose data object is
    /// missing from the store (the store holds the only copy of a shared
    /// file's data in overlay mode), from the layers' reference lists and the
    /// data directory's names; the layers are walked only when one is missing.
    static func filesWithoutData(_ guest: OverlayGuest, objects: DataObjects) -> [(path: [UInt8], redirect: [UInt8])] {
        guard let state = try? guest.readState(), let gen = try? guest.generation(state.generation) else { return [] }
        let held = objects.heldRedirects()
        var missing = Set<[UInt8]>()
        for layer in gen.layers {
            var counts = LayerReferences.read(layer)
            if counts == nil {
                var scan = LayerScan()
                scan.scan(layer)
                counts = scan.counts
            }
            // The listing is read once per command: an object made since is looked up itself.
            for r in counts?.keys ?? [:].keys where !held.contains(r) && (try? objects.stat(r)) == nil {
                missing.insert(r)
            }
        }
        guard !missing.isEmpty else { return [] }
        return gen.layers.flatMap { layer in
            ((try? stubs(in: layer, naming: missing)) ?? []).map { ($0.path, $0.redirect) }
        }
    }

    /// Notes in a guest's report the files whose data object is missing from the store.
    static func noteMissingData(_ guest: OverlayGuest, objects: DataObjects, in result: inout OverlayReport.Guest) {
        let lost = filesWithoutData(guest, objects: objects)
        guard !lost.isEmpty else { return }
        result.filesWithoutData = lost.count
        result.notes.append(missingDataNote(lost))
    }

    /// "N files cannot be read: …", naming the first files and their objects.
    static func missingDataNote(_ lost: [(path: [UInt8], redirect: [UInt8])]) -> String {
        let named = lost.prefix(3).map { "/\(escapedPath($0.path)) (data\(escapedPath($0.redirect)))" }
        return
            "\(lost.count) file\(lost.count == 1 ? "" : "s") cannot be read: \(lost.count == 1 ? "its" : "their") data object is missing from the store (\(named.joined(separator: ", "))\(lost.count > 3 ? ", …" : "")); hashify verify --repair puts back what another copy still holds"
    }

    /// Whether `root` is an LXC container's rootfs (`ROOT/../config` names it in `lxc.rootfs.path`).
    static func isLXCRootfs(_ root: FilePath) -> Bool {
        guard let config = GuestDiscovery.lxcConfig(besideRootfs: root),
            let value = GuestDiscovery.lxcConfigValue(config, keys: ["lxc.rootfs.path", "lxc.rootfs"])
        else { return false }
        return value.hasSuffix(root.string)
    }

    /// `status` for overlay mode (nil when the store has no overlay guests).
    public static func status(store: Store) -> OverlayStatus? {
        let referenced: Set<[UInt8]>
        let guests: [(OverlayGuest, OverlayGuest.State?, LayerScan)]
        var problems: [String] = []
        do { (referenced, guests, problems) = try references(in: store, everyRecord: false) } catch {
            var out = OverlayStatus()
            out.warnings.append("\(error)")
            return out
        }
        let unreadable = OverlayGuest.records(in: store).unreadable + problems
        guard !guests.isEmpty || !unreadable.isEmpty, let objects = try? store.dataObjects() else { return nil }
        var out = OverlayStatus()
        out.warnings += unreadable.map { "\($0): no data object is removed until it is repaired" }
        if let problem = objects.indexProblem { out.warnings.append(problem) }
        let held = Set(((try? objects.list()) ?? []).map(\.redirect))
        for (g, state, scan) in guests {
            guard let state else {
                do { _ = try g.readState() } catch { out.warnings.append(error.description) }
                continue
            }
            let (entry, warnings) = guestStatus(g, state, scan, objects: objects, held: held)
            out.warnings += warnings
            out.routineUpdateBytes += max(scan.stubBytes / 10, scan.allocatedBytes)
            out.guests.append(entry)
        }
        out.guests.sort { $0.root < $1.root }
        for o in (try? objects.list()) ?? [] {
            out.dataObjects += 1
            out.dataBytes += o.stat.allocatedBytes
            // While a record cannot be read, what it references is unknown: nothing counts as unreferenced.
            if unreadable.isEmpty && !referenced.contains(o.redirect) {
                out.unreferencedDataObjects += 1
                out.unreferencedDataBytes += o.stat.allocatedBytes
            }
        }
        if let free = try? store.directory.availableBytes() { out.freeBytes = free }
        if out.freeBytes < out.routineUpdateBytes {
            out.warnings.append(
                "only \(formatBytes(out.freeBytes)) free for copy-ups: a routine update of the overlay guests needs about \(formatBytes(out.routineUpdateBytes)) (rewriting every shared file: \(formatBytes(out.guests.reduce(0) { $0 + $1.sharedBytes })))"
            )
        }
        return out
    }

    /// `verify` of overlay guests' images: each generation in force's image
    /// checked against its SHA-256 and read whole, and its reference list
    /// (when whole) against what it holds. One line per damaged image.
    static func damagedImages(in store: Store) -> [String] {
        var out: [String] = []
        for g in OverlayGuest.all(in: store) {
            guard let state = try? g.readState(), state.phase != .plain else { continue }
            do {
                let gen = try g.generation(state.generation)
                guard gen.isImage else { continue }
                let held = GuestImage.references(of: try GuestImage.read(gen))
                if let listed = LayerReferences.read(gen.imageLayer), listed != held {
                    out.append(
                        "\(g.rootPath): the reference list of \(gen.path.appending(GuestImage.layerName)) names other objects than the image holds"
                    )
                }
            } catch {
                out.append("\(g.rootPath): \(error)")
            }
        }
        return out.sorted()
    }

    /// One overlay guest's line of `status`, and what it warns of.
    static func guestStatus(
        _ g: OverlayGuest, _ state: OverlayGuest.State, _ scan: LayerScan, objects: DataObjects, held: Set<[UInt8]>
    ) -> (OverlayStatus.Guest, [String]) {
        var warnings: [String] = []
        let layout = (try? g.generation(state.generation)).flatMap { gen in
            (try? Directory.open(path: g.rootPath)).flatMap { OverlayMount.mountedLayout(gen, at: $0) }
        }
        var entry = OverlayStatus.Guest(root: g.rootPath.string, generation: state.generation, mounted: layout != nil)
        entry.layout = layout?.rawValue
        entry.layers = max(1, scan.layers)
        entry.sharedFiles = scan.stubs
        entry.sharedBytes = scan.stubBytes
        entry.copyUpBytes = scan.allocatedBytes
        entry.foldPending = scan.entries > 0
        // An LXC container's rootfs mounted while no process has its root there (the container
        // is stopped; a shell's cwd may still hold it), with copy-ups to fold: its post-stop
        // hook did not unmount it.
        if entry.foldPending, layout != nil, isLXCRootfs(g.rootPath),
            let st = try? Directory.open(path: g.rootPath).stat(),
            ProcessScanner.processesUsing(root: g.rootPath, stat: st, ownDevice: true, rootOnly: true).isEmpty
        {
            warnings.append(
                "\(g.rootPath): its container is stopped but its overlay is still mounted (the post-stop hook could not unmount it): its next start runs unfolded; hashify overlay umount it, and it folds at its next start"
            )
        }
        // In overlay mode the store holds the only copy of a shared file's data.
        let missing = scan.counts.keys.filter { !held.contains($0) }
        entry.missingDataObjects = missing.count
        if !missing.isEmpty {
            warnings.append("\(g.rootPath): \(missingDataNote(filesWithoutData(g, objects: objects)))")
        }
        if state.phase != .active {
            warnings.append(
                "\(g.rootPath): interrupted (\(state.phase.rawValue)); the next overlay command or unify finishes or undoes it"
            )
        }
        return (entry, warnings)
    }

    /// A data object that does not hold what its record says, or a stub's object that is missing.
    public struct DamagedObject: Sendable, Codable {
        public var object: String
        /// The digest the index records ("" when it has no record).
        public var recordedDigest: String
        /// What the content hashes to now ("" when missing).
        public var digest: String
        public var missing: Bool
        /// Its record was dropped from the data index: no fold or conversion gives a new stub this object.
        public var neverReused = false
        /// `verify --repair` put its content back from another copy (`restoredFrom`: which).
        public var restored = false
        public var restoredFrom: String?
        /// With no copy of its content left: the guests' files that read it ("ROOT: /PATH").
        public var filesLost: [String] = []
    }
}
