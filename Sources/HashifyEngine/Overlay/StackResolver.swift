import ErofsImage
import HashifySystem
import SystemPackage

extension Overlay {
    /// A generation's description read back from its image, with how many
    /// entries name each node (more than one: a hard link).
    final class OldImage {
        let tree: ErofsTree
        let linkCounts: [Int]

        init(_ tree: ErofsTree) {
            self.tree = tree
            var counts = [Int](repeating: 0, count: tree.nodes.count)
            for node in tree.nodes {
                if case .directory(let entries) = node.kind { for e in entries { counts[e.node] += 1 } }
            }
            linkCounts = counts
        }

        /// The node named `name` in the directory `dir`, or nil: found by
        /// bisection, the tree being the reader's (entries in name order).
        func child(_ dir: ErofsTree.NodeID, _ name: [UInt8]) -> ErofsTree.NodeID? {
            guard case .directory(let entries) = tree[dir].kind else { return nil }
            var (low, high) = (0, entries.count)
            while low < high {
                let mid = (low + high) / 2
                let order = compareBytes(entries[mid].name, name)
                if order == 0 { return entries[mid].node }
                if order < 0 { low = mid + 1 } else { high = mid }
            }
            return nil
        }
    }

    /// Where a directory of the merged view stands in the layers of a
    /// generation: the same directory in its upper layer, and its node in the
    /// generation's image (or, for a generation of an earlier version, its
    /// directory in each metadata layer the lookup reaches), when the path
    /// leads there plainly. This is the one place that applies overlayfs'
    /// lookup rules to a stack (an opaque or redirected upper directory, or
    /// another entry of the same name, ends the lookup of what is below);
    /// fold, clone, manifest and mem ask it what the guest sees unchanged.
    final class FoldContext {
        let upper: Directory?
        /// Directory layers of an earlier version's generation, top first (a
        /// layer without one is left out; an opaque or redirected directory ends the list).
        let layers: [Directory]
        let image: OldImage?
        let node: ErofsTree.NodeID?
        /// Whether entries the upper layer does not touch may be taken from the image unread
        /// (not while overlayfs' index holds copied-up hard links: they show new content under every name).
        let reuse: Bool

        init(upper: Directory?, layers: [Directory], image: OldImage?, node: ErofsTree.NodeID?, reuse: Bool) {
            self.upper = upper
            self.layers = layers
            self.image = image
            self.node = node
            self.reuse = reuse
        }

        /// The context of generation `gen`'s root; `reuse` as above (a fold of a stopped guest).
        static func root(of gen: OverlayGuest.Generation, reuse: Bool) throws -> FoldContext {
            if gen.isImage {
                return FoldContext(
                    upper: gen.upper, layers: [], image: OldImage(try GuestImage.read(gen)), node: ErofsTree.rootID,
                    reuse: reuse && !indexHoldsCopyUps(gen))
            }
            return FoldContext(
                upper: gen.upper, layers: gen.layers.compactMap(\.directory), image: nil, node: nil, reuse: false)
        }

        /// Whether a directory ends the lookup of what is below it (opaque, or
        /// renamed: redirected). A read error throws: it is never taken for "no".
        static func endsLookup(_ dir: Directory) throws -> Bool {
            try dir.presentExtendedAttribute("trusted.overlay.opaque") != nil
                || dir.presentExtendedAttribute("trusted.overlay.redirect") != nil
        }

        /// The child context. Below an opaque or redirected directory the
        /// layers under it at the same path are not what the guest sees, so
        /// nothing below is taken from them unread. An error reading the
        /// upper layer throws (the fold then publishes nothing).
        func child(_ name: FileName) throws -> FoldContext {
            var u: Directory?
            if let upper {
                do { u = try upper.openDirectory(name) } catch Errno.noSuchFileOrDirectory {
                    u = nil
                } catch Errno.notDirectory, Errno.tooManySymbolicLinkLevels {
                    // The upper holds something else under this name (a whiteout, a file, a symlink).
                    return FoldContext(upper: nil, layers: [], image: nil, node: nil, reuse: false)
                }
            }
            if let u, try Self.endsLookup(u) {
                return FoldContext(upper: u, layers: [], image: nil, node: nil, reuse: false)
            }
            var below: [Directory] = []
            for layer in layers {
                let d: Directory
                do { d = try layer.openDirectory(name) } catch Errno.noSuchFileOrDirectory { continue } catch { break }
                below.append(d)
                if (try? Self.endsLookup(d)) != false { break }
            }
            let n = node.flatMap { image?.child($0, name.bytes) }.flatMap {
                image?.tree[$0].isDirectory == true ? $0 : nil
            }
            return FoldContext(upper: u, layers: below, image: n == nil ? nil : image, node: n, reuse: reuse)
        }

        /// The names in the upper directory, listed at the first question (nil:
        /// not a stopped guest's, or it could not be listed).
        private lazy var upperNames: Set<[UInt8]>? =
            reuse ? (try? upper?.entryNames())?.map { Set($0.map(\.bytes)) } : nil

        /// Whether the upper layer surely holds nothing under `name` (no upper
        /// directory here, or no entry of that name; an error counts as holding).
        /// With `reuse` (a stopped guest: no one writes its upper layer) the
        /// upper directory is listed once; else each name is looked up as it is asked.
        private func upperLacks(_ name: FileName) -> Bool {
            guard let upper else { return true }
            if let upperNames { return !upperNames.contains(name.bytes) }
            do {
                _ = try upper.stat(name)
                return false
            } catch Errno.noSuchFileOrDirectory { return true } catch { return false }
        }

        /// The image's node the guest sees unchanged under `name` (the upper
        /// layer holds nothing there), to be taken as it is; nil otherwise.
        func unchangedNode(_ name: FileName) -> (image: OldImage, id: ErofsTree.NodeID)? {
            guard reuse, let image, let node, upperLacks(name), let id = image.child(node, name.bytes) else {
                return nil
            }
            return (image, id)
        }

        /// The object a regular file of the merged view still has from the
        /// layers below the upper one: the upper layer has nothing under its
        /// name, or only a metadata-only copy-up (a chmod, a chown) that no
        /// rename moved; the layer below holds a stub of an object of that
        /// size under the name, and the stub is no hard link (overlayfs keeps
        /// copied-up hard links in its index, not under each name).
        func unchangedRedirect(_ name: FileName, size: UInt64) throws -> [UInt8]? {
            if !upperLacks(name) {
                guard let f = try upper?.openFileForReading(name),
                    try f.presentExtendedAttribute("trusted.overlay.metacopy") != nil,
                    try f.presentExtendedAttribute("trusted.overlay.redirect") == nil
                else { return nil }
            }
            if let image, let node {
                guard let id = image.child(node, name.bytes), image.linkCounts[id] == 1,
                    image.tree[id].size == size
                else { return nil }
                return GuestImage.redirect(of: image.tree[id])
            }
            for layer in layers {
                let st: FileStat
                do { st = try layer.stat(name) } catch Errno.noSuchFileOrDirectory { continue } catch { return nil }
                guard st.isRegular, st.linkCount == 1, st.size == size,
                    let stub = try? layer.openFileForReading(name),
                    stub.extendedAttribute("trusted.overlay.metacopy") != nil,
                    let r = stub.extendedAttribute("trusted.overlay.redirect"), DataObjects.isValidRedirect(r)
                else { return nil }
                return r
            }
            return nil
        }
    }
}
