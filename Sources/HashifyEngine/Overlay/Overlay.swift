import HashifySystem
import SystemPackage

/// Options of the `overlay` commands.
public struct OverlayOptions: Sendable {
    public var roots: [FilePath]
    public var store: FilePath?
    public var waitForLock = true
    /// `convert`: mount the guest when converted.
    public var mount = true
    /// `export`: where the plain copy goes (nil: back in place of the guest).
    public var destination: FilePath?
    /// `fold`: make a guest of an earlier version (directory layers) an image even with nothing to fold.
    public var compact = false
    public init(roots: [FilePath]) { self.roots = roots }
}

/// What an `overlay` command (or the fold step of `unify`) did, per guest.
public struct OverlayReport: Sendable, Codable {
    /// What an overlay command did to one guest (in `--json`: its text).
    public enum Action: Sendable, Equatable, Codable, CustomStringConvertible {
        case converted, convertedAndMounted, mounted, alreadyMounted, unmounted, notMounted
        case folded, wouldFold, nothingToFold, foldAtNextStart, built
        /// Unmounted here, but an overlay of its generation is alive elsewhere (a lazy unmount, another namespace).
        case inUseElsewhere
        case exportedInPlace
        case exportedTo(String)
        case notAnOverlayGuest
        /// An error stopped the work on this guest; its notes say which.
        case leftAsItWas

        static let texts: [(Action, String)] = [
            (.converted, "converted"), (.convertedAndMounted, "converted and mounted"), (.mounted, "mounted"),
            (.alreadyMounted, "already mounted"), (.unmounted, "unmounted"), (.notMounted, "not mounted"),
            (.folded, "folded"), (.wouldFold, "would fold"), (.nothingToFold, "nothing to fold"),
            (.foldAtNextStart, "mounted: fold at next start"), (.built, "built"),
            (.inUseElsewhere, "in use elsewhere: fold later"),
            (.exportedInPlace, "exported in place"),
            (.notAnOverlayGuest, "not an overlay guest"), (.leftAsItWas, "left as it was"),
        ]

        public var description: String {
            if case .exportedTo(let dest) = self { return "exported to \(dest)" }
            return Self.texts.first { $0.0 == self }!.1
        }

        public init(from decoder: any Decoder) throws {
            let text = try decoder.singleValueContainer().decode(String.self)
            if let a = Self.texts.first(where: { $0.1 == text })?.0 {
                self = a
            } else if text.hasPrefix("exported to ") {
                self = .exportedTo(String(text.dropFirst("exported to ".count)))
            } else {
                throw DecodingError.dataCorrupted(
                    .init(codingPath: decoder.codingPath, debugDescription: "action \(text)"))
            }
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.singleValueContainer()
            try c.encode(description)
        }
    }

    /// One guest's outcome.
    public struct Guest: Sendable, Codable {
        public var root: String
        /// converted, mounted, unmounted, folded, exported, or what was left alone and why.
        public var action: Action
        public var stubs = 0
        /// Files kept whole in the metadata image (empty, or too small to be worth an object).
        public var inlineFiles = 0
        public var objectsCreated = 0
        /// Regular files whose content an existing object already held.
        public var filesSharingObjects = 0
        /// Object bytes that are the guest's own inodes, linked (no data copied).
        public var bytesLinked: UInt64 = 0
        /// Object bytes copied (or cloned) because the inode was shared outside the guest.
        public var bytesCopied: UInt64 = 0
        /// Files a fold took from the old layer without reading them.
        public var filesUnchanged = 0
        /// Files a fold read because the upper layer held them.
        public var filesHashed = 0
        /// Entries a fold carried into the new upper layer because the guest set them immutable or append-only.
        public var protectedEntries = 0
        /// The metadata layers the guest's generation stacks after this command (1: a fold writes one image).
        public var layers: Int?
        /// Data objects a fold removed because its guest no longer references them and no other guest does.
        public var objectsRemoved = 0
        public var objectsRemovedBytes: UInt64 = 0
        /// Files of the guest's generation in force whose data object is missing from the store (notes name them).
        public var filesWithoutData = 0
        public var seconds = 0.0
        public var notes: [String] = []
        /// The guest's name, when it has one.
        public var guest: String?
    }
    public var schema = 1
    public var command: String
    public var store: String
    public var guests: [Guest] = [] {
        didSet {
            // A guest whose files lost their data object still mounts (exit 0: the hook starts it, and
            // logs the note); every other command says so in its status too.
            exitStatus =
                guests.contains {
                    $0.action == .leftAsItWas || ($0.filesWithoutData > 0 && command != "overlay mount")
                } ? 1 : 0
        }
    }
    public var seconds = 0.0
    /// 0, or 1 when a guest was left alone because of an error, or files of a guest lost their data object.
    public var exitStatus: Int32 = 0
}

/// Overlay mode: each guest an overlayfs mount whose lower layers are a
/// per-guest metadata image of stubs over the store's shared data objects, so
/// that any write, chmod or chown copies up into that guest's upper layer
/// alone (copy-on-write), while reads of equal files share one inode and one
/// page-cache copy. DESIGN.md ("Overlay") has the measured facts.
///
/// Every change is a sequence of steps recorded in the guest's state
/// (`OverlayGuest.Phase`); `recover` brings a guest a killed run left between
/// two steps to the nearest safe state before anything else is done.
public enum Overlay {
    /// Files up to this size stay whole in the metadata image (as composefs does).
    static let inlineLimit: UInt64 = 64

    /// The guests, checked, and the store, locked.
    struct Session {
        var store: Store
        var objects: DataObjects
        var dataPath: FilePath
        var guests: [(root: FilePath, canonical: FilePath, record: OverlayGuest?)]
    }

    static func session(_ options: OverlayOptions, createRecords: Bool) throws -> Session {
        _ = prepareProcessForUnification()
        if options.roots.isEmpty { throw InputError("give at least one guest root") }
        var guests: [(FilePath, FilePath, OverlayGuest?)] = try RootValidation.checkedRoots(options.roots).map {
            ($0.given, $0.canonical, nil)
        }
        let storePath = options.store ?? RootValidation.defaultStorePath(for: options.roots)
        try GuestStore.check(options.roots, store: storePath)
        for (r, c, _) in guests {
            if let cs = RootValidation.canonical(storePath), cs == c || RootValidation.isInside(cs, c) {
                throw InputError("\(storePath): the store must not be inside the guest root \(r)")
            }
        }
        guard let store = try Store.open(at: storePath, create: createRecords) else {
            throw InputError("\(storePath): no hashify store here (give --store)")
        }
        try store.lock(wait: options.waitForLock)
        guard let dataPath = RootValidation.canonical(store.path)?.appending("data") else {
            throw InputError("\(storePath): cannot resolve path")
        }
        for i in guests.indices {
            guests[i].2 = try OverlayGuest.open(store: store, canonicalRoot: guests[i].1, create: false)
        }
        removeAbandonedReservations(store: store, objects: try store.dataObjects())
        return Session(
            store: store, objects: try store.dataObjects(), dataPath: dataPath,
            guests: guests.map { (root: $0.1, canonical: $0.1, record: $0.2) })
    }

    // MARK: recovery

    /// Finishes or undoes what a killed run left, so that the guest is either
    /// plain or has exactly one generation in force. Returns the state after.
    @discardableResult
    static func recover(_ guest: OverlayGuest) throws -> OverlayGuest.State? {
        guard var state = try guest.readState() else { return nil }
        // Only a fold makes a generation past the one in force (its next); a
        // newer one means the state is not the record's (restored from an
        // older backup, say): nothing is removed on its word.
        let allowed = state.phase == .plain ? Int.max : state.generation + (state.phase == .folding ? 1 : 0)
        if let newer = guest.generationNumbers().first(where: { $0 > allowed }) {
            throw guest.damaged(
                "state names generation \(state.generation) (\(state.phase.rawValue)), but the record holds generation \(newer)"
            )
        }
        try guest.unmountPrivate()
        let root = try? Directory.open(path: guest.rootPath)
        let rootInode = (try? root?.stat())??.inode
        switch state.phase {
        case .active:
            break
        case .plain:
            try guest.writeState(nil)
            return nil
        case .converting:
            abandonJournaledObjects(guest, generation: state.generation, journal: objectsJournalName)
            try guest.writeState(nil)
            return nil
        case .switching:
            if rootInode == state.rootInode {
                // The exchange did not happen: the guest is still its plain tree.
                abandonJournaledObjects(guest, generation: state.generation, journal: objectsJournalName)
                try guest.writeState(nil)
                return nil
            }
            state.phase = .active
            try guest.writeState(state)
        case .folding:
            // The next generation's objects made of the guest's files were never recorded: they go.
            abandonJournaledObjects(guest, generation: state.generation + 1, journal: foldJournalName)
            abandonJournaledObjects(guest, generation: state.generation + 1, journal: foldObjectsJournalName)
            state.phase = .active
            try guest.writeState(state)
        case .exporting:
            state.phase = .active
            try guest.writeState(state)
        case .restoring:
            if rootInode != state.rootInode {
                // The plain copy is in place: the guest is plain again.
                try guest.writeState(nil)
                return nil
            }
            state.phase = .active
            try guest.writeState(state)
        }
        try finishSwitched(guest, state)
        return state
    }

    /// For a guest whose generation in force is switched to: records the
    /// objects of a conversion killed after its switch (while its old tree is
    /// still there), removes every other generation, and finishes an earlier
    /// version's stacked fold killed after its switch.
    static func finishSwitched(_ guest: OverlayGuest, _ state: OverlayGuest.State) throws {
        if state.phase == .active, let gen = try? guest.generation(state.generation),
            (try? gen.directory.stat(objectsJournalName)) != nil
        {
            let (scratch, plain) = try guest.scratchPlace("plain")
            try commitConvertedObjects(
                gen, plain: try scratch.openDirectory(plain), objects: try guest.store.dataObjects())
        }
        // A fold killed after its switch: the old upper layer's files it made objects of, recorded now.
        if state.phase == .active, let gen = try? guest.generation(state.generation),
            (try? gen.directory.stat(foldObjectsJournalName)) != nil
        {
            let old = try guest.directory.openDirectory(OverlayGuest.generationName(state.generation - 1))
            try commitConvertedObjects(
                gen, plain: try old.openDirectory(FileName("upper")), objects: try guest.store.dataObjects(),
                journal: foldObjectsJournalName)
        }
        try guest.removeGenerations(except: state.generation)
        if state.phase == .active {
            try finishStackedFold(try guest.generation(state.generation)) { try? guest.store.dataObjects() }
        }
    }

    /// Removes the objects killed runs reserved and no journal will record
    /// (the store's lock is held; this process reserved nothing yet). A
    /// reservation a switched conversion or fold still has to record (its
    /// journal is in a guest's record) stays; with a record that cannot be
    /// read, everything stays.
    static func removeAbandonedReservations(store: Store, objects: DataObjects) {
        guard (try? store.directory.stat(DataObjects.reservedDirectoryName)) != nil else { return }
        let (guests, unreadable) = OverlayGuest.records(in: store)
        guard unreadable.isEmpty else { return }
        var keep = Set<[UInt8]>()
        for g in guests {
            for n in g.generationNumbers() {
                guard let gen = try? g.directory.openDirectory(OverlayGuest.generationName(n)) else { return }
                for journal in [objectsJournalName, foldJournalName, foldObjectsJournalName] {
                    let bytes: [UInt8]
                    do { bytes = try gen.openFileForReading(journal).readAll() } catch Errno.noSuchFileOrDirectory {
                        continue
                    } catch { return }
                    guard let list = DataObjects.Reservation.fromJournal(bytes) else { return }
                    keep.formUnion(list.map(\.redirect))
                }
            }
        }
        objects.removeAbandonedReservations(keeping: keep)
    }

    /// Removes the temporary names of the objects a killed conversion or
    /// fold of generation `generation` journaled and never recorded.
    static func abandonJournaledObjects(_ guest: OverlayGuest, generation: Int, journal: FileName) {
        guard let gen = try? guest.directory.openDirectory(OverlayGuest.generationName(generation)),
            let bytes = try? gen.openFileForReading(journal).readAll(),
            let list = DataObjects.Reservation.fromJournal(bytes), !list.isEmpty,
            let objects = try? guest.store.dataObjects()
        else { return }
        objects.abandon(list)
    }

    // MARK: checks

    /// Refuses (nothing changed) a guest that processes use.
    static func checkNotInUse(_ root: FilePath, canonical: FilePath, mountedOverlay: Bool) throws {
        guard let st = try? Directory.open(path: canonical).stat() else { return }
        let users = ProcessScanner.processesUsing(root: canonical, stat: st, ownDevice: mountedOverlay)
        if !users.isEmpty {
            let list = users.prefix(5).map { "\($0.pid) (\($0.command))" }.joined(separator: ", ")
            throw InputError(
                "\(root): in use by \(users.count) process\(users.count == 1 ? "" : "es"): \(list)\(users.count > 5 ? ", …" : ""); stop the guest first"
            )
        }
    }

    /// The parent directory of a canonical root and the root's name in it.
    static func parentAndName(_ canonical: FilePath) throws -> (Directory, FileName) {
        guard let last = canonical.lastComponent else { throw InputError("\(canonical): not a guest root") }
        return (try Directory.open(path: canonical.removingLastComponent()), FileName(last.string))
    }

    // MARK: building a generation

    /// Reads a file under a read lease (no writer may have it open or open it
    /// meanwhile) and returns it with its digest, checked unchanged.
    static func leasedDigest(
        _ f: OpenFile, stat: FileStat, path: [UInt8], buffer: UnsafeMutableRawBufferPointer, lease: Bool
    ) throws -> (OpenFile, ContentDigest) {
        if lease {
            do { try f.takeReadLease() } catch Errno.resourceTemporarilyUnavailable {
                throw InputError("\(escapedPath(path)): open for writing (is the guest running?)")
            }
        }
        let before = try f.stat()
        guard before.sameContentState(as: stat) else {
            throw InputError("\(escapedPath(path)): changed while being read (is the guest running?)")
        }
        let (digest, read) = try ContentHasher.contentDigest(of: f, size: before.size, buffer: buffer)
        let after = try f.stat()
        guard read == before.size, after.sameContentState(as: before), !lease || f.holdsReadLease else {
            throw InputError("\(escapedPath(path)): changed while being read (is the guest running?)")
        }
        return (f, digest)
    }

    /// Adds what a filler counted to a guest's report.
    static func merge(_ c: StubFiller.Counts, into result: inout OverlayReport.Guest) {
        result.objectsCreated += c.objectsCreated
        result.filesSharingObjects += c.filesSharingObjects
        result.bytesLinked += c.bytesLinked
        result.bytesCopied += c.bytesCopied
    }

    /// Threads that read files while a generation is described.
    static let fillThreads = 8

    /// Gives the upper root the guest root's attributes (overlayfs shows the
    /// top layer's attributes for the merged root).
    static func copyRootAttributes(from source: Directory, to upper: Directory) throws {
        let st = try source.stat()
        try upper.changeOwner(uid: st.uid, gid: st.gid)
        try upper.changeMode(st.mode)
        for a in try source.extendedAttributes() {
            var a = a
            if a.name.starts(with: TreeCopier.overlayPrefix) {
                a.name = TreeCopier.overlayPrefix + Array("overlay.".utf8) + a.name[TreeCopier.overlayPrefix.count...]
            }
            try upper.setExtendedAttribute(a)
        }
        try upper.setModificationTime(st.modificationTime)
    }

    static func elapsed(since t: MonotonicInstant) -> Double { t.secondsElapsed }
}
