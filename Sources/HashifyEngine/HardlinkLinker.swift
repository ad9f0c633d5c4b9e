import HashifySystem
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// What linking did.
public struct LinkOutcome: Sendable {
    public var pathsLinked = 0
    public var inodesFreed = 0
    public var bytesSaved: UInt64 = 0
    public var objectsCreated = 0
    public var pathsWithOtherModificationTime = 0
    public var perGuestPaths: [Int: Int] = [:]
    public var perGuestInodes: [Int: Int] = [:]
    public var perGuestBytes: [Int: UInt64] = [:]
    public var skips: [Skip] = []
    /// Inodes that lost their last name (processes mapping them should restart).
    public var freed: [InodeKey] = []
}

/// The `hardlink` strategy: each group's keeper becomes a store object (a
/// hard link into the store, no data copied) and every name of every other
/// inode is replaced by a link to it, one atomic rename per name.
///
/// Before each replacement the victim and the object are opened, leased
/// (`F_RDLCK`: refused while anyone has them open for writing; holds off new
/// writers) and compared with the state they had when hashed. The
/// replacement links the object to a temporary name and exchanges it with
/// the path (`renameat2(RENAME_EXCHANGE)`), then checks that what came out is
/// the victim; if a guest renamed something else there meanwhile, the
/// exchange is undone and nothing of the guest's is lost.
///
/// Objects stay leased for a short batch; before their leases go, the
/// coarse clock is let pass their last ctime, so the index entries written
/// for them cannot miss a write that follows.
final class HardlinkLinker {
    let inventory: Inventory
    let roots: [GuestRoot]
    let store: Store
    let journal: RunJournal
    let directories: DirectoryChanges
    let keeperOpener: DirectoryOpener
    var index: ContentIndex
    var expected: [Int32: FileStat]
    var temporaries: TemporaryNames
    var outcome = LinkOutcome()
    var progress: (@Sendable (Int, Int) -> Void)?
    /// Store objects by inode (for keepers that already are objects).
    let storeNames: [InodeKey: FileName]

    init(inventory: Inventory, roots: [GuestRoot], store: Store, journal: RunJournal,
         expected: [Int32: FileStat], index: ContentIndex, objects: [Store.Object]) {
        self.inventory = inventory
        self.roots = roots
        self.store = store
        self.journal = journal
        self.directories = DirectoryChanges(inventory: inventory, roots: roots, journal: journal)
        self.temporaries = TemporaryNames(runID: journal.runID)
        self.keeperOpener = DirectoryOpener(inventory: inventory, roots: roots.map(\.directory))
        self.expected = expected
        self.index = index
        self.storeNames = Dictionary(objects.map { (InodeKey(device: $0.stat.device, inode: $0.stat.inode), $0.name) },
                                     uniquingKeysWith: { a, _ in a })
    }

    struct Mismatch: Error {}

    func skip(_ nameIndex: Int32, _ reason: SkipReason) {
        outcome.skips.append(Skip(guest: Int(inventory.guest(ofName: nameIndex)), path: inventory.path(ofName: nameIndex), reason: reason))
    }

    static func reason(for error: any Error, operation: String) -> SkipReason {
        if error is Mismatch || error is NameMoved || error is DirectoryOpener.DirectoryChanged { return .changedDuringRun }
        let e = errnoCode(error)
        if e == EAGAIN { return .openForWriting }
        if e == ENOENT || e == ELOOP || e == ENOTDIR || e == ESTALE { return .changedDuringRun }
        return .failed(operation: operation, errno: e)
    }

    /// Checks an open file against the state hashify last saw it in.
    func verify(_ file: OpenFile, inode: Int32) throws {
        let st = try file.stat()
        guard let exp = expected[inode], st.sameContentState(as: exp), st.mode == exp.mode,
              st.uid == exp.uid, st.gid == exp.gid else { throw Mismatch() }
    }

    /// Opens `name` in `dir`, leases it and checks it under the lease.
    func openLeased(_ dir: Directory, _ name: FileName, inode: Int32) throws -> OpenFile {
        let f = try dir.openFileForReading(name)
        try f.takeReadLease()
        try verify(f, inode: inode)
        return f
    }

    // MARK: objects

    struct Object {
        var inode: Int32
        var name: FileName
        var generation: Int
    }
    var objectOf: [Int: Object] = [:]
    /// Leased, open objects: inode → (file, group).
    var held: [Int32: (file: OpenFile, group: Int)] = [:]
    var heldSince: Int64 = 0

    /// The group's object, open and leased: the existing store object, or the
    /// keeper published into the store now.
    func object(for g: Int, _ group: Planner.Group) throws -> (Object, OpenFile) {
        if let o = objectOf[g] {
            if let h = held[o.inode] {
                // Leased without a break since it was verified (holds last about 50 ms,
                // far below the kernel's lease-break time): no writer has opened it.
                return (o, h.file)
            }
            let f = try openLeased(try store.prefixDirectory(group.digest.firstByte), o.name, inode: o.inode)
            hold(f, inode: o.inode, group: g)
            return (o, f)
        }
        let keeper = inventory.inodes[Int(group.keeper)]
        let key = InodeKey(device: keeper.stat.device, inode: keeper.stat.inode)
        if keeper.storeObject >= 0, let name = storeNames[key] {
            let o = Object(inode: group.keeper, name: name, generation: Store.parseObjectName(name)?.2 ?? 0)
            objectOf[g] = o
            let f = try openLeased(try store.prefixDirectory(group.digest.firstByte), name, inode: group.keeper)
            hold(f, inode: group.keeper, group: g)
            return (o, f)
        }
        // Publish the keeper: link it into the store under lease (no data copied).
        let nameIndex = keeper.names[0]
        let dir = try keeperOpener.open(inventory.names[Int(nameIndex)].directory)
        let file = try openLeased(dir, inventory.fileName(nameIndex), inode: group.keeper)
        let (name, generation) = try publish(file, group: group, fromGeneration: 0)
        expected[group.keeper] = try file.stat()
        outcome.objectsCreated += 1
        let o = Object(inode: group.keeper, name: name, generation: generation)
        objectOf[g] = o
        hold(file, inode: group.keeper, group: g)
        return (o, file)
    }

    func hold(_ f: OpenFile, inode: Int32, group: Int) {
        if held.isEmpty { heldSince = Timestamp.now().totalNanoseconds }
        held[inode] = (f, group)
    }

    /// Records held objects in the index and releases them. An object is let
    /// go only once the coarse clock is past its ctime (while the lease kept
    /// writers out), so `verifiedAt` is later than any ctime a write before it
    /// could have left. Objects changed in the current clock tick stay held
    /// until the next release; with `all`, this waits for the tick to pass.
    func releaseObjects(_ groups: [Planner.Group], all: Bool) {
        if held.isEmpty { return }
        var now = coarseNow()
        if all {
            let latest = held.values.compactMap { try? $0.file.stat().changeTime }.max() ?? Timestamp(seconds: 0, nanoseconds: 0)
            while !(latest < now) {
                usleep(500)
                now = coarseNow()
            }
        }
        for (inode, h) in held {
            // Our own links moved ctime while the lease kept writers out: the
            // state now is the object's verified state.
            guard let st = try? h.file.stat(), st.changeTime < now else { continue }
            expected[inode] = st
            if h.file.holdsReadLease {
                let g = groups[h.group]
                index.record(st, verifiedAt: now, digest: g.digest, xattrDigest: g.identity.xattrDigest)
            } else {
                index.remove(st.device, st.inode)
                expected[inode] = nil  // never reused without verifying again
            }
            h.file.releaseLease()
            held[inode] = nil
        }
        heldSince = Timestamp.now().totalNanoseconds
    }

    /// Links an open (leased) file into the store under the first free generation.
    func publish(_ file: OpenFile, group: Planner.Group, fromGeneration: Int) throws -> (FileName, Int) {
        let dir = try store.prefixDirectory(group.digest.firstByte)
        let key = MetadataIdentity(stat: try file.stat(), xattrDigest: group.identity.xattrDigest).key
        var generation = fromGeneration
        while true {
            let name = Store.objectName(digest: group.digest, key: key, generation: generation)
            do {
                try file.link(into: dir, as: name)
                return (name, generation)
            } catch Errno.fileExists {
                generation += 1
            }
        }
    }

    // MARK: replacing

    struct Action {
        var group: Int
        var victim: Int32
        var name: Int32
    }

    /// Every name of every victim, in walk order, one directory at a time.
    func run(_ groups: [Planner.Group]) -> LinkOutcome {
        var actions: [Action] = []
        for (g, group) in groups.enumerated() {
            for v in group.victims {
                for n in inventory.inodes[Int(v)].names { actions.append(Action(group: g, victim: v, name: n)) }
            }
        }
        actions.sort { a, b in
            let da = inventory.names[Int(a.name)].directory, db = inventory.names[Int(b.name)].directory
            return da != db ? da < db : a.name < b.name
        }
        var promoted = Set<Int32>()
        var failedVictims = Set<Int32>()
        var failedGroups = Set<Int>()
        for (i, action) in actions.enumerated() {
            if i & 255 == 0 { progress?(i, actions.count) }
            // Keep object leases short: release them every 50 ms or 512 objects.
            if i & 31 == 0, !held.isEmpty, held.count >= 512 || Timestamp.now().totalNanoseconds - heldSince > 50_000_000 {
                releaseObjects(groups, all: false)
            }
            let group = groups[action.group]
            let nameIndex = action.name
            let dirID = inventory.names[Int(nameIndex)].directory
            if promoted.contains(action.victim) { continue }
            if failedVictims.contains(action.victim) || failedGroups.contains(action.group) {
                skip(nameIndex, .changedDuringRun)
                continue
            }
            do {
                let dir = try directories.enter(dirID)
                let name = inventory.fileName(nameIndex)
                let victimFile = try openLeased(dir, name, inode: action.victim)  // closing it drops the lease
                let object: Object
                let objectFile: OpenFile
                do {
                    (object, objectFile) = try self.object(for: action.group, group)
                } catch {
                    failedGroups.insert(action.group)
                    let keeperName = inventory.inodes[Int(group.keeper)].names[0]
                    skip(keeperName, Self.reason(for: error, operation: "link into store"))
                    throw error
                }
                let temp = temporaries.next(.link)
                do {
                    try objectFile.link(into: dir, as: temp)
                } catch Errno.tooManyLinks {
                    // The object is full: this victim becomes the next object of the group.
                    let (newName, generation) = try publish(victimFile, group: group, fromGeneration: object.generation + 1)
                    expected[action.victim] = try victimFile.stat()
                    objectOf[action.group] = Object(inode: action.victim, name: newName, generation: generation)
                    promoted.insert(action.victim)
                    outcome.objectsCreated += 1
                    continue
                }
                let victimInode = inventory.inodes[Int(action.victim)].stat.inode
                guard try exchange(temp, with: name, in: dir, expectedInode: victimInode,
                                   tempInode: inventory.inodes[Int(object.inode)].stat.inode) else {
                    journal.keep(temp)
                    skip(nameIndex, .unknownTemporary)
                    throw Mismatch()
                }
                let after = try victimFile.stat()
                expected[action.victim] = after
                outcome.pathsLinked += 1
                let guest = Int(inventory.guest(ofName: nameIndex))
                outcome.perGuestPaths[guest, default: 0] += 1
                if inventory.inodes[Int(action.victim)].stat.modificationTime != group.identity.modificationTime {
                    outcome.pathsWithOtherModificationTime += 1
                }
                if after.linkCount == 0 {
                    let owner = Int(inventory.inodes[Int(action.victim)].guest)
                    outcome.inodesFreed += 1
                    outcome.bytesSaved += after.allocatedBytes
                    outcome.perGuestInodes[owner, default: 0] += 1
                    outcome.perGuestBytes[owner, default: 0] += after.allocatedBytes
                    outcome.freed.append(InodeKey(device: after.device, inode: after.inode))
                    index.remove(after.device, after.inode)
                }
            } catch {
                if !failedGroups.contains(action.group) || !(error is Mismatch) {
                    skip(nameIndex, Self.reason(for: error, operation: "replace"))
                }
                // The victim's other names stay with it (never split an inode's names further).
                failedVictims.insert(action.victim)
            }
        }
        directories.finish()
        releaseObjects(groups, all: true)
        progress?(actions.count, actions.count)
        return outcome
    }
}
