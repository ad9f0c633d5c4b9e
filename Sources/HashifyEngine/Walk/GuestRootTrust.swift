import HashifySystem
import SystemPackage

/// Whether a guest's root is the host's root, read from the container
/// manager's own configuration and from the guest's root directory, never by
/// running anything. In hardlink mode a shared inode is writable in place by
/// every guest root that owns it; a privileged container's root is the host's
/// root anyway, an unprivileged container's is not (yet all root-owned
/// unprivileged containers of one id range, and Incus's idmapped ones, own
/// the same shared files), so hardlink mode links only guests whose root is
/// the host's root or that the config trusts.
public enum GuestRootTrust {
    /// Where systemd-nspawn's settings files are looked for, besides the
    /// machine directory's own parent (`/var/lib/machines/NAME.nspawn`).
    public struct Places: Sendable {
        /// systemd-nspawn's trusted settings directories, searched first, in order.
        public var nspawnDirectories: [FilePath] = ["/etc/systemd/nspawn", "/run/systemd/nspawn"]
        public init() {}
    }

    /// Why the root of the guest at `root` (its canonical path, `directory`
    /// open on it) is not the host's root, as a short phrase (`lxc.idmap`);
    /// nil when nothing says it is not.
    ///
    /// - LXC: the container's `config` beside the rootfs sets `lxc.idmap`
    ///   (or the older `lxc.id_map`); `lxc.include`d files are not read.
    /// - Incus/LXD: the instance's `backup.yaml` beside the rootfs does not
    ///   say `security.privileged: "true"`.
    /// - systemd-nspawn: the first `NAME.nspawn` found (the trusted
    ///   directories, then beside the machine directory) sets `PrivateUsers=`
    ///   to anything but a false boolean.
    /// - Any guest: its root directory is owned by a uid other than 0 (files
    ///   shifted on disk into an id range) and other than the user hashify runs as.
    public static func whyNotHostRoot(_ root: FilePath, directory: Directory, places: Places = Places()) -> String? {
        let parent = root.removingLastComponent()
        let instance = root.lastComponent?.string == "rootfs" ? try? Directory.open(path: parent) : nil
        if let config = GuestDiscovery.lxcConfig(besideRootfs: root),
            let map = GuestDiscovery.lxcConfigValue(config, keys: ["lxc.idmap", "lxc.id_map"]), !map.isEmpty
        {
            return "lxc.idmap"
        }
        if let instance, let incus = IncusInstance.read(instance), !incus.privileged {
            return "an unprivileged Incus container: security.privileged is not true"
        }
        if let name = root.lastComponent?.string, let why = nspawnPrivateUsers(name: name, parent: parent, places) {
            return why
        }
        // A root directory owned by the user hashify runs as is that user's own
        // tree (hashify run unprivileged over guests it owns): it owns the store too.
        if let st = try? directory.stat(), st.uid != 0 && st.uid != effectiveUserID {
            return "its root directory is owned by uid \(st.uid): files shifted into an id range"
        }
        return nil
    }

    /// `PrivateUsers=VALUE in FILE` when the machine's settings file gives it a
    /// user namespace; nil otherwise (no file, no such setting, or a false boolean).
    static func nspawnPrivateUsers(name: String, parent: FilePath, _ places: Places) -> String? {
        let fileName = name + ".nspawn"
        let file = FileName(fileName)
        for dir in places.nspawnDirectories + [parent] {
            guard let d = try? Directory.open(path: dir),
                let text = try? d.openFileForReading(file).readAll(limit: 1 << 20)
            else { continue }
            // systemd-nspawn reads the first file it finds, and only that one.
            guard let value = iniValue(text, section: "Exec", key: "PrivateUsers") else { return nil }
            if ["0", "no", "n", "false", "f", "off"].contains(value.lowercased()) { return nil }
            return "PrivateUsers=\(value) in \(dir.appending(fileName))"
        }
        return nil
    }

    /// The last value `key` has in `[section]` of a systemd unit-style file.
    static func iniValue(_ text: [UInt8], section: String, key: String) -> String? {
        var current = ""
        var value: String?
        for raw in String(decoding: text, as: UTF8.self).split(separator: "\n") {
            let line = raw.trimmingCharacters(in: " \t\r")
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") && line.hasSuffix("]") {
                current = String(line.dropFirst().dropLast())
                continue
            }
            guard current == section, let eq = line.firstIndex(of: "=") else { continue }
            if line[..<eq].trimmingCharacters(in: " \t") == key {
                value = String(line[line.index(after: eq)...].trimmingCharacters(in: " \t"))
            }
        }
        return value
    }
}

/// What hashify reads of an Incus (or LXD) instance's `backup.yaml`, beside
/// its rootfs: from `expanded_config` (profiles applied), what Incus starts
/// the container with.
struct IncusInstance {
    /// `security.privileged: "true"`.
    var privileged = false
    /// A shift recorded on disk (`volatile.last_state.idmap` other than `'[]'`).
    var shiftedOnDisk = false

    /// The instance whose directory is `instance`, or nil without a readable `backup.yaml`.
    static func read(_ instance: Directory) -> IncusInstance? {
        guard let text = try? instance.openFileForReading(FileName("backup.yaml")).readAll(limit: 1 << 20) else {
            return nil
        }
        let lines = text.split(separator: 0x0a).map { String(decoding: $0, as: UTF8.self) }
        guard let expanded = lines.firstIndex(where: { $0.drop { $0 == " " } == "expanded_config:" }) else {
            return nil
        }
        let indent = lines[expanded].prefix { $0 == " " }.count
        var i = IncusInstance()
        for line in lines[(expanded + 1)...] {
            if line.prefix(while: { $0 == " " }).count <= indent && !line.isEmpty { break }
            let l = String(line.drop { $0 == " " })
            if l == "security.privileged: \"true\"" { i.privileged = true }
            if l.hasPrefix("volatile.last_state.idmap:") && l != "volatile.last_state.idmap: '[]'" {
                i.shiftedOnDisk = true
            }
        }
        return i
    }
}

/// Which guests' roots the operator trusts in hardlink mode: the config's
/// `trust-guest-roots` (every guest) and `[guest.NAME] trust-root` (one
/// guest, winning over the first), or `unify --trust-guest-roots`.
public struct RootTrustPolicy: Sendable {
    /// Every guest's root is trusted, whatever it is.
    public var trustAll = false
    /// Per guest, by canonical root: trusted (true) or not (false, even when its root is the host's) whatever `trustAll` says.
    public var byRoot: [FilePath: Bool] = [:]
    /// Where the detector looks for systemd-nspawn settings.
    public var places = GuestRootTrust.Places()
    public init() {}

    /// Why hardlink mode must leave the guest at `root` (canonical, open as
    /// `directory`) unlinked: its root is not the host's root and the config
    /// does not trust it. Nil when it may be linked.
    /// A guest the config does not trust by name (`trust-root = false`) is
    /// left unlinked whatever its root is.
    public func untrustedReason(_ root: FilePath, directory: Directory) -> String? {
        if byRoot[root] ?? trustAll { return nil }
        let why = GuestRootTrust.whyNotHostRoot(root, directory: directory, places: places)
        return why ?? (byRoot[root] == false ? Self.distrustedByConfig : nil)
    }

    /// The reason given for a guest whose root is the host's, but that the config does not trust.
    public static let distrustedByConfig = "trust-root = false in the config"

    /// The reasons of the untrusted guests among `roots`, by root (roots that cannot be opened are left out).
    public func untrusted(_ roots: [FilePath]) -> [FilePath: String] {
        var out: [FilePath: String] = [:]
        for r in roots {
            let c = RootValidation.canonical(r) ?? r
            guard let dir = try? Directory.open(path: c), let why = untrustedReason(c, directory: dir) else { continue }
            out[r] = why
        }
        return out
    }
}
