import HashifySystem
import SystemPackage

/// Finds the guests of the container managers on the host from their own
/// configuration, never running anything inside a guest: LXC containers
/// (`LXCPATH/NAME/config`, `lxc.rootfs.path`), systemd-nspawn machines
/// (`/var/lib/machines/NAME`) and Incus/LXD `dir` storage pools. A guest
/// hashify cannot use is listed with the reason, not dropped.
public enum GuestDiscovery {
    /// A guest found on the host.
    public struct Found: Sendable, Codable {
        /// `lxc:NAME`, `nspawn:NAME`, `incus:POOL/NAME`.
        public var name: String
        public var root: String
        /// Why hashify leaves it alone (nil: usable).
        public var unusable: String?
        /// A btrfs subvolume (LXC's `btrfs:` backend): overlay mode can share it, hardlink mode cannot.
        public var isBtrfsSubvolume = false
    }

    /// Where to look; the defaults are the managers' own defaults.
    public struct Places: Sendable {
        public var lxcPaths: [FilePath] = ["/var/lib/lxc"]
        public var machines: FilePath = "/var/lib/machines"
        public var incusPools: [FilePath] = [
            "/var/lib/incus/storage-pools", "/var/snap/lxd/common/lxd/storage-pools", "/var/lib/lxd/storage-pools",
        ]
        public init() {}
    }

    public static func find(_ places: Places) -> [Found] {
        var out: [Found] = []
        for lxcpath in places.lxcPaths {
            guard let dir = try? Directory.open(path: lxcpath) else { continue }
            for name in ((try? dir.entryNames()) ?? []).sorted() {
                guard let sub = try? dir.openDirectory(name),
                    let config = try? sub.openFileForReading(FileName("config")).readAll()
                else { continue }
                out.append(lxcGuest(String(decoding: name.bytes, as: UTF8.self), config: config, lxcpath: lxcpath))
            }
        }
        if let dir = try? Directory.open(path: places.machines) {
            for name in ((try? dir.entryNames()) ?? []).sorted() {
                let n = String(decoding: name.bytes, as: UTF8.self)
                if n.hasPrefix(".") { continue }
                guard let st = try? dir.stat(name) else { continue }
                let root = places.machines.appending(n)
                if st.isDirectory {
                    out.append(check(Found(name: "nspawn:\(n)", root: root.string)))
                } else if n.hasSuffix(".raw") {
                    out.append(
                        Found(
                            name: "nspawn:\(String(n.dropLast(4)))", root: root.string,
                            unusable: "a disk image, not a directory"))
                }
            }
        }
        for pools in places.incusPools {
            guard let dir = try? Directory.open(path: pools) else { continue }
            for pool in ((try? dir.entryNames()) ?? []).sorted() {
                let p = String(decoding: pool.bytes, as: UTF8.self)
                guard let containers = try? dir.openDirectory(pool).openDirectory(FileName("containers")) else {
                    continue
                }
                for c in ((try? containers.entryNames()) ?? []).sorted() {
                    let n = String(decoding: c.bytes, as: UTF8.self)
                    let root = pools.appending(p).appending("containers").appending(n).appending("rootfs")
                    out.append(check(Found(name: "incus:\(p)/\(n)", root: root.string)))
                }
            }
        }
        return out
    }

    /// The LXC config of the container whose rootfs is `root` (`…/NAME/rootfs`
    /// beside `…/NAME/config`), or nil when it is not laid out so.
    static func lxcConfig(besideRootfs root: FilePath) -> [UInt8]? {
        guard root.lastComponent?.string == "rootfs" else { return nil }
        return try? Directory.open(path: root.removingLastComponent()).openFileForReading(FileName("config")).readAll(
            limit: 1 << 20)
    }

    /// The value an LXC config gives the last of `keys` it sets ("KEY = VALUE" lines), or nil.
    static func lxcConfigValue(_ config: [UInt8], keys: Set<String>) -> String? {
        var value: String?
        for line in String(decoding: config, as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1)
            guard parts.count == 2 else { continue }
            if keys.contains(parts[0].trimmingCharacters(in: " \t")) { value = parts[1].trimmingCharacters(in: " \t") }
        }
        return value
    }

    /// An LXC container from its config's `lxc.rootfs.path` (or the older `lxc.rootfs`).
    static func lxcGuest(_ name: String, config: [UInt8], lxcpath: FilePath) -> Found {
        let value = lxcConfigValue(config, keys: ["lxc.rootfs.path", "lxc.rootfs"])
        let label = "lxc:\(name)"
        guard let v = value, !v.isEmpty else {
            return Found(
                name: label, root: lxcpath.appending(name).appending("rootfs").string,
                unusable: "its config sets no lxc.rootfs.path")
        }
        var path = v
        if let colon = v.firstIndex(of: ":"), !v.hasPrefix("/") {
            let backend = String(v[..<colon])
            path = String(v[v.index(after: colon)...])
            switch backend {
            case "dir": break
            case "overlay", "overlayfs":
                return Found(
                    name: label, root: path,
                    unusable: "an LXC overlay rootfs (hashify overlay convert gives copy-on-write sharing instead)")
            case "btrfs":
                var f = path.hasPrefix("/") ? check(Found(name: label, root: path)) : Found(name: label, root: path)
                f.isBtrfsSubvolume = true
                return f
            default:
                return Found(
                    name: label, root: path, unusable: "the \(backend) backend is not a directory hashify can use")
            }
        }
        if !path.hasPrefix("/") { return Found(name: label, root: path, unusable: "a relative rootfs path") }
        return check(Found(name: label, root: path))
    }

    /// A found directory must exist, be a directory and not be a symlink.
    static func check(_ f: Found) -> Found {
        var g = f
        let path = FilePath(f.root)
        guard let last = path.lastComponent, let parent = try? Directory.open(path: path.removingLastComponent()) else {
            g.unusable = "the rootfs does not exist"
            return g
        }
        guard let st = try? parent.stat(FileName(last.string)) else {
            g.unusable = "the rootfs does not exist"
            return g
        }
        if st.isSymlink {
            g.unusable = "the rootfs is a symlink (give its target if it is a guest)"
        } else if !st.isDirectory {
            g.unusable = "the rootfs is not a directory"
        }
        return g
    }

    /// The usable guests' roots, with those on another filesystem than the
    /// store (at `storePath`, or the first guest's) marked unusable; overlay
    /// guests of the store (mounted on their own overlay device) count as on it.
    /// In overlay mode a btrfs subvolume of the store's btrfs filesystem is
    /// usable too (its data objects are reflinks); in hardlink mode it is not.
    public static func usable(
        _ found: inout [Found], store: FilePath?, overlayGuests: Set<FilePath> = [],
        mode: HashifyConfig.Mode = .hardlink
    ) -> [FilePath] {
        var storeDirectory: Directory?
        if let store {
            var p = store
            while storeDirectory == nil && !p.isEmpty {
                storeDirectory = try? Directory.open(path: p)
                if storeDirectory == nil { p = p.removingLastComponent() }
            }
        }
        var roots: [FilePath] = []
        for i in found.indices where found[i].unusable == nil {
            if overlayGuests.contains(FilePath(found[i].root)) {
                roots.append(FilePath(found[i].root))
                continue
            }
            if found[i].isBtrfsSubvolume && mode == .hardlink {
                found[i].unusable =
                    "a btrfs subvolume: hard links cannot cross subvolumes (overlay mode shares it: --mode overlay)"
                continue
            }
            guard let dir = try? Directory.open(path: FilePath(found[i].root)) else {
                found[i].unusable = "cannot open it"
                continue
            }
            if storeDirectory == nil { storeDirectory = dir }
            let same =
                mode == .overlay
                ? (try? dir.isOnSameFilesystem(as: storeDirectory!)) ?? false
                : (try? dir.stat().device) == (try? storeDirectory!.stat().device)
            if !same {
                found[i].unusable =
                    mode == .overlay
                    ? "on another filesystem than the store (its data objects must be links or reflinks)"
                    : "on another filesystem than the store (hard links need one)"
                continue
            }
            roots.append(FilePath(found[i].root))
        }
        return roots
    }
}

extension Substring {
    /// The text without the characters of `set` at either end.
    fileprivate func trimmingCharacters(in set: String) -> String {
        var s = self
        while let f = s.first, set.contains(f) { s.removeFirst() }
        while let l = s.last, set.contains(l) { s.removeLast() }
        return String(s)
    }
}
