import HashifySystem
import SystemPackage

/// The store an overlay guest belongs to, read from the guest root itself:
/// mounted, the overlay's upper directory (`STORE/overlay/ID/gN/upper`);
/// unmounted, `trusted.hashify.store` on the mount point, the empty
/// directory the overlay covers (set by `convert` and by every mount; the
/// guest never sees it), taken only when that store holds the guest's
/// overlay record. Every command finds a guest's store from it, and one
/// given another store for the guest refuses.
enum GuestStore {
    static let attributeName = "trusted.hashify.store"

    /// The store of the overlay guest at `root`, or nil when it is no overlay guest's root.
    static func of(_ root: FilePath) -> FilePath? {
        guard let canonical = RootValidation.canonical(root), let dir = try? Directory.open(path: canonical) else {
            return nil
        }
        if OverlayMount.isMountPoint(dir), dir.filesystemType == OverlayMount.superMagic,
            let options = OverlayMount.superOptions(of: dir),
            let upper = options.split(separator: ",").first(where: { $0.hasPrefix("upperdir=") })
        {
            // STORE/overlay/ID/gN/upper, as mountinfo escapes it.
            var path = FilePath(unescapeMountinfo(String(upper.dropFirst("upperdir=".count))))
            for _ in 0..<3 { path = path.removingLastComponent() }
            return path.lastComponent?.string == "overlay" ? path.removingLastComponent() : nil
        }
        guard let value = dir.extendedAttribute(attributeName), !value.isEmpty, value.first == 0x2f,
            String(validating: value, as: UTF8.self) != nil
        else { return nil }
        // The mark is a hint, taken only where no guest can have written it: an empty directory
        // (an unmounted overlay guest's mount point; a plain guest's root, which its root user
        // can mark, is never empty), naming a store outside it that has this guest's overlay record.
        let marked = FilePath(String(decoding: value, as: UTF8.self))
        guard (try? dir.entryNames())?.isEmpty == true, let store = RootValidation.canonical(marked),
            store != canonical, !store.starts(with: canonical),
            let s = try? Store.open(at: store, create: false),
            let record = try? OverlayGuest.open(store: s, canonicalRoot: canonical, create: false),
            record.hasState || !record.generationNumbers().isEmpty
        else { return nil }
        return marked
    }

    /// Notes on an (unmounted, empty) mount point which store its guest belongs to.
    static func mark(_ mountPoint: Directory, store: FilePath) throws {
        guard let canonical = RootValidation.canonical(store) else { return }
        let value = Array(canonical.string.utf8)
        if mountPoint.extendedAttribute(attributeName) == value { return }
        let t = try mountPoint.stat().modificationTime
        try mountPoint.setExtendedAttribute(ExtendedAttribute(name: Array(attributeName.utf8), value: value))
        try? mountPoint.setModificationTime(t)
    }

    /// Refuses a command that works on `roots` with the store at `store`
    /// when one of them is an overlay guest of another store, or a plain
    /// guest an earlier run unified with another store (or with two, or
    /// when the lists that tell cannot be read).
    static func check(_ roots: [FilePath], store: FilePath) throws {
        let given = RootValidation.canonical(store) ?? store
        for r in roots {
            if let own = of(r) {
                guard (RootValidation.canonical(own) ?? own) != given else { continue }
                throw InputError(
                    "\(r): an overlay guest of the store \(own), not of \(store) (a guest belongs to one store: give --store \(own))"
                )
            }
            guard let known = try RootValidation.storeKnowing(root: r, using: given), known != given else { continue }
            throw InputError(
                "\(r): a guest of the store \(known), not of \(store) (a guest belongs to one store: give --store \(known), or first split it whole out of that one: hashify split --store \(known) --root \(r))"
            )
        }
    }

    /// The store the overlay guests among `roots` belong to (the first one found), if any.
    static func common(_ roots: [FilePath]) -> FilePath? {
        for r in roots { if let s = of(r) { return s } }
        return nil
    }

    private static func unescapeMountinfo(_ s: String) -> String {
        var out = ""
        var i = s.startIndex
        while i < s.endIndex {
            if s[i] == "\\", let end = s.index(i, offsetBy: 4, limitedBy: s.endIndex),
                let code = UInt8(s[s.index(after: i)..<end], radix: 8)
            {
                out.append(Character(UnicodeScalar(code)))
                i = end
            } else {
                out.append(s[i])
                i = s.index(after: i)
            }
        }
        return out
    }
}
