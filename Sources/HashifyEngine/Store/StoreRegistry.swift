import HashifySystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The hardlink-mode stores of this host (`/var/lib/hashify/stores`, one
/// canonical path a line), so that a command given a guest finds the store an
/// earlier run unified it with wherever that store is, not only in a
/// `.hashify` above the guest, and a second store is refused for it.
///
/// A line is only a hint: a store counts for a guest when its own list of
/// guests (`STORE/guests`, written by the host) names the guest, so nothing
/// a guest can write decides its store. Each store is added by the run that
/// remembers guests in it; stores that are gone are dropped then.
enum StoreRegistry {
    /// `/var/lib/hashify`, or the first of `$STATE_DIRECTORY` (systemd's
    /// `StateDirectory=`, and where the test suite keeps its own list).
    static let directory: FilePath = {
        if let given = getenv("STATE_DIRECTORY").map({ String(cString: $0) }),
            let first = given.split(separator: ":").first, first.hasPrefix("/")
        {
            return FilePath(String(first))
        }
        return FilePath("/var/lib/hashify")
    }()
    static let name = FileName("stores")

    /// The stores listed (those that still exist; none when there is no list).
    static func stores() -> [FilePath] {
        guard let dir = try? Directory.open(path: directory),
            let bytes = try? dir.openFileForReading(name).readAll(limit: 1 << 20)
        else { return [] }
        return bytes.split(separator: 0x0a).map { FilePath(String(decoding: $0, as: UTF8.self)) }
            .filter { (try? Store.open(at: $0, create: false)) != nil }
    }

    /// Adds a store to the list (best effort: the list is a hint, and a host
    /// without `/var/lib` writable still unifies).
    static func register(_ store: FilePath) {
        guard let canonical = RootValidation.canonical(store) else { return }
        do {
            if (try? Directory.open(path: directory)) == nil {
                try Directory.open(path: directory.removingLastComponent()).makeDirectory(
                    FileName(directory.lastComponent!.string), mode: 0o755)
            }
            let dir = try Directory.open(path: directory)
            let lock = try dir.openOrCreateFile(FileName("stores.lock"), mode: 0o600)
            try lockExclusively(lock, wait: true)
            var known = stores()
            if known.contains(canonical) && known.count == lineCount(dir) { return }
            if !known.contains(canonical) { known.append(canonical) }
            try dir.writeAtomically(Array(known.map { $0.string + "\n" }.joined().utf8), as: name, mode: 0o644)
        } catch {}
    }

    private static func lineCount(_ dir: Directory) -> Int {
        ((try? dir.openFileForReading(name).readAll(limit: 1 << 20)) ?? nil)?.split(separator: 0x0a).count ?? 0
    }

    /// The listed store whose list of guests names `root` (canonical), if any.
    static func store(knowing root: FilePath) -> FilePath? {
        stores().first { (try? Store.open(at: $0, create: false))??.knowsAny(of: [root]) == true }
    }
}
