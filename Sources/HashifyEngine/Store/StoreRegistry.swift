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
/// remembers guests in it; stores that are gone are dropped then. A list
/// that cannot be read whole (not a regular file, too large, a line that is
/// no absolute path) is reported and left as it is, never rewritten.
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
    static var path: FilePath { directory.appending("stores") }

    /// The stores listed (those that still exist), or why the list cannot be read.
    static func read() -> Result<[FilePath], InputError> {
        guard let dir = try? Directory.open(path: directory), let st = try? dir.stat(name) else { return .success([]) }
        let damaged = { (why: String) in
            Result<[FilePath], InputError>.failure(
                InputError(
                    "\(path): the host's list of stores cannot be read (\(why)); repair or remove it (it is rebuilt as unify runs)"
                ))
        }
        guard st.isRegular else { return damaged("not a regular file") }
        guard let bytes = try? dir.openFileForReading(name).readAll(limit: 1 << 20) else {
            return damaged("unreadable, or larger than 1 MiB")
        }
        var out: [FilePath] = []
        for line in bytes.split(separator: 0x0a) {
            guard line.first == 0x2f, !line.contains(where: { $0 < 0x20 || $0 == 0x7f }),
                let text = String(validating: line, as: UTF8.self)
            else { return damaged("a line that is not an absolute path") }
            let store = FilePath(text)
            if let dir = try? Directory.open(path: store), Store.isStore(dir) { out.append(store) }
        }
        return .success(out)
    }

    /// Adds a store to the list (best effort: a host without `/var/lib`
    /// writable still unifies); a damaged list is left as it is.
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
            guard case .success(var known) = read() else { return }
            let lines = ((try? dir.openFileForReading(name).readAll(limit: 1 << 20)) ?? nil)?.split(separator: 0x0a)
            if known.contains(canonical) && known.count == lines?.count { return }
            if !known.contains(canonical) { known.append(canonical) }
            try dir.writeAtomically(Array(known.map { $0.string + "\n" }.joined().utf8), as: name, mode: 0o644)
        } catch {}
    }

    /// The listed stores whose list of guests names `root` (canonical).
    static func stores(knowing root: FilePath, unlessItIs target: FilePath? = nil) throws -> [FilePath] {
        var out: [FilePath] = []
        for store in try read().get() where try RootValidation.knows(root, at: store, unlessItIs: target) {
            out.append(store)
        }
        return out
    }
}
