import HashifySystem
import SystemPackage

/// Content-only objects: the data layer overlay guests share.
///
/// ```
/// STORE/data/ab/cdef0123456789    one object per distinct content (no metadata of its own that matters)
/// STORE/data-index                the digest of each object (`IndexFile`, kind "objects")
/// ```
/// An object's name is the first 14 hex digits of its SHA-256 (a second
/// content with the same prefix gets `-1`, `-2`, …), so that the absolute
/// redirect a stub carries (`/ab/cdef0123456789`, 16 bytes) fits in an ext4
/// inode with the stub's other xattrs: a guest's metadata layer takes no data
/// blocks. The full digest lives in the index, not on the object: objects are
/// often the guest's own inode, linked, whose attributes the guest still sees
/// until it is switched over.
///
/// The index is written whole by `sync`, which every command calls before it
/// switches a guest to a generation whose stubs use new objects; so every
/// object a generation in force references has its record. An object made by
/// a run killed before that has none: it is never reused (`publish` takes the
/// next name) and gc removes it once no generation references it. Stores of
/// earlier versions (a text index, appended) are read and rewritten in this
/// format at the next `sync`; a damaged index is rebuilt from the objects.
public final class DataObjects: @unchecked Sendable {
    let data: Directory
    /// The store's directory (not the `Store`, which owns this: no cycle keeps its lock alive).
    let storeDirectory: Directory
    private var prefixes: [UInt8: Directory] = [:]
    /// Full digest → redirect, and redirect → digest.
    private(set) var redirects: [ContentDigest: [UInt8]] = [:]
    private(set) var digests: [[UInt8]: ContentDigest] = [:]
    /// Records not yet written to the index file.
    private var unwritten = false
    /// What was wrong with the index file when it was read (it was then rebuilt from the objects).
    private(set) var indexProblem: String?
    /// Objects a conversion or fold in progress made of a guest's own inode:
    /// linked under a temporary name (`STORE/reserved/ab-NAME`), given to that guest's
    /// stubs, and recorded (renamed to NAME, a record in the index) only by
    /// `commit`, after the guest's switch, when no guest can write the inode
    /// any more. Until then no other guest's stub is given one, and a fold
    /// that fails or is killed leaves nothing any guest reads.
    private var reserved: [ContentDigest: Reservation] = [:]
    private var reservedNames: [[UInt8]: ContentDigest] = [:]
    /// Objects whose file this process has seen in place or put there (not
    /// looked up again: the store lock keeps other removers out).
    private var present = Set<[UInt8]>()

    /// An object made of a guest's own inode, not yet recorded: its redirect,
    /// digest, and the inode's state once linked (checked again by `commit`).
    struct Reservation: Equatable {
        var redirect: [UInt8]
        var digest: ContentDigest
        var inode: UInt64
        var size: UInt64
        var modificationTime: Timestamp
        var changeTime: Timestamp

        /// One line of a journal: "O INODE SIZE MTIME MTIME-NS CTIME CTIME-NS DIGEST REDIRECT".
        var journalLine: [UInt8] {
            let (m, c) = (modificationTime, changeTime)
            return Array(
                "O \(inode) \(size) \(m.seconds) \(m.nanoseconds) \(c.seconds) \(c.nanoseconds) \(digest.hex) ".utf8)
                + redirect + [0x0a]
        }

        /// The reservations of a journal's "O" lines (nil when one is damaged).
        static func fromJournal(_ bytes: [UInt8]) -> [Reservation]? {
            var out: [Reservation] = []
            for line in bytes.split(separator: 0x0a) where line.first == 0x4f {
                let f = line.split(separator: 0x20)
                guard f.count == 9, let inode = UInt64(String(decoding: f[1], as: UTF8.self)),
                    let size = UInt64(String(decoding: f[2], as: UTF8.self)),
                    let ms = Int64(String(decoding: f[3], as: UTF8.self)),
                    let mn = UInt32(String(decoding: f[4], as: UTF8.self)),
                    let cs = Int64(String(decoding: f[5], as: UTF8.self)),
                    let cn = UInt32(String(decoding: f[6], as: UTF8.self)),
                    let d = bytesFromHex(f[7]), d.count == 32, DataObjects.isValidRedirect(Array(f[8]))
                else { return nil }
                out.append(
                    Reservation(
                        redirect: Array(f[8]), digest: ContentDigest(bytes: d), inode: inode, size: size,
                        modificationTime: Timestamp(seconds: ms, nanoseconds: mn),
                        changeTime: Timestamp(seconds: cs, nanoseconds: cn)))
            }
            return out
        }
    }

    static let indexName = FileName("data-index")

    /// One object's record in the index.
    struct Record: IndexRecord {
        var digest: ContentDigest
        var redirect: [UInt8]
        static let kind = Array("objects".utf8)
        static let size = 64
        static let label = "the data index"

        init(digest: ContentDigest, redirect: [UInt8]) {
            self.digest = digest
            self.redirect = redirect
        }
        init(decoding p: UnsafeRawBufferPointer) {
            digest = ContentDigest(UnsafeRawBufferPointer(rebasing: p[0..<32]))
            redirect = Array(p[33..<33 + min(Int(p[32]), 31)])
        }
        func encode(into out: inout [UInt8]) {
            digest.append(to: &out)
            let r = redirect.prefix(31)
            out.append(UInt8(r.count))
            out += r
            out.append(contentsOf: repeatElement(0, count: 31 - r.count))
        }
    }

    init(store: Store) throws {
        storeDirectory = store.directory
        data = try store.directory.openDirectory(FileName("data"))
        try load()
    }

    private func load() throws {
        var records: [Record] = []
        switch IndexFile<Record>.read(Self.indexName, in: storeDirectory, { records.append($0) }) {
        case .missing:
            // Objects without an index (it was deleted): rebuilt from them, never taken as no objects.
            if let objects = try? list(), !objects.isEmpty {
                indexProblem = "the data index is missing"
                try rebuild()
            }
        case .intact:
            for r in records where Self.isValidRedirect(r.redirect) { remember(r.digest, r.redirect) }
        case .damaged(let problem):
            guard let legacy = try? storeDirectory.openFileForReading(Self.indexName).readAll(),
                let text = Self.legacyRecords(legacy)
            else {
                indexProblem = problem
                try rebuild()
                return
            }
            for r in text { remember(r.digest, r.redirect) }
            unwritten = true
        }
    }

    /// The records of an index as versions before this one wrote it: text
    /// lines "DIGEST REDIRECT", appended (nil when the file is not such an index).
    static func legacyRecords(_ bytes: [UInt8]) -> [Record]? {
        var out: [Record] = []
        let lines = bytes.split(separator: 0x0a, omittingEmptySubsequences: false)
        for (i, line) in lines.enumerated() where !line.isEmpty {
            let parts = line.split(separator: 0x20)
            if parts.count == 2, parts[0].count == 64, let d = bytesFromHex(parts[0]), d.count == 32,
                isValidRedirect(Array(parts[1]))
            {
                out.append(Record(digest: ContentDigest(bytes: d), redirect: Array(parts[1])))
            } else if i != lines.count - 1 {
                return nil  // not such an index (only a last line, torn by a kill while appending, may be partial)
            }
        }
        return out
    }

    /// A damaged index is rebuilt from the objects themselves: each is hashed,
    /// and recorded only when its digest begins with its name (an object
    /// whose content changed stays unrecorded: never reused, reported by verify).
    private func rebuild() throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        for o in try list() {
            guard let f = try? open(o.redirect),
                let (digest, _) = try? ContentHasher.contentDigest(of: f, size: o.stat.size, buffer: buffer)
            else { continue }
            let (p, n) = Self.split(o.redirect)
            let hex = Array(digest.hex.utf8)
            if Array(hex[0..<2]) == p.bytes && n.bytes.starts(with: hex[2..<14]) && redirects[digest] == nil {
                remember(digest, o.redirect)
            }
        }
        unwritten = true
    }

    private func remember(_ digest: ContentDigest, _ redirect: [UInt8]) {
        redirects[digest] = redirect
        digests[redirect] = digest
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

    /// The redirect of the object holding `digest`, if there is one whose file
    /// exists (or one this process reserved for the guest it is converting or folding).
    public func redirect(for digest: ContentDigest) -> [UInt8]? {
        if let r = reserved[digest] { return r.redirect }
        guard let r = redirects[digest], isInPlace(r) else { return nil }
        return r
    }

    /// True when the redirect names a recorded object whose file exists.
    public func isLive(_ redirect: [UInt8]) -> Bool {
        digests[redirect] != nil && isInPlace(redirect)
    }

    /// Whether the object's file is a regular file in the data directory
    /// (looked up once per process: `present`).
    private func isInPlace(_ redirect: [UInt8]) -> Bool {
        if present.contains(redirect) { return true }
        guard (try? stat(redirect))?.isRegular == true else { return false }
        present.insert(redirect)
        return true
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

    /// Publishes `source` (its content verified to be `digest`) as the
    /// object of `digest` and returns its redirect; idempotent: when the
    /// store has that content already, its object is returned and nothing is
    /// made. Otherwise the source inode itself is linked in when `linkSource`
    /// (no data copied), else its content is cloned or copied into a new
    /// file; its record reaches the index file at the next `sync`.
    public func publish(_ source: OpenFile, digest: ContentDigest, size: UInt64, linkSource: Bool) throws -> [UInt8] {
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
            if (recorded != nil && recorded != digest) || (recorded == nil && exists) || reservedNames[redirect] != nil
            {
                suffix += 1
                continue
            }
            if exists { return redirect }
            if linkSource {
                let reserved = try reservedDirectory()
                let temp = Self.reservedName(redirect)
                do { try source.link(into: reserved, as: temp) } catch Errno.fileExists {
                    // A killed run's name (sessions remove those first): replaced.
                    try reserved.unlink(temp)
                    try source.link(into: reserved, as: temp)
                }
                let st = try reserved.stat(temp)
                self.reserved[digest] = Reservation(
                    redirect: redirect, digest: digest, inode: st.inode, size: st.size,
                    modificationTime: st.modificationTime, changeTime: st.changeTime)
                reservedNames[redirect] = digest
                return redirect
            } else {
                _ = try placeCopy(of: source, size: size, in: dir, as: FileName(name), checking: nil, flags: .noReplace)
            }
            remember(digest, redirect)
            unwritten = true
            return redirect
        }
    }

    /// Where reserved objects wait for their record: `STORE/reserved`, beside
    /// the data directory (on its filesystem, outside the layer guests mount).
    static let reservedDirectoryName = FileName("reserved")

    /// The name of a reserved object there: "ab-cdef0123456789" for "/ab/cdef0123456789".
    static func reservedName(_ redirect: [UInt8]) -> FileName {
        let (p, n) = split(redirect)
        return FileName(p.bytes + [0x2d] + n.bytes)
    }

    func reservedDirectory() throws -> Directory {
        if let d = reservedHandle { return d }
        do { try storeDirectory.makeDirectory(Self.reservedDirectoryName, mode: 0o700) } catch Errno.fileExists {}
        let d = try storeDirectory.openDirectory(Self.reservedDirectoryName)
        reservedHandle = d
        return d
    }

    /// `STORE/reserved`, opened once (each object a conversion links in goes there first).
    private var reservedHandle: Directory?

    /// Removes what killed runs reserved and no journal will record: every
    /// name in `STORE/reserved` but those `keeping` names (the reservations
    /// of switched conversions and folds whose journal is still to be
    /// finished). Only while this process holds none of its own.
    func removeAbandonedReservations(keeping: Set<[UInt8]>) {
        guard reserved.isEmpty, let dir = try? storeDirectory.openDirectory(Self.reservedDirectoryName),
            let names = try? dir.entryNames()
        else { return }
        let kept = Set(keeping.map { Self.reservedName($0).bytes })
        for n in names where !kept.contains(n.bytes) { try? dir.unlink(n) }
    }

    /// The reservations this process holds (a guest's conversion or fold journals them before its switch).
    var reservations: [Reservation] { Array(reserved.values) }

    /// Records a reserved object (after the switch of the guest whose inode
    /// it is): its temporary name renamed to its name, its record kept for
    /// the index. False, and the temporary name removed, when the inode is
    /// not the one reserved or changed since (then no stub may name it).
    /// Done already (a replay) counts as done.
    func commit(_ r: Reservation) throws -> Bool {
        let (p, n) = Self.split(r.redirect)
        let dir = try prefixDirectory(p)
        let reservedDir = try reservedDirectory()
        let temp = Self.reservedName(r.redirect)
        defer {
            reserved[r.digest] = nil
            reservedNames[r.redirect] = nil
        }
        if let st = try? dir.stat(n) {
            try? reservedDir.unlink(temp)
            guard st.inode == r.inode, digests[r.redirect] == nil || digests[r.redirect] == r.digest else {
                return false
            }
            if digests[r.redirect] == nil {
                remember(r.digest, r.redirect)
                unwritten = true
            }
            return true
        }
        guard let st = try? reservedDir.stat(temp), st.isRegular, st.inode == r.inode, st.size == r.size,
            st.modificationTime == r.modificationTime, st.changeTime == r.changeTime
        else {
            try? reservedDir.unlink(temp)
            return false
        }
        try reservedDir.rename(temp, to: dir, as: n, flags: .noReplace)
        remember(r.digest, r.redirect)
        unwritten = true
        return true
    }

    /// Drops reservations (a conversion or fold that failed before its
    /// switch, or one a killed run journaled): their temporary names go, and
    /// no stub is given them.
    func abandon(_ list: [Reservation]) {
        for r in list {
            try? reservedDirectory().unlink(Self.reservedName(r.redirect))
            if reserved[r.digest] == r {
                reserved[r.digest] = nil
                reservedNames[r.redirect] = nil
            }
        }
    }

    /// Drops every reservation this process holds.
    func abandonReservations() { abandon(reservations) }

    /// Puts back the object behind `redirect` (missing, or damaged) with the
    /// content of `source`, checked to hash to `digest` before it takes the
    /// object's name; its record is kept. False when the copy does not hold `digest`.
    func restore(_ redirect: [UInt8], digest: ContentDigest, from source: OpenFile, size: UInt64) throws -> Bool {
        let (p, n) = Self.split(redirect)
        guard try placeCopy(of: source, size: size, in: try prefixDirectory(p), as: n, checking: digest, flags: [])
        else { return false }
        remember(digest, redirect)
        unwritten = true
        try writeIndexIfNeeded()
        return true
    }

    /// Writes a copy (a clone where the filesystem can) of `source` under a
    /// temporary name beside `name`, checks its size (and, given `digest`,
    /// its content), then renames it to `name` with `flags`. A copy that
    /// fails (the disk full, say) or does not check leaves nothing behind:
    /// false when the content was not `digest`.
    private func placeCopy(
        of source: OpenFile, size: UInt64, in dir: Directory, as name: FileName, checking digest: ContentDigest?,
        flags: RenameFlags
    ) throws -> Bool {
        let temp = FileName(Array(".new-".utf8) + name.bytes)
        try? dir.unlink(temp)
        let f = try dir.createFile(temp, mode: 0o400)
        do {
            try source.cloneContent(to: f, size: size)
            guard try f.stat().size == size else { throw Errno.ioError }
            if let digest {
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
                defer { buffer.deallocate() }
                let (d, read) = try ContentHasher.contentDigest(
                    of: try dir.openFileForReading(temp), size: size, buffer: buffer)
                guard d == digest, read == size else {
                    try? dir.unlink(temp)
                    return false
                }
            }
        } catch {
            try? dir.unlink(temp)
            throw error
        }
        try dir.rename(temp, to: dir, as: name, flags: flags)
        return true
    }

    /// Drops the records of objects whose content no longer matches them
    /// (`verify` found them damaged): their files stay for the stubs that name
    /// them, but no new stub is given one (a rebuilt index leaves them out too).
    func forget(_ damaged: Set<[UInt8]>) throws {
        for r in damaged {
            present.remove(r)
            if let d = digests[r] { redirects[d] = nil }
            digests[r] = nil
        }
        try writeIndex()
    }

    /// Writes the index file whole (atomically), with every record.
    private func writeIndex() throws {
        let all = redirects.map { Record(digest: $0.key, redirect: $0.value) }
        try IndexFile<Record>.write(Self.indexName, in: storeDirectory, count: all.count) { emit in
            for r in all { emit(r) }
        }
        unwritten = false
        indexProblem = nil
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

    /// The redirects of the objects the data directory holds now (names
    /// only, no stat; read once per command and kept).
    func heldRedirects() -> Set<[UInt8]> {
        if let held { return held }
        var out = Set<[UInt8]>()
        for p in (try? data.entryNames()) ?? [] where p.bytes.count == 2 && bytesFromHex(p.bytes) != nil {
            for n in (try? prefixDirectory(p).entryNames()) ?? [] { out.insert([0x2f] + p.bytes + [0x2f] + n.bytes) }
        }
        held = out
        return out
    }
    private var held: Set<[UInt8]>?

    /// What `remove` did: the objects removed, each one that stays with why
    /// (an unlink refused: immutable, say), and a failure to rewrite the index.
    public struct Removal {
        public var removed = Set<[UInt8]>()
        public var refused: [[UInt8]: any Error] = [:]
        public var indexError: (any Error)?

        public init(removed: Set<[UInt8]> = []) { self.removed = removed }
    }

    /// Removes the objects behind `redirects` and rewrites the index without
    /// them. One that cannot be removed stays with its record and is in
    /// `refused`; an index that cannot be rewritten keeps records of removed
    /// objects (a missing object is made again when its content comes back).
    @discardableResult
    public func remove(_ unused: Set<[UInt8]>) -> Removal {
        var out = Removal()
        for r in unused {
            let (p, n) = Self.split(r)
            do { try prefixDirectory(p).unlink(n) } catch Errno.noSuchFileOrDirectory {} catch {
                out.refused[r] = error
                continue
            }
            out.removed.insert(r)
            present.remove(r)
            if let d = digests[r] { redirects[d] = nil }
            digests[r] = nil
        }
        do { try writeIndex() } catch { out.indexError = error }
        return out
    }

    /// Makes the objects and their records durable (before a generation
    /// that uses them is switched to): the objects flushed, then the index
    /// written when it lacks records (or is in an earlier version's format).
    public func sync() throws {
        try data.syncFilesystem()
        try writeIndexIfNeeded()
    }

    /// Writes the index file when it lacks records, is damaged or is in an earlier version's format.
    func writeIndexIfNeeded() throws {
        if unwritten { try writeIndex() }
    }
}
