import HashifySystem
import SystemPackage

/// The content-addressed store beside the guests.
///
/// ```
/// STORE/lock                 flock(2): one changing run at a time
/// STORE/objects/ab/DIGEST-KEY[.N]   hardlink mode: a file with its full identity
/// STORE/data/ab/…            overlay mode: content-only objects (see DataObjects)
/// STORE/data-index           their digests (IndexFile)
/// STORE/index                digests of hashed inodes (ContentIndex, IndexFile)
/// STORE/runs/RUNID           the journal of a run changing guests (RunJournal)
/// STORE/overlay/ID/          an overlay guest's generations (OverlayGuest)
/// STORE/guests, open-for-writing   hints for later runs
/// ```
/// Objects of both kinds are published by digest (`publish` here and in
/// `DataObjects`, both idempotent), recorded in index files of one format
/// (`IndexFile`), and collected and verified together (`StoreObjects`).
/// Every file hashify replaces in the store is replaced by
/// `Directory.writeAtomically`, with one durability. A hardlink object is an
/// ordinary hard link to a guest inode: its mode, owner, times and xattrs are
/// the guest file's own.
public final class Store: @unchecked Sendable {
    public let path: FilePath
    public let directory: Directory
    public let objects: Directory
    let runs: Directory
    private var lockFile: OpenFile?
    private var prefixDirectories: [UInt8: Directory] = [:]
    private var data: DataObjects?
    /// How many prefix directories stay open (all 256 when the descriptor limit allows).
    private let prefixCapacity = DescriptorBudget.storeDirectories

    /// Thrown when --no-wait finds the store locked.
    public struct Busy: Error {}

    init(path: FilePath, directory: Directory) throws {
        self.path = path
        self.directory = directory
        for sub in ["objects", "data", "runs"] {
            do { try directory.makeDirectory(FileName(sub), mode: 0o700) } catch Errno.fileExists {}
        }
        objects = try directory.openDirectory(FileName("objects"))
        runs = try directory.openDirectory(FileName("runs"))
    }

    /// Whether `dir` holds a store (made by any version: `objects/` is its mark).
    static func isStore(_ dir: Directory) -> Bool {
        (try? dir.stat(FileName("objects")))?.isDirectory == true
    }

    /// Opens the store at `path`; creates it (mode 0700) when `create`.
    /// Returns nil when there is none and `create` is false: a directory that
    /// holds no store is then left exactly as it is.
    public static func open(at path: FilePath, create: Bool) throws -> Store? {
        do {
            let dir = try Directory.open(path: path)
            if !create && !isStore(dir) { return nil }
            return try Store(path: path, directory: dir)
        } catch Errno.noSuchFileOrDirectory where create {
            let parent = try Directory.open(
                path: path.removingLastComponent().isEmpty ? "." : path.removingLastComponent())
            let name = FileName(bytes: path.lastComponent.map { Array($0.string.utf8) } ?? [])
            do { try parent.makeDirectory(name, mode: 0o700) } catch Errno.fileExists {}
            return try Store(path: path, directory: try parent.openDirectory(name))
        } catch Errno.noSuchFileOrDirectory {
            return nil
        } catch Errno.notDirectory {
            throw InputError("\(path): not a directory")
        }
    }

    /// Takes the store lock; waits for another run unless `wait` is false.
    public func lock(wait: Bool) throws {
        let f = try directory.openOrCreateFile(FileName("lock"), mode: 0o600)
        do {
            try lockExclusively(f, wait: wait)
        } catch Errno.wouldBlock {
            throw Busy()
        }
        lockFile = f
        try upgradeIndexes()
    }

    /// Rewrites index files an earlier version wrote (or damaged ones) in today's format, under
    /// the lock and atomically (a kill leaves the old file, read as before,
    /// or the new one).
    private func upgradeIndexes() throws {
        // The data index is read whole by any command that uses it: one of an
        // earlier version, or damaged (then rebuilt from the objects), is written anew.
        if (try? directory.stat(DataObjects.indexName)) != nil { try dataObjects().writeIndexIfNeeded() }
        // The inode index of version 1 is rewritten; a damaged one is left for unify to report and rebuild.
        guard let f = try? directory.openFileForReading(ContentIndex.name) else { return }
        var head = [UInt8](repeating: 0, count: 16)
        let n = (try? head.withUnsafeMutableBytes { try f.read(into: $0, at: 0) }) ?? 0
        if n == 16 && head == ContentIndex.Record.legacyMagic,
            case .intact = IndexFile<ContentIndex.Record>.read(ContentIndex.name, in: directory, { _ in })
        {
            try ContentIndex.remove([], in: self)
        }
    }

    // MARK: objects

    /// A store object: a name in objects/ and the inode behind it.
    public struct Object: Sendable {
        public var name: FileName
        public var digest: ContentDigest
        public var metadataKey: String
        public var stat: FileStat
    }

    /// The directory objects/XX for the first byte of a digest.
    public func prefixDirectory(_ firstByte: UInt8) throws -> Directory {
        if let d = prefixDirectories[firstByte] { return d }
        let name = FileName(hexString([firstByte]))
        do { try objects.makeDirectory(name, mode: 0o700) } catch Errno.fileExists {}
        let d = try objects.openDirectory(name)
        if prefixDirectories.count >= prefixCapacity { prefixDirectories.removeAll(keepingCapacity: true) }
        prefixDirectories[firstByte] = d
        return d
    }

    /// The object name for a digest and identity key, with an overflow suffix.
    public static func objectName(digest: ContentDigest, key: String, generation: Int) -> FileName {
        FileName(digest.hex + "-" + key + (generation > 0 ? ".\(generation)" : ""))
    }

    /// Parses "DIGEST-KEY[.N]".
    static func parseObjectName(_ n: FileName) -> (ContentDigest, String, Int)? {
        let b = n.bytes
        guard b.count >= 64 + 1 + 32, b[64] == 0x2d, let d = bytesFromHex(b[0..<64]), d.count == 32 else { return nil }
        let key = String(decoding: b[65..<97], as: UTF8.self)
        var generation = 0
        if b.count > 97 {
            guard b[97] == 0x2e, let g = Int(String(decoding: b[98...], as: UTF8.self)) else { return nil }
            generation = g
        }
        return (ContentDigest(bytes: d), key, generation)
    }

    /// Publishes `file` (open under lease, its content verified to be
    /// `digest`, its identity `identityKey`) as a hardlink object: the inode
    /// itself is linked in under the first generation from `fromGeneration`
    /// on that is free, and that generation returned. Idempotent: when the
    /// inode already is the object under one of those names, that one is
    /// returned and nothing is made. An object under a name that no guest
    /// links any more is replaced, not skipped: objects of one identity do not
    /// pile up as generations. (A full object, at the filesystem's link
    /// limit, makes the next victim the next generation: see HardlinkLinker.)
    /// Unused objects `publish` replaced in this process (they count as removed), and their bytes.
    public private(set) var replacedObjects = 0
    public private(set) var replacedBytes: UInt64 = 0

    public func publish(
        _ file: OpenFile, digest: ContentDigest, identityKey: String, fromGeneration: Int
    ) throws -> Int {
        let dir = try prefixDirectory(digest.firstByte)
        let inode = try file.stat().inode
        var generation = fromGeneration
        while true {
            let name = Self.objectName(digest: digest, key: identityKey, generation: generation)
            do {
                try file.link(into: dir, as: name)
                return generation
            } catch Errno.fileExists {
                guard let st = try? dir.stat(name) else { throw Errno.fileExists }
                if st.inode == inode { return generation }
                if st.linkCount == 1 {
                    // An object no guest links any more (a reinstall in every guest replaced its
                    // files): the new one takes its name rather than a second generation. Linked
                    // under the next free name first, then moved over it, so a kill between the
                    // two leaves an ordinary object.
                    let free = try publish(
                        file, digest: digest, identityKey: identityKey, fromGeneration: generation + 1)
                    guard (try? dir.stat(name))?.linkCount == 1 else { return free }
                    try dir.rename(
                        Self.objectName(digest: digest, key: identityKey, generation: free), to: dir, as: name)
                    replacedObjects += 1
                    replacedBytes += st.allocatedBytes
                    return generation
                }
                generation += 1
            }
        }
    }

    /// Calls `body` with the name, parsed name and stat of every object
    /// (stat'ed, not read).
    private func forEachObject(
        _ body: (FileName, (digest: ContentDigest, key: String, generation: Int), FileStat) -> Void
    ) throws {
        for prefix in try objects.entryNames() {
            guard prefix.bytes.count == 2, let p = bytesFromHex(prefix.bytes), p.count == 1 else { continue }
            let dir = try prefixDirectory(p[0])
            for n in try dir.entryNames() {
                guard let parsed = Self.parseObjectName(n), let st = try? dir.stat(n), st.isRegular else { continue }
                body(n, parsed, st)
            }
        }
    }

    /// Every object in the store.
    public func listObjects() throws -> [Object] {
        var result: [Object] = []
        try forEachObject { name, parsed, st in
            result.append(Object(name: name, digest: parsed.digest, metadataKey: parsed.key, stat: st))
        }
        return result
    }

    /// The inode of every object with its generation (what unify needs of
    /// the store: no names or digests kept in memory).
    public func objectGenerations() throws -> [UInt64: Int] {
        var result: [UInt64: Int] = [:]
        try forEachObject { _, parsed, st in result[st.inode] = parsed.generation }
        return result
    }

    /// The data objects (overlay mode's content-only objects), opened once per store.
    public func dataObjects() throws -> DataObjects {
        if let data { return data }
        let d = try DataObjects(store: self)
        data = d
        return d
    }

    // MARK: guests

    /// Remembers guest roots (STORE/guests, NUL-separated) so that status,
    /// gc and split know them without being told; roots that are gone are dropped.
    public func rememberGuests(_ roots: [FilePath]) {
        var all = rememberedGuests()
        for r in roots.map({ RootValidation.canonical($0) ?? $0 }) where !all.contains(r) { all.append(r) }
        all = all.filter { (try? Directory.open(path: $0)) != nil }
        var data: [UInt8] = []
        for r in all { data += Array(r.string.utf8) + [0] }
        replaceFile("guests", with: data)
        StoreRegistry.register(path)
    }

    /// Forgets guests (split whole, they share nothing with the store any more).
    public func forgetGuests(_ roots: [FilePath]) {
        let gone = Set(roots.map { RootValidation.canonical($0) ?? $0 })
        var data: [UInt8] = []
        for r in rememberedGuests() where !gone.contains(r) { data += Array(r.string.utf8) + [0] }
        replaceFile("guests", with: data)
    }

    /// Replaces the store file `name` with `data` in one step (best effort: these files are hints).
    private func replaceFile(_ name: String, with data: [UInt8]) {
        try? directory.writeAtomically(data, as: FileName(name))
    }

    /// Guest roots earlier runs were given (canonical paths). What is not an
    /// absolute path of printable characters is not a root hashify wrote
    /// there, and is left out (the next unify writes the file anew).
    public func rememberedGuests() -> [FilePath] { (try? readGuests()) ?? [] }

    /// The guests the store remembers, or why its list cannot be read whole
    /// (not a regular file, larger than 1 MiB, an entry that is no absolute path).
    func readGuests() throws -> [FilePath] { try Self.readGuests(in: directory, at: path) }

    /// The list of guests of the store open as `directory` at `path`; a list
    /// removed while it is read counts as none.
    private static func readGuests(in directory: Directory, at path: FilePath) throws -> [FilePath] {
        guard let st = try? directory.stat(FileName("guests")) else { return [] }
        let damaged = { (why: String) in
            InputError(
                "\(path.appending("guests")): the store's list of guests cannot be read (\(why)); which guests belong to this store cannot be told: repair it"
            )
        }
        guard st.isRegular else { throw damaged("not a regular file") }
        let data: [UInt8]
        do {
            guard let read = try directory.openFileForReading(FileName("guests")).readAll(limit: 1 << 20) else {
                throw damaged("larger than 1 MiB")
            }
            data = read
        } catch Errno.noSuchFileOrDirectory {
            return []
        } catch let error as InputError {
            throw error
        } catch {
            throw damaged("unreadable: \(error)")
        }
        return try data.split(separator: 0).map { entry in
            guard entry.first == 0x2f, !entry.contains(where: { $0 < 0x20 || $0 == 0x7f }),
                let text = String(validating: entry, as: UTF8.self)
            else { throw damaged("an entry that is not an absolute path") }
            return FilePath(text)
        }
    }

    /// Whether the store has a record of one of `canonicalRoots`: unify ran on
    /// it with this store, or it is one of the store's overlay guests. Throws
    /// when its list of guests cannot be read.
    func knowsAny(of canonicalRoots: [FilePath]) throws -> Bool {
        try Self.knowsAny(in: directory, at: path, of: canonicalRoots)
    }

    /// Whether the store at `path` has a record of one of `canonicalRoots`,
    /// read without opening it as a store (nothing is made in it); nil when
    /// there is no store there, or it was removed while it was read.
    static func knowsAny(at path: FilePath, of canonicalRoots: [FilePath]) throws -> Bool? {
        do {
            let dir = try Directory.open(path: path)
            guard isStore(dir) else { return nil }
            return try knowsAny(in: dir, at: path, of: canonicalRoots)
        } catch Errno.noSuchFileOrDirectory {
            return nil
        } catch Errno.notDirectory {
            return nil
        }
    }

    private static func knowsAny(in directory: Directory, at path: FilePath, of canonicalRoots: [FilePath]) throws
        -> Bool
    {
        let remembered = Set(try readGuests(in: directory, at: path))
        let overlay = try? directory.openDirectory(FileName("overlay"))
        return canonicalRoots.contains { r in
            remembered.contains(r) || (try? overlay?.stat(FileName(OverlayGuest.id(for: r)))) != nil
        }
    }

    // MARK: files held open for writing

    /// A path some process had open for writing in `runs` runs in a row.
    public struct HeldOpen: Sendable, Equatable {
        public var root: String
        public var path: String
        public var runs: Int
    }

    /// Records the paths this run found open for writing in `roots`
    /// (STORE/open-for-writing): each one's count of runs in a row goes up,
    /// those of `roots` not found again are dropped, other guests' are kept.
    public func recordOpenForWriting(_ found: [(root: String, path: String)], roots: [String]) {
        let scanned = Set(roots)
        func key(_ root: String, _ path: String) -> String { root + "\0" + path }
        var previous: [String: Int] = [:]
        var kept: [HeldOpen] = []
        for h in heldOpen() {
            if scanned.contains(h.root) { previous[key(h.root, h.path)] = h.runs } else { kept.append(h) }
        }
        var seen = Set<String>()
        for f in found where seen.insert(key(f.root, f.path)).inserted {
            kept.append(HeldOpen(root: f.root, path: f.path, runs: (previous[key(f.root, f.path)] ?? 0) + 1))
        }
        var data: [UInt8] = []
        for h in kept { data += Array("\(h.runs)".utf8) + [0] + Array(h.root.utf8) + [0] + Array(h.path.utf8) + [0] }
        replaceFile("open-for-writing", with: data)
    }

    /// The paths earlier runs found open for writing, with how many runs in a row.
    public func heldOpen() -> [HeldOpen] {
        guard let data = try? directory.openFileForReading(FileName("open-for-writing")).readAll() else { return [] }
        let fields = data.split(separator: 0, omittingEmptySubsequences: false).map {
            String(decoding: $0, as: UTF8.self)
        }
        return stride(from: 0, to: fields.count - 2, by: 3).compactMap { i in
            Int(fields[i]).map { HeldOpen(root: fields[i + 1], path: fields[i + 2], runs: $0) }
        }
    }

    // MARK: runs

    /// Records that a run with this id is changing guests (fsync'ed), so that
    /// a later run knows its temporary names if it is killed.
    public func beginRun(_ id: String) throws {
        let f = try runs.createFile(FileName(id), mode: 0o600)
        try f.sync()
        try? runs.sync()
    }

    /// Removes the record of a run whose temporary names are all gone.
    public func endRun(_ id: String) {
        try? runs.unlink(FileName(id))
    }

    /// Ids of runs that started and did not finish.
    public func unfinishedRuns() -> [String] {
        ((try? runs.entryNames()) ?? []).map { String(decoding: $0.bytes, as: UTF8.self) }
    }
}

/// A random run id (16 hex digits) from the kernel's random source.
func makeRunID() -> String {
    hexString(randomBytes(8))
}
