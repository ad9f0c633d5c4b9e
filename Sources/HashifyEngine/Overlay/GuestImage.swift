import Crypto
import ErofsImage
import HashifySystem
import SystemPackage

/// A generation's metadata layer as one EROFS image (`gN/meta.erofs`), the
/// way composefs keeps it: described in memory (`ErofsTree`), written once,
/// never changed, mounted read-only under the overlay with the store's data
/// directory as the layer its stubs redirect into.
///
/// The description is in the layer's form: a regular file bigger than
/// `Overlay.inlineLimit` is a stub (`external`: its size, no data) carrying
/// `trusted.overlay.metacopy` and the `trusted.overlay.redirect` of its data
/// object; smaller files are inline; the guest's own `trusted.overlay.*`
/// xattrs are escaped (`trusted.overlay.overlay.*`, what overlayfs 6.7+
/// reads back as the guest's); the root holds what the lower layout needs to
/// hide the data directory's top directories (`addHiding`), so one image
/// serves both layouts.
enum GuestImage {
    static let fileName = FileName("meta.erofs")
    /// Beside the image: the SHA-256 of its bytes (hex), written with it and checked before it is mounted or read.
    static let digestName = FileName("meta.erofs.sha256")
    static let layerName = "meta.erofs"
    static let redirectName = Array("trusted.overlay.redirect".utf8)
    static let opaqueName = Array("trusted.overlay.opaque".utf8)

    /// The data object a stub of the description redirects to, or nil (not a stub).
    static func redirect(of node: ErofsNode) -> [UInt8]? {
        guard case .file(.external) = node.kind,
            node.xattrs.contains(where: { $0.name == TreeCopier.metacopyName }),
            let r = node.xattrs.first(where: { $0.name == redirectName })?.value, DataObjects.isValidRedirect(r)
        else { return nil }
        return r
    }

    /// What the description's stubs reference: how many stubs (a hard-linked
    /// one once) redirect to each data object, and the stubs and bytes in all.
    static func stubSummary(of tree: ErofsTree) -> (counts: LayerReferences.Counts, stubs: Int, bytes: UInt64) {
        var counts: LayerReferences.Counts = [:]
        var (stubs, bytes) = (0, UInt64(0))
        // Every node of a description is reached from the root (the builder and the reader make no others).
        for node in tree.nodes {
            guard let r = redirect(of: node) else { continue }
            counts[r, default: 0] += 1
            stubs += 1
            bytes += node.size
        }
        return (counts, stubs, bytes)
    }

    /// How many stubs of the description redirect to each data object.
    static func references(of tree: ErofsTree) -> LayerReferences.Counts { stubSummary(of: tree).counts }

    /// The stubs of the description (each path of a hard-linked one) whose object is one of `redirects`.
    static func stubs(in tree: ErofsTree, naming redirects: Set<[UInt8]>) -> [(
        path: [UInt8], redirect: [UInt8], size: UInt64
    )] {
        var out: [(path: [UInt8], redirect: [UInt8], size: UInt64)] = []
        tree.forEachPath { path, id in
            if let r = redirect(of: tree[id]), redirects.contains(r) { out.append((path, r, tree[id].size)) }
        }
        return out
    }

    /// A guest's xattrs in the layer's form: its own `trusted.overlay.*` escaped.
    static func escaped(_ attributes: [ExtendedAttribute]) -> (attributes: [ExtendedAttribute], escaped: Int) {
        var count = 0
        let out = attributes.map { a -> ExtendedAttribute in
            guard a.name.starts(with: TreeCopier.overlayPrefix) else { return a }
            count += 1
            return ExtendedAttribute(
                name: TreeCopier.escapedPrefix + a.name[TreeCopier.overlayPrefix.count...], value: a.value)
        }
        return (out, count)
    }

    /// Adds to the root what hides the data directory's top directories
    /// ("00" … "ff") when it is an ordinary lower layer: a whiteout for each
    /// name the guest's root does not hold, and its own directory of such a
    /// name made opaque. (A file of that name hides it already.) In the
    /// data-only layout they change nothing: the guest sees neither.
    static func addHiding(_ tree: inout ErofsTree) {
        var byName: [[UInt8]: ErofsTree.NodeID] = [:]
        for e in tree.entries(of: ErofsTree.rootID) { byName[e.name] = e.node }
        for byte in 0...255 {
            let name = Array(hexString([UInt8(byte)]).utf8)
            guard let id = byName[name] else {
                tree.add(
                    ErofsNode(.characterDevice(rdev: 0), permissions: 0), as: name, in: ErofsTree.rootID)
                continue
            }
            guard tree[id].isDirectory else { continue }
            tree[id].xattrs.removeAll { $0.name == opaqueName }
            tree[id].xattrs.append(ExtendedAttribute(name: opaqueName, value: [0x79]))
        }
    }

    /// Writes the description as the image of generation `number`, whose
    /// directory is `generation` (under a temporary name, synced, then
    /// renamed), and its reference list. Returns the counts.
    @discardableResult
    static func write(_ tree: ErofsTree, into generation: Directory, number: Int) throws -> LayerReferences.Counts {
        // A UUID of its own: overlayfs' index records the lower layer's UUID in each origin.
        let uuid = (0..<16).map { _ in UInt8.random(in: 0...255) }
        let bytes = try ErofsWriter.image(
            of: tree, options: ErofsWriter.Options(uuid: uuid, volumeName: Array("hashify".utf8)))
        try generation.writeAtomically(bytes, as: fileName, mode: 0o644)
        try generation.writeAtomically(Array((digest(bytes) + "\n").utf8), as: digestName, mode: 0o644)
        let counts = references(of: tree)
        try LayerReferences.write(
            counts,
            OverlayGuest.Layer(
                reference: "g\(number)/\(layerName)", directory: nil, path: FilePath(layerName), holder: generation,
                name: layerName))
        return counts
    }

    /// Reads generation `gen`'s image back into its description.
    static func read(_ gen: OverlayGuest.Generation) throws -> ErofsTree {
        try read(in: gen.directory, path: gen.path)
    }

    /// Reads the image in a generation directory (at `path`, for messages), checked against its digest.
    static func read(in generation: Directory, path: FilePath) throws -> ErofsTree {
        let (_, bytes) = try checkedImage(in: generation, path: path)
        do { return try ErofsReader.read(image: bytes) } catch {
            throw InputError("\(path.appending(layerName)): the metadata image cannot be read (\(error))")
        }
    }

    static func digest(_ bytes: [UInt8]) -> String { hexString(Array(SHA256.hash(data: bytes))) }

    /// The image of a generation directory, open, once its bytes match the
    /// digest written with it: a truncated, edited or replaced image is
    /// refused (never mounted or read), and so is one without its digest.
    static func checked(in generation: Directory, path: FilePath) throws -> OpenFile {
        let (file, _) = try checkedImage(in: generation, path: path)
        try file.rewind()
        return file
    }

    /// The image of a generation directory, open and read whole, once its bytes match the digest written with it.
    static func checkedImage(in generation: Directory, path: FilePath) throws -> (file: OpenFile, bytes: [UInt8]) {
        let file = try generation.openFileForReading(fileName)
        let recorded = try? generation.openFileForReading(digestName).readAll(limit: 256)
        let image = try file.readAll()
        guard let bytes = recorded, bytes.last == 0x0a,
            String(decoding: bytes.dropLast(), as: UTF8.self) == digest(image)
        else {
            throw InputError(
                "\(path.appending(layerName)): the metadata image does not match the SHA-256 written with it (damaged, truncated or replaced); nothing of it is used"
            )
        }
        return (file, image)
    }

    /// Whether generation directory `generation` holds an image (a generation of this version).
    static func holdsImage(_ generation: Directory) -> Bool {
        (try? generation.stat(fileName))?.isRegular == true
    }
}
