import HashifySystem
import SystemPackage

/// Bad input: the run stops before changing anything (exit status 2).
public struct InputError: Error, CustomStringConvertible {
    public var description: String
    public init(_ message: String) { description = message }
}

/// Opens and checks the operator's guest roots and store location.
public enum RootValidation {
    static func canonical(_ p: FilePath) -> FilePath? { resolvedPath(p) }

    static func isInside(_ inner: FilePath, _ outer: FilePath) -> Bool {
        inner != outer && inner.starts(with: outer)
    }

    /// A guest root the operator named, checked: its canonical path and the directory, open.
    struct CheckedRoot {
        var given: FilePath
        var canonical: FilePath
        var directory: Directory
        var stat: FileStat
    }

    /// The one check of guest roots every command makes: each must resolve to
    /// a directory, none may be given twice (unless `allowingRepeats`: then a
    /// repeat is dropped) and none may contain another.
    static func checkedRoots(_ paths: [FilePath], allowingRepeats: Bool = false) throws -> [CheckedRoot] {
        var roots: [CheckedRoot] = []
        for p in paths {
            let dir: Directory
            do {
                dir = try Directory.open(path: p)
            } catch Errno.noSuchFileOrDirectory {
                throw InputError("\(p): no such directory")
            } catch Errno.notDirectory {
                throw InputError("\(p): not a directory")
            } catch {
                throw InputError("\(p): cannot open: \(error)")
            }
            let st = try dir.stat()
            guard let c = canonical(p) else { throw InputError("\(p): cannot resolve path") }
            if let other = roots.first(where: { $0.stat.inode == st.inode && $0.stat.device == st.device }) {
                if allowingRepeats { continue }
                throw InputError("\(p): the same directory as \(other.given), given twice")
            }
            if let other = roots.first(where: { isInside(c, $0.canonical) || isInside($0.canonical, c) }) {
                throw InputError("\(p): nested with \(other.given) (roots must not contain each other)")
            }
            roots.append(CheckedRoot(given: p, canonical: c, directory: dir, stat: st))
        }
        return roots
    }

    /// Opens each root for hardlink mode: `checkedRoots`, and all on one filesystem.
    public static func openRoots(_ paths: [FilePath]) throws -> [GuestRoot] {
        if paths.isEmpty { throw InputError("no guest root given") }
        let checked = try checkedRoots(paths)
        for r in checked.dropFirst() where r.stat.device != checked[0].stat.device {
            throw InputError(
                "\(r.given): on another filesystem than \(checked[0].given) (all guests and the store must share one)")
        }
        return checked.map { GuestRoot(path: $0.canonical, directory: $0.directory, stat: $0.stat) }
    }

    /// The default store of guests, the same for every command: the nearest
    /// `.hashify` store in or above the roots' common parent that knows one of
    /// them (the one `unify`, `overlay convert` or `clone` made or used for
    /// them), else the store an overlay guest among them carries (`GuestStore`),
    /// else `.hashify` in the nearest common parent (where `unify` makes it).
    public static func defaultStorePath(for paths: [FilePath]) -> FilePath {
        let canon = paths.map { canonical($0) ?? $0 }
        // Overlay guests alone, of one store: theirs, whatever else remembers them.
        let own = canon.map(GuestStore.of)
        if let first = own.first ?? nil, own.allSatisfy({ $0 == first }) { return first }
        var common = canon[0].removingLastComponent()
        for c in canon.dropFirst() {
            while !c.starts(with: common) || c == common { common = common.removingLastComponent() }
        }
        var dir = common
        while true {
            let candidate = dir.appending(".hashify")
            if (try? Store.knowsAny(at: candidate, of: canon)) == true { return candidate }
            let up = dir.removingLastComponent()
            if up == dir || up.isEmpty { break }
            dir = up
        }
        // An overlay guest carries its store (wherever it is); a plain guest may be known to one elsewhere
        // (what cannot be read here is refused by GuestStore.check, which every command runs).
        if let own = GuestStore.common(canon) { return own }
        for c in canon { if let known = try? StoreRegistry.stores(knowing: c).first { return known } }
        return common.appending(".hashify")
    }

    /// The store an earlier run unified a guest root with (a `.hashify`
    /// above it that knows it, or a store of the host's list, `StoreRegistry`,
    /// that knows it), or nil. Throws when two stores know it, or when a list
    /// that tells cannot be read (then which store it has cannot be told).
    /// The list of `using`, the store the command works with, may be damaged:
    /// the command rewrites it whole from the guests it is given.
    public static func storeKnowing(root: FilePath, using: FilePath? = nil) throws -> FilePath? {
        guard let c = canonical(root) else { return nil }
        let target = using.map { canonical($0) ?? $0 }
        var found: [FilePath] = []
        var dir = c.removingLastComponent()
        while true {
            let candidate = dir.appending(".hashify")
            if try Self.knows(c, at: candidate, unlessItIs: target) { found.append(canonical(candidate) ?? candidate) }
            let up = dir.removingLastComponent()
            if up == dir || up.isEmpty { break }
            dir = up
        }
        for s in try StoreRegistry.stores(knowing: c, unlessItIs: target) {
            let cs = canonical(s) ?? s
            if !found.contains(cs) { found.append(cs) }
        }
        if found.count > 1 {
            throw InputError(
                "\(root): a guest of two stores, \(found[0]) and \(found[1]) (a guest belongs to one store: split it whole out of one, hashify split --store \(found[1]) --root \(root))"
            )
        }
        return found.first
    }

    /// Whether `store` knows the guest; a list that cannot be read throws, but for the store `target`.
    /// No store at `path` (or one removed while it is read) knows nothing.
    static func knows(_ root: FilePath, at path: FilePath, unlessItIs target: FilePath?) throws -> Bool {
        do { return try Store.knowsAny(at: path, of: [root]) ?? false } catch {
            if let target, (canonical(path) ?? path) == target { return false }
            throw error
        }
    }

    /// The nearest `.hashify` store at or above `path` that knows a guest whose root holds `path`.
    public static func storeKnowingGuest(of path: FilePath) -> FilePath? {
        guard let c = canonical(path.removingLastComponent()).map({ $0.appending(path.lastComponent?.string ?? "") })
        else {
            return nil
        }
        var dir = c.removingLastComponent()
        while true {
            let candidate = dir.appending(".hashify")
            if let store = try? Store.open(at: candidate, create: false) {
                let roots = store.rememberedGuests() + OverlayGuest.all(in: store).map(\.rootPath)
                if roots.contains(where: { c.starts(with: $0) && c != $0 }) { return candidate }
            }
            let up = dir.removingLastComponent()
            if up == dir || up.isEmpty { return nil }
            dir = up
        }
    }

    /// Checks the store location: same filesystem as the roots, not inside
    /// a root, no root inside it.
    public static func checkStore(_ store: FilePath, roots: [GuestRoot]) throws {
        let existing: FilePath
        var probe = store
        while true {
            if canonical(probe) != nil {
                existing = probe
                break
            }
            let parent = probe.removingLastComponent()
            if parent == probe || parent.isEmpty { throw InputError("\(store): no existing parent directory") }
            probe = parent
        }
        if existing != store && existing != store.removingLastComponent() {
            throw InputError("\(store): parent directory \(store.removingLastComponent()) does not exist")
        }
        let dir: Directory
        do { dir = try Directory.open(path: existing) } catch {
            throw InputError("\(store): not a directory")
        }
        let st = try dir.stat()
        for r in roots where r.stat.device != st.device {
            throw InputError(
                "\(r.path): not on the filesystem of the store \(store) (hard links need one filesystem; give --store on it)"
            )
        }
        guard let cs = canonical(existing) else { throw InputError("\(store): cannot resolve path") }
        let full = existing == store ? cs : cs.appending(store.lastComponent!)
        for r in roots {
            guard let cr = canonical(r.path) else { continue }
            if full == cr || isInside(full, cr) {
                throw InputError("\(store): the store must not be inside the guest root \(r.path)")
            }
            if isInside(cr, full) { throw InputError("\(r.path): a guest root must not be inside the store \(store)") }
        }
    }
}
