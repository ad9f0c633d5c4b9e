import Crypto
import HashifySystem
import SystemPackage

/// One overlay guest's records in the store.
///
/// ```
/// STORE/overlay/ID/root          the guest root's canonical path (bytes)
/// STORE/overlay/ID/state         phase, generation in force, inode of what ROOT was
/// STORE/overlay/ID/gN/meta       generation N: its metadata layer (stubs), when it made one
/// STORE/overlay/ID/gN/layers     … or the metadata layers it stacks, top first ("gK/upper", "gK/meta")
/// STORE/overlay/ID/gN/upper      … the guest's copy-ups
/// STORE/overlay/ID/gN/work       … overlayfs' work directory
/// STORE/overlay/ID/plain         the guest's tree before conversion, being removed
/// STORE/overlay/ID/export        an in-place export being built
/// STORE/overlay/ID/mnt           where fold and export mount the guest privately
/// ```
/// ID is the first 16 hex digits of the SHA-256 of the canonical root path.
/// `state` is replaced atomically (write, fsync, rename): each rename is one
/// step of a conversion, fold or export, so a run killed at any instant
/// leaves a state from which `recover` finishes or undoes the work.
final class OverlayGuest: Sendable {
    /// What the guest is doing; see `Overlay.recover` for what each phase means after a kill.
    enum Phase: String {
        /// Generation `generation` is being built from the plain tree at ROOT.
        case converting
        /// The generation is complete; ROOT (inode `rootInode`) is being exchanged for an empty mount point.
        case switching
        /// Generation `generation` is in force.
        case active
        /// Generation `generation` is in force; `generation + 1` is being built from it.
        case folding
        /// Generation `generation` is in force; a plain copy is being built in `export`.
        case exporting
        /// The plain copy is complete; the mount point ROOT (inode `rootInode`) is being exchanged for it.
        case restoring
        /// The guest is a plain directory again; its generations are being removed.
        case plain
    }

    struct State: Equatable {
        var phase: Phase
        var generation: Int
        var rootInode: UInt64 = 0
    }

    let id: String
    /// The guest root's canonical path.
    let rootPath: FilePath
    let directory: Directory
    /// The canonical path of `directory` (mount options name layers by path).
    let path: FilePath
    /// The store's path (STORE/overlay/ID is the record).
    var storePath: FilePath { path.removingLastComponent().removingLastComponent() }
    /// The store holding the record (its data objects are the ones a recovery records objects in).
    let store: Store

    static func id(for canonicalRoot: FilePath) -> String {
        let digest = SHA256.hash(data: Array(canonicalRoot.string.utf8))
        return hexString(Array(digest.prefix(8)))
    }

    private init(id: String, rootPath: FilePath, directory: Directory, path: FilePath, store: Store) {
        self.store = store
        self.id = id
        self.rootPath = rootPath
        self.directory = directory
        self.path = path
    }

    static func overlayDirectory(of store: Store) throws -> Directory {
        do { try store.directory.makeDirectory(FileName("overlay"), mode: 0o700) } catch Errno.fileExists {}
        return try store.directory.openDirectory(FileName("overlay"))
    }

    /// The record of the guest at `canonicalRoot`; made when `create`, else nil when there is none.
    static func open(store: Store, canonicalRoot: FilePath, create: Bool) throws -> OverlayGuest? {
        let id = id(for: canonicalRoot)
        let parent: Directory
        if create {
            parent = try overlayDirectory(of: store)
        } else {
            do { parent = try store.directory.openDirectory(FileName("overlay")) } catch Errno.noSuchFileOrDirectory {
                return nil
            }
        }
        if create {
            do { try parent.makeDirectory(FileName(id), mode: 0o700) } catch Errno.fileExists {}
        }
        let dir: Directory
        do { dir = try parent.openDirectory(FileName(id)) } catch Errno.noSuchFileOrDirectory { return nil }
        guard let storePath = RootValidation.canonical(store.path) else {
            throw InputError("\(store.path): cannot resolve path")
        }
        let guest = OverlayGuest(
            id: id, rootPath: canonicalRoot, directory: dir,
            path: storePath.appending("overlay").appending(id), store: store)
        if create, (try? dir.stat(FileName("root"))) == nil {
            try dir.writeAtomically(Array(canonicalRoot.string.utf8), as: FileName("root"))
        }
        return guest
    }

    /// Every guest the store has records of (those it can read).
    static func all(in store: Store) -> [OverlayGuest] { records(in: store).guests }

    /// Every guest the store has records of, and what it cannot read: a
    /// record whose directory or `root` file cannot be read, or whose root
    /// does not give its name (each named with why). Where the store removes
    /// objects, an unreadable record keeps every one (unknown means referenced).
    static func records(in store: Store) -> (guests: [OverlayGuest], unreadable: [String]) {
        let parent: Directory
        do { parent = try store.directory.openDirectory(FileName("overlay")) } catch Errno.noSuchFileOrDirectory {
            return ([], [])
        } catch {
            return ([], ["\(store.path)/overlay: \(error)"])
        }
        let names: [FileName]
        do { names = try parent.entryNames() } catch { return ([], ["\(store.path)/overlay: \(error)"]) }
        var out: [OverlayGuest] = []
        var unreadable: [String] = []
        for name in names {
            let where_ = "\(store.path)/overlay/\(escapedPath(name.bytes))"
            let bytes: [UInt8]
            do {
                bytes = try parent.openDirectory(name).openFileForReading(FileName("root")).readAll()
            } catch Errno.noSuchFileOrDirectory
                where ((try? parent.openDirectory(name).entryNames()) ?? [FileName("state")]).allSatisfy({
                    let n = String(decoding: $0.bytes, as: UTF8.self)
                    return n != "state" && !(n.hasPrefix("g") && Int(n.dropFirst()) != nil)
                })
            {
                // A record a conversion killed at its very start left without state or generations: it references nothing.
                continue
            } catch {
                unreadable.append("\(where_): its record's root cannot be read (\(error))")
                continue
            }
            let root = FilePath(String(decoding: bytes, as: UTF8.self))
            guard let g = try? open(store: store, canonicalRoot: root, create: false),
                g.id == String(decoding: name.bytes, as: UTF8.self)
            else {
                unreadable.append("\(where_): its record's root file does not name the guest it belongs to")
                continue
            }
            out.append(g)
        }
        return (out, unreadable)
    }

    /// Throws, naming them, when the store has overlay records it cannot read:
    /// what they reference is unknown, so nothing may be removed.
    static func requireReadableRecords(in store: Store) throws {
        let unreadable = records(in: store).unreadable
        guard let first = unreadable.first else { return }
        throw InputError(
            "\(first)\(unreadable.count > 1 ? " (and \(unreadable.count - 1) more)" : ""); no data object is removed while a guest's record cannot be read whole: repair or remove it"
        )
    }

    // MARK: state

    /// The record's state: nil when there is none (the guest is plain). A
    /// state that cannot be read, names an unknown phase, or a generation the
    /// record does not hold throws `damaged`: nothing is done on its word.
    func readState() throws(InputError) -> State? {
        let file: OpenFile
        do { file = try directory.openFileForReading(FileName("state")) } catch Errno.noSuchFileOrDirectory {
            let generations = generationNumbers()
            if !generations.isEmpty {
                throw damaged(
                    "no state, but generation\(generations.count == 1 ? "" : "s") \(generations.map { "g\($0)" }.joined(separator: ", "))"
                )
            }
            return nil
        } catch {
            throw damaged("state unreadable: \(error)")
        }
        guard let text = try? file.readAll(limit: 4096) else { throw damaged("state unreadable or over 4 KiB") }
        var fields: [String: String] = [:]
        for line in text.split(separator: 0x0a) {
            let parts = line.split(separator: 0x20, maxSplits: 1)
            if parts.count == 2 {
                fields[String(decoding: parts[0], as: UTF8.self)] = String(decoding: parts[1], as: UTF8.self)
            }
        }
        guard let p = fields["phase"].flatMap(Phase.init(rawValue:)), let g = fields["generation"].flatMap(Int.init),
            g >= 0,
            let inode = UInt64(fields["root-inode"] ?? "0")
        else {
            throw damaged("state not in the form hashify writes")
        }
        let state = State(phase: p, generation: g, rootInode: inode)
        // Every phase but these has its generation built and in place.
        let listed: [Int]
        do { listed = try listedGenerations() } catch { throw damaged("its generations cannot be listed: \(error)") }
        if ![.converting, .plain].contains(p), !listed.contains(g) {
            throw damaged("state names generation \(g), which the record does not hold")
        }
        return state
    }

    /// Whether the record has a state file (readable or not).
    var hasState: Bool { (try? directory.stat(FileName("state"))) != nil }

    /// The reason a record is not used: it names the record and says nothing was changed.
    func damaged(_ why: String) -> InputError {
        InputError("\(path): damaged overlay record of \(rootPath) (\(why)); left as it is, nothing changed")
    }

    /// The generations the record holds (gN directories).
    func generationNumbers() -> [Int] { (try? listedGenerations()) ?? [] }

    /// The generations the record holds; a listing that fails throws.
    func listedGenerations() throws -> [Int] {
        try directory.entryNames().compactMap { name -> Int? in
            let s = String(decoding: name.bytes, as: UTF8.self)
            guard s.hasPrefix("g"), let n = Int(s.dropFirst()), "g\(n)" == s else { return nil }
            return n
        }.sorted()
    }

    /// Replaces the state (nil: the guest is a plain directory again: noted as
    /// `plain` first, so that its generations go only on the record's own word).
    func writeState(_ state: State?) throws {
        guard let state else {
            try writeState(State(phase: .plain, generation: 0))
            try removeGenerations(except: nil)
            try directory.unlink(FileName("state"))
            try? directory.sync()
            return
        }
        let text = "phase \(state.phase.rawValue)\ngeneration \(state.generation)\nroot-inode \(state.rootInode)\n"
        try directory.writeAtomically(Array(text.utf8), as: FileName("state"))
    }

    /// Removes the whole record of a guest that is plain again (`export` in
    /// place): a record left without state or generations is no guest, and
    /// is passed over by what proves objects unused, but it is clutter.
    func removeRecord() {
        try? unmountPrivate()
        guard let parent = try? store.directory.openDirectory(FileName("overlay")) else { return }
        try? parent.removeTree(FileName(id))
        try? parent.sync()
    }

    // MARK: generations

    /// One metadata layer of a generation: where it lives ("gK/meta.erofs",
    /// the image a conversion or fold writes once; in records of earlier
    /// versions "gK/meta", a directory made whole, or "gK/upper", generation
    /// K's upper layer folded in place and stacked) and, for a directory, the directory.
    struct Layer {
        var reference: String
        /// The layer's directory (nil for an image).
        var directory: Directory?
        var path: FilePath
        /// The generation directory holding it (gK) and its name there ("meta.erofs", "meta", "upper").
        var holder: Directory
        var name: String
        var isImage: Bool { name == GuestImage.layerName }
    }

    /// Opens the layer a reference ("gK/meta.erofs", "gK/meta", "gK/upper") names.
    func layer(_ reference: String) throws -> Layer {
        let parts = reference.split(separator: "/").map(String.init)
        let holder = try directory.openDirectory(FileName(parts[0]))
        let path = path.appending(parts[0]).appending(parts[1])
        if parts[1] == GuestImage.layerName {
            guard (try holder.stat(GuestImage.fileName)).isRegular else { throw Errno.noSuchFileOrDirectory }
            return Layer(reference: reference, directory: nil, path: path, holder: holder, name: parts[1])
        }
        return Layer(
            reference: reference, directory: try holder.openDirectory(FileName(parts[1])), path: path, holder: holder,
            name: parts[1])
    }

    /// The directories of one generation.
    struct Generation {
        var number: Int
        /// gN itself.
        var directory: Directory
        /// The metadata layers, top first (one for a generation built whole).
        var layers: [Layer]
        var upper: Directory
        var work: Directory
        /// Canonical paths, for mount options.
        var upperPath: FilePath
        var workPath: FilePath
        /// gN's path.
        var path: FilePath
        /// Whether the generation is one image (this version's); else directory layers of an earlier one.
        var isImage: Bool { layers.count == 1 && layers[0].isImage }
        /// The image's layer record (its reference list lives beside it).
        var imageLayer: Layer {
            Layer(
                reference: "g\(number)/\(GuestImage.layerName)", directory: nil,
                path: path.appending(GuestImage.layerName), holder: directory, name: GuestImage.layerName)
        }
    }

    static func generationName(_ n: Int) -> FileName { FileName("g\(n)") }

    /// In gN: the metadata layer holds escaped `trusted.overlay.*` xattrs of the guest's own.
    static let escapedMarker = FileName("escaped-xattrs")
    /// In gN: the metadata layers it stacks, when it made none of its own.
    static let layersFile = FileName("layers")

    /// Makes generation `n` afresh (whatever a killed run left under its name
    /// is removed first): its upper and work directories; its image is
    /// written by what builds it (`GuestImage.write`), before anything opens
    /// it as a generation.
    func makeGeneration(_ n: Int) throws -> Directory {
        let name = Self.generationName(n)
        try directory.removeTree(name)
        try directory.makeDirectory(name, mode: 0o700)
        let g = try directory.openDirectory(name)
        for sub in ["upper", "work"] { try g.makeDirectory(FileName(sub), mode: 0o755) }
        return g
    }

    /// The layer references of generation `n` (top first), read from its record.
    func layerReferences(_ n: Int) throws -> [String] {
        let g = try directory.openDirectory(Self.generationName(n))
        let file: OpenFile
        do { file = try g.openFileForReading(Self.layersFile) } catch Errno.noSuchFileOrDirectory {
            return [GuestImage.holdsImage(g) ? "g\(n)/\(GuestImage.layerName)" : "g\(n)/meta"]
        }
        let bytes = try file.readAll(limit: 65536)
        let refs = (bytes ?? []).split(separator: 0x0a).map { String(decoding: $0, as: UTF8.self) }
        guard bytes != nil, !refs.isEmpty, refs.allSatisfy(Self.isLayerReference) else {
            throw damaged("generation \(n) names metadata layers not in the form hashify writes")
        }
        return refs
    }

    /// "gK/meta" or "gK/upper" (what a stack of an earlier version names).
    static func isLayerReference(_ s: String) -> Bool {
        let parts = s.split(separator: "/")
        guard parts.count == 2, ["meta", "upper"].contains(parts[1]), parts[0].hasPrefix("g"),
            let k = Int(parts[0].dropFirst()), "g\(k)" == parts[0]
        else { return false }
        return true
    }

    /// Opens generation `n`.
    func generation(_ n: Int) throws -> Generation {
        let base = path.appending("g\(n)")
        do {
            let g = try directory.openDirectory(Self.generationName(n))
            return Generation(
                number: n, directory: g, layers: try layerReferences(n).map(layer),
                upper: try g.openDirectory(FileName("upper")),
                work: try g.openDirectory(FileName("work")),
                upperPath: base.appending("upper"), workPath: base.appending("work"), path: base)
        } catch let e as InputError {
            throw e
        } catch {
            // A missing or unreadable image, layer, upper or work directory: named, never a bare errno.
            throw damaged("generation \(n) cannot be opened whole: \(error)")
        }
    }

    /// Removes every generation but `keep` (and the scratch trees named in
    /// `scratch`, wherever they are). An older generation whose layer `keep`
    /// stacks stays, but for what `keep` does not stack (its work directory,
    /// overlayfs' index of hard links into that layer, among it).
    func removeGenerations(except keep: Int?, scratch: [String] = ["plain", "export"]) throws {
        let kept = try keep.map { try layerReferences($0) } ?? []
        for name in try directory.entryNames() {
            let s = String(decoding: name.bytes, as: UTF8.self)
            if s.hasPrefix("g"), let n = Int(s.dropFirst()), n != keep {
                var used = Set(kept.filter { $0.hasPrefix("\(s)/") }.map { String($0.dropFirst(s.count + 1)) })
                used.formUnion(used.map { $0 + ".refs" })
                if used.isEmpty {
                    try ParallelTreeRemoval.remove(name, in: directory)
                    continue
                }
                let g = try directory.openDirectory(name)
                for sub in try g.entryNames() where !used.contains(String(decoding: sub.bytes, as: UTF8.self)) {
                    try ParallelTreeRemoval.remove(sub, in: g)
                }
            }
            if scratch.contains(s) {
                try ParallelTreeRemoval.remove(name, in: directory)
            }
        }
        for kind in scratch {
            if let (dir, name) = try? besideRoot(kind), (try? dir.stat(name)) != nil {
                try ParallelTreeRemoval.remove(name, in: dir)
            }
        }
    }

    /// Where a scratch tree of a switch ("plain": the empty mount point that
    /// takes the tree's place, then the old tree; "export": the plain copy
    /// that takes the mount point's place) is made: in the record, when the
    /// guest's parent directory is on the store's device, else beside the
    /// root (`.NAME.hashify-plain`): a rename cannot cross btrfs subvolumes,
    /// and a subvolume guest's parent is on another device than the store.
    func scratchPlace(_ kind: String) throws -> (Directory, FileName) {
        guard let last = rootPath.lastComponent else { throw InputError("\(rootPath): not a guest root") }
        let parent = try Directory.open(path: rootPath.removingLastComponent())
        if try parent.stat().device == directory.stat().device { return (directory, FileName(kind)) }
        return (parent, FileName(".\(last.string).hashify-\(kind)"))
    }

    /// The scratch place of `kind` beside the root (nil when scratch trees live in the record).
    private func besideRoot(_ kind: String) throws -> (Directory, FileName)? {
        let place = try scratchPlace(kind)
        return place.1.bytes.first == 0x2e ? place : nil
    }

    /// The private mount point for fold and export (made when missing).
    func privateMountPoint() throws -> FilePath {
        do { try directory.makeDirectory(FileName("mnt"), mode: 0o700) } catch Errno.fileExists {}
        return path.appending("mnt")
    }

    /// Unmounts what a killed fold or export left mounted at the private
    /// mount point, and detaches an image a killed mount left at the image's
    /// mount point (an overlay that holds it keeps it).
    func unmountPrivate() throws {
        let mnt = try privateMountPoint()
        // No descriptor may stay open inside the mount while it is unmounted.
        let mounted = (try? Directory.open(path: mnt)).map(OverlayMount.isMountPoint) ?? false
        if mounted { try OverlayMount.unmount(mnt) }
        let image = path.appending(OverlayMount.imageMountName)
        if (try? Directory.open(path: image)).map(OverlayMount.isMountPoint) == true { try detachFilesystem(image) }
    }
}

extension OverlayGuest.Generation {
    /// Overlayfs shows a guest's own `trusted.overlay.*` xattrs (escaped as
    /// `trusted.overlay.overlay.*`) only from Linux 6.7 on; before, it hides
    /// them. Notes that this generation holds some.
    func markEscapedAttributes(_ count: Int) throws {
        guard count > 0 else { return }
        try directory.writeAtomically(Array("\(count)\n".utf8), as: OverlayGuest.escapedMarker)
    }

    /// Why this generation must not be mounted on the running kernel, or nil.
    func refusalOnThisKernel() -> String? {
        let (major, minor) = kernelVersion()
        guard (major, minor) < (6, 7), (try? directory.stat(OverlayGuest.escapedMarker)) != nil else { return nil }
        return
            "generation \(number) holds the guest's own trusted.overlay.* xattrs, which overlayfs before Linux 6.7 hides (this is Linux \(major).\(minor)): boot 6.7 or later, or export the guest there"
    }
}

extension Overlay {
    /// On kernels before 6.7 (which cannot escape them), the first path in a
    /// plain guest whose xattrs include `trusted.overlay.*` names: such a
    /// guest is refused before anything is made.
    static func ownOverlayAttributeRefusal(root: FilePath, tree: Directory) throws {
        let (major, minor) = kernelVersion()
        guard (major, minor) < (6, 7) else { return }
        var traversal = TreeTraversal<Void>()
        var found: [UInt8]?
        try traversal.run(tree, context: ()) { entry, _ in
            if found != nil { return .next }
            let attributes = try extendedAttributes(in: entry.directory, of: entry.name)
            if attributes.contains(where: { $0.name.starts(with: TreeCopier.overlayPrefix) }) { found = entry.path }
            return entry.stat.isDirectory && !entry.isMountPoint ? .enter(()) : .next
        }
        if found == nil,
            try tree.extendedAttributes().contains(where: { $0.name.starts(with: TreeCopier.overlayPrefix) })
        {
            found = []
        }
        if let found {
            throw InputError(
                "\(root): /\(escapedPath(found)) carries trusted.overlay.* xattrs of its own, which overlayfs before Linux 6.7 cannot keep apart from its own (this is Linux \(major).\(minor)); left as it was"
            )
        }
    }
}
