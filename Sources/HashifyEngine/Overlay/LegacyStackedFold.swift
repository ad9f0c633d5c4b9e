import HashifySystem
import SystemPackage

/// What remains of the stacked folds of earlier versions (directory layers,
/// stubs put in place after the switch): a store of such a version whose
/// fold was killed after its switch has it finished by the next command,
/// before the guest's generation is read or becomes an image.
extension Overlay {
    /// A path below a layer's root split at its last slash: its directory's path and its name.
    static func splitLast(_ path: [UInt8]) -> (directory: [UInt8], name: FileName) {
        let slash = path.lastIndex(of: 0x2f)
        return (slash.map { Array(path[..<$0]) } ?? [], FileName(bytes: path[(slash.map { $0 + 1 } ?? 0)...]))
    }

    static let stagingName = FileName("staging")
    static let foldJournalName = FileName("fold-journal")

    /// The renames that put a stacked fold's stubs in place (staging name,
    /// directory, name, the inode the name must still be) and the mtimes of
    /// the directories they touch.
    struct StubPlacement {
        var renames: [(temp: FileName, directory: Directory, name: FileName, inode: UInt64)] = []
        var times: [(Directory, Timestamp)] = []
        /// Files whose content an object held already: each becomes that object's stub where it
        /// lies (its redirect and metacopy set, its blocks freed, then its capability and mtime,
        /// which freeing blocks takes, put back).
        var inPlace:
            [(
                directory: Directory, name: FileName, inode: UInt64, size: UInt64, mode: UInt32, mtime: Timestamp,
                redirect: [UInt8], capability: [UInt8]?
            )] = []
    }

    /// Puts a stacked fold's stubs in place in generation `gen`'s top layer
    /// (after the switch), puts back the mtimes of the directories the
    /// renames touched, records the layer's references, and removes the
    /// journal and the staging directory. Without `placement` (the fold was
    /// killed after its switch) the journal says what to do; a stub already
    /// moved is not in staging any more.
    @discardableResult
    static func finishStackedFold(
        _ gen: OverlayGuest.Generation, placement: StubPlacement? = nil, objects: () -> DataObjects?
    ) throws -> [[UInt8]] {
        let journal: [UInt8]
        do { journal = try gen.directory.openFileForReading(foldJournalName).readAll() } catch Errno
            .noSuchFileOrDirectory
        {
            return []
        }
        guard let layer = gen.layers[0].directory else {
            throw InputError("\(gen.directory): fold journal beside an image")
        }
        let staging = try? gen.directory.openDirectory(stagingName)
        let work = try placement ?? journalPlacement(gen, layer: layer, journal: journal)
        guard let reservations = DataObjects.Reservation.fromJournal(journal) else {
            throw InputError("\(gen.directory): fold journal damaged")
        }
        // First the objects made of the layer's own files are recorded (a
        // lower layer now: no guest writes them); a stub of one that cannot
        // be is not put in place, its file stays whole.
        let data = reservations.isEmpty && work.inPlace.isEmpty ? nil : objects()
        if data == nil && !(reservations.isEmpty && work.inPlace.isEmpty) {
            throw InputError("\(gen.directory): the store's data objects cannot be read")
        }
        var failed = Set<[UInt8]>()
        for r in reservations where try data?.commit(r) != true { failed.insert(r.redirect) }
        try data?.sync()
        if let staging {
            for r in work.renames {
                guard let stub = try? staging.openFileForReading(r.temp) else { continue }
                if let redirect = stub.extendedAttribute("trusted.overlay.redirect"), failed.contains(redirect) {
                    continue
                }
                // The file the stub stands for, as it was (a lower layer now: nothing writes it).
                guard let st = try? r.directory.stat(r.name), st.inode == r.inode else { continue }
                try? staging.rename(r.temp, to: r.directory, as: r.name)
            }
        }
        var keptWhole: [[UInt8]] = []
        for p in work.inPlace where !failed.contains(p.redirect) {
            // Never the object itself (its inode is checked against the file's).
            guard let st = try? p.directory.stat(p.name), st.inode == p.inode, st.isRegular, st.size == p.size,
                let object = try? data?.stat(p.redirect), object.inode != p.inode || object.device != st.device
            else { continue }
            if !makeStubInPlace(p) { keptWhole.append(p.name.bytes) }
        }
        for (dir, t) in work.times { try? dir.setModificationTime(t) }
        try LayerReferences.record(gen.layers[0])
        try gen.directory.sync()
        try gen.directory.unlink(foldJournalName)
        try gen.directory.removeTree(stagingName)
        return keptWhole
    }

    /// Makes a file of a lower layer the stub of the object holding its
    /// content where it lies: redirect and metacopy set, its blocks freed,
    /// its mode, capability and mtime put back. A step that fails before the
    /// blocks go undoes the others (the file stays whole: false); nothing fails after.
    static func makeStubInPlace(
        _ p: (
            directory: Directory, name: FileName, inode: UInt64, size: UInt64, mode: UInt32, mtime: Timestamp,
            redirect: [UInt8], capability: [UInt8]?
        )
    ) -> Bool {
        guard let f = try? p.directory.openFileForWriting(p.name) else { return false }
        let redirectName = Array("trusted.overlay.redirect".utf8)
        if f.extendedAttribute("trusted.overlay.metacopy") == nil {
            do {
                try f.setExtendedAttribute(ExtendedAttribute(name: redirectName, value: p.redirect))
                try f.setExtendedAttribute(ExtendedAttribute(name: TreeCopier.metacopyName, value: []))
            } catch {
                try? f.removeExtendedAttribute(redirectName)
                try? f.removeExtendedAttribute(TreeCopier.metacopyName)
                try? f.setModificationTime(p.mtime)
                return false
            }
        }
        do { try f.punchHole(p.size) } catch {}  // then the stub keeps its blocks: the same view
        if let cap = p.capability {
            try? f.setExtendedAttribute(ExtendedAttribute(name: Array("security.capability".utf8), value: cap))
        }
        try? f.setMode(p.mode)
        try? f.setModificationTime(p.mtime)
        return true
    }

    /// The placement a fold journal records, its directories opened from the layer (each once).
    static func journalPlacement(_ gen: OverlayGuest.Generation, layer: Directory, journal: [UInt8]) throws
        -> StubPlacement
    {
        var opened: [[UInt8]: Directory] = [[]: layer]
        func directory(_ path: [UInt8]) throws -> Directory {
            if let d = opened[path] { return d }
            let (parentPath, name) = splitLast(path)
            let d = try directory(parentPath).openDirectory(name)
            opened[path] = d
            return d
        }
        func split(_ hex: Substring) throws -> ([UInt8], FileName) {
            guard let path = bytesFromHex(hex.utf8), !path.isEmpty else { throw InputError("fold journal damaged") }
            return splitLast(path)
        }
        var out = StubPlacement()
        for line in journal.split(separator: 0x0a) {
            let fields = String(decoding: line, as: UTF8.self).split(
                separator: " ", maxSplits: 3, omittingEmptySubsequences: false)
            guard fields.count == 4 else { throw InputError("fold journal damaged") }
            if fields[0] == "R", let inode = UInt64(fields[2]) {
                let (parent, name) = try split(fields[3])
                guard let dir = try? directory(parent) else { continue }
                out.renames.append((FileName(String(fields[1])), dir, name, inode))
            } else if fields[0] == "P" {
                let f = String(decoding: line, as: UTF8.self).split(
                    separator: " ", maxSplits: 6, omittingEmptySubsequences: false)
                guard f.count == 7, let inode = UInt64(f[1]), let sec = Int64(f[2]), let ns = UInt32(f[3]),
                    let redirect = bytesFromHex(f[4].utf8)
                else { throw InputError("fold journal damaged") }
                let cap = f[5] == "-" ? nil : bytesFromHex(f[5].utf8)
                let (parent, name) = try split(f[6])
                guard let dir = try? directory(parent), let st = try? dir.stat(name) else { continue }
                out.inPlace.append(
                    (dir, name, inode, st.size, st.mode, Timestamp(seconds: sec, nanoseconds: ns), redirect, cap))
            } else if fields[0] == "T", let sec = Int64(fields[1]), let ns = UInt32(fields[2]) {
                guard let path = bytesFromHex(fields[3].utf8), let dir = try? directory(path) else { continue }
                out.times.append((dir, Timestamp(seconds: sec, nanoseconds: ns)))
            }
        }
        return out
    }
}
