import HashifySystem
import SystemPackage

/// Content-only objects: the data layer overlay guests share.
///
/// ```
/// STORE/data/ab/cdef0123456789    one object per distinct content (no metadata of its own that matters)
/// STORE/data-index                "DIGEST NAME\n" per object, appended as objects are made
/// ```
/// An object's name is the first 14 hex digits of its SHA-256 (a second
/// content with the same prefix gets `-1`, `-2`, …), so that the absolute
/// redirect a stub carries (`/ab/cdef0123456789`, 16 bytes) fits in an ext4
/// inode with the stub's other xattrs: a guest's metadata layer takes no data
/// blocks. The full digest lives in the index, not on the object: objects are
/// often the guest's own inode, linked, whose attributes the guest still sees
/// until it is switched over.
public final class DataObjects: @unchecked Sendable {
    let data: Directory
    let store: Store
    private var prefixes: [UInt8: Directory] = [:]
    /// Full digest → redirect, and redirect → digest.
    private(set) var redirects: [ContentDigest: [UInt8]] = [:]
    private(set) var digests: [[UInt8]: ContentDigest] = [:]
    private var index: OpenFile?

    static let indexName = FileName("data-index")

    init(store: Store) throws {
        self.store = store
        data = try store.directory.openDirectory(FileName("data"))
        try load()
    }

    private func load() throws {
        guard let f = try? store.directory.openFileForReading(Self.indexName) else { return }
        for line in try f.readAll().split(separator: 0x0a) {
            let parts = line.split(separator: 0x20)
            guard parts.count == 2, parts[0].count == 64, let d = bytesFromHex(parts[0]), d.count == 32 else {
                continue
            }
            let redirect = Array(parts[1])
            guard Self.isValidRedirect(redirect) else { continue }
            let digest = ContentDigest(bytes: d)
            redirects[digest] = redirect
            digests[redirect] = digest
        }
    }

    /// A redirect hashify makes: "/XX/" and 12 or more hex digits, optionally "-N".
    static func isValidRedirect(_ r: [UInt8]) -> Bool {
        guard r.count >= 16, r[0] == 0x2f, r[3] == 0x2f else { return false }
        let hex: (UInt8) -> Bool = { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
        guard hex(r[1]), hex(r[2]) else { return false }
        return r[4...].allSatisfy { hex($0) || $0 == 0x2d || (0x30...0x39).contains($0) }
    }

    /// The prefix directory and the name of a redirect ("/ab/cdef…").
    static func split(_ redirect: [UInt8]) -> (FileName, FileName) {
        (FileName(bytes: redirect[1..<3]), FileName(bytes: redirect[4...]))
    }

    private func prefixDirectory(_ name: FileName) throws -> Directory {
        let key = bytesFromHex(name.bytes)?.first ?? 0
        if let d = prefixes[key] { return d }
        do { try data.makeDirectory(name, mode: 0o700) } catch Errno.fileExists {}
        let d = try data.openDirectory(name)
        prefixes[key] = d
        return d
    }

    /// The redirect of the object holding `digest`, if there is one whose file exists.
    public func redirect(for digest: ContentDigest) -> [UInt8]? {
        guard let r = redirects[digest] else { return nil }
        let (p, n) = Self.split(r)
        guard let st = try? prefixDirectory(p).stat(n), st.isRegular else { return nil }
        return r
    }

    /// True when the redirect names a recorded object whose file exists.
    public func isLive(_ redirect: [UInt8]) -> Bool {
        guard digests[redirect] != nil else { return false }
        return (try? stat(redirect))?.isRegular ?? false
    }

    /// Opens the object behind a redirect.
    public func open(_ redirect: [UInt8]) throws -> OpenFile {
        let (p, n) = Self.split(redirect)
        return try prefixDirectory(p).openFileForReading(n)
    }

    /// Stat of the object behind a redirect.
    public func stat(_ redirect: [UInt8]) throws -> FileStat {
        let (p, n) = Self.split(redirect)
        return try prefixDirectory(p).stat(n)
    }

    /// Makes `source` (its content verified to be `digest`) an object and
    /// returns its redirect: the source inode itself is linked in when
    /// `linkSource` (no data copied), else its content is cloned or copied
    /// into a new file. The index record is written before the name appears.
    public func add(_ source: OpenFile, digest: ContentDigest, size: UInt64, linkSource: Bool) throws -> [UInt8] {
        if let r = redirect(for: digest) { return r }
        let hex = Array(digest.hex.utf8)
        let prefix = FileName(bytes: hex[0..<2])
        let dir = try prefixDirectory(prefix)
        var suffix = 0
        while true {
            var name = Array(hex[2..<14])
            if suffix > 0 { name += Array("-\(suffix)".utf8) }
            let redirect = [0x2f] + prefix.bytes + [0x2f] + name
            let recorded = digests[redirect]
            let exists = (try? dir.stat(FileName(name))) != nil
            // Another content under this name, or a file without a record
            // (never removed here: only gc, which reads every stub, may): the next name.
            if (recorded != nil && recorded != digest) || (recorded == nil && exists) {
                suffix += 1
                continue
            }
            if exists { return redirect }
            if recorded == nil { try record(digest, redirect) }
            if linkSource {
                try source.link(into: dir, as: FileName(name))
            } else {
                let temp = FileName(Array(".new-".utf8) + name)
                try? dir.unlink(temp)
                let f = try dir.createFile(temp, mode: 0o400)
                try source.cloneContent(to: f, size: size)
                guard try f.stat().size == size else {
                    try? dir.unlink(temp)
                    throw Errno.ioError
                }
                try dir.rename(temp, to: dir, as: FileName(name), flags: .noReplace)
            }
            redirects[digest] = redirect
            digests[redirect] = digest
            return redirect
        }
    }

    private func record(_ digest: ContentDigest, _ redirect: [UInt8]) throws {
        if index == nil { index = try store.directory.openForAppending(Self.indexName, mode: 0o600) }
        try index!.write(Array(digest.hex.utf8) + [0x20] + redirect + [0x0a])
    }

    /// Every object file: its redirect and stat (names without an index record included, digest nil).
    public func list() throws -> [(redirect: [UInt8], digest: ContentDigest?, stat: FileStat)] {
        var out: [(redirect: [UInt8], digest: ContentDigest?, stat: FileStat)] = []
        for p in try data.entryNames() where p.bytes.count == 2 && bytesFromHex(p.bytes) != nil {
            let dir = try prefixDirectory(p)
            for n in try dir.entryNames() {
                guard let st = try? dir.stat(n), st.isRegular else { continue }
                let r = [0x2f] + p.bytes + [0x2f] + n.bytes
                out.append((r, digests[r], st))
            }
        }
        return out
    }

    /// Removes the objects behind `redirects` and rewrites the index without them.
    public func remove(_ unused: Set<[UInt8]>) throws {
        for r in unused {
            let (p, n) = Self.split(r)
            try? prefixDirectory(p).unlink(n)
            if let d = digests[r] { redirects[d] = nil }
            digests[r] = nil
        }
        var text: [UInt8] = []
        for (d, r) in redirects { text += Array(d.hex.utf8) + [0x20] + r + [0x0a] }
        index = nil
        try store.directory.writeAtomically(text, as: Self.indexName)
    }

    /// Flushes the index and the objects to disk (before a generation that uses them is switched to).
    public func sync() throws {
        try index?.sync()
        try data.syncFilesystem()
    }
}
