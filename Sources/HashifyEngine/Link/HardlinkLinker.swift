import HashifySystem
import SystemPackage

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
/// Names are replaced a directory at a time, all guests' copies of one
/// relative path back to back, so a group's object serves every guest while
/// it is still open and leased. Objects stay leased for a short batch; before their leases go, the
/// coarse clock is let pass their last ctime, so the index entries written
/// for them cannot miss a write that follows.
final class HardlinkLinker: LinkStrategy {
    let inventory: Inventory
    let roots: [GuestRoot]
    let store: Store
    let journal: RunJournal
    let directories: DirectoryChanges
    let keeperOpener: DirectoryOpener
    let contents: InodeContents
    /// The ctime of inodes this run changed itself (its own links and
    /// renames move nothing else); others are expected as the walk saw them.
    var changeTime: [Int32: Timestamp] = [:]
    /// Objects whose lease broke: never used again without hashing.
    var distrusted = Set<Int32>()
    var temporaries: TemporaryNames
    var outcome = LinkOutcome()
    let closer: BackgroundCloser
    /// Objects held under lease at most (from the descriptor budget).
    let heldLimit: Int
    var progress: (@Sendable (Int, Int) -> Void)?
    /// Generation of each inode that is a store object (by inode index).
    let objectGenerations: [Int32: Int]

    init(
        inventory: Inventory, roots: [GuestRoot], store: Store, journal: RunJournal,
        contents: InodeContents, objectGenerations: [Int32: Int]
    ) {
        self.inventory = inventory
        self.roots = roots
        self.store = store
        self.journal = journal
        self.directories = DirectoryChanges(inventory: inventory, roots: roots, journal: journal)
        self.temporaries = TemporaryNames(runID: journal.runID)
        self.keeperOpener = DirectoryOpener(inventory: inventory, roots: roots.map(\.directory))
        self.contents = contents
        self.objectGenerations = objectGenerations
        let budget = DescriptorBudget()
        closer = BackgroundCloser(threads: budget.closingThreads, limit: budget.pendingCloses)
        heldLimit = budget.heldObjects
    }

    struct Mismatch: Error {}

    func skip(_ nameIndex: Int32, _ reason: SkipReason) {
        outcome.skips.append(
            Skip(
                guest: Int(inventory.guest(ofName: nameIndex)), path: inventory.path(ofName: nameIndex), reason: reason)
        )
    }

    static func reason(for error: any Error, operation: Operation) -> SkipReason {
        if error is Mismatch || error is NameMoved || error is DirectoryOpener.DirectoryChanged {
            return .changedDuringRun
        }
        let e = errnoCode(error)
        if e == .resourceTemporarilyUnavailable || error is WriterArrived { return .openForWriting }
        if e?.meansChangedDuringRun == true { return .changedDuringRun }
        return .failed(OperationError(operation, error))
    }

    /// Checks an open file against the state hashify last saw it in.
    func verify(_ file: OpenFile, inode: Int32) throws {
        let st = try file.stat()
        guard !distrusted.contains(inode), inventory.inodes[Int(inode)].matches(st, changeTime: changeTime[inode])
        else { throw Mismatch() }
    }

    /// Opens `name` in `dir`, leases it and checks it under the lease.
    func openLeased(_ dir: Directory, _ name: FileName, inode: Int32) throws -> OpenFile {
        let f = try attempt(.open) {
            try directories.opener.retryingWhenOutOfDescriptors { try dir.openFileForReading(name) }
        }
        try attempt(.lease) { try f.takeReadLease() }
        try verify(f, inode: inode)
        return f
    }

    // MARK: objects

    /// A group's current object: an inode and its generation (its name
    /// follows from the group's digest and the inode's identity).
    struct Object {
        var inode: Int32
        var generation: Int
    }

    func name(of o: Object, in group: Planner.Group) -> FileName {
        let e = inventory.inodes[Int(o.inode)]
        let identity = MetadataIdentity(
            mode: e.mode, uid: e.uid, gid: e.gid, modificationTime: e.modificationTime,
            xattrDigest: group.identity.xattrDigest)
        return Store.objectName(digest: group.digest, key: identity.key, generation: o.generation)
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
            let f = try openLeased(
                try store.prefixDirectory(group.digest.firstByte), name(of: o, in: group), inode: o.inode)
            hold(f, inode: o.inode, group: g)
            return (o, f)
        }
        let keeper = inventory.inodes[Int(group.keeper)]
        if let generation = objectGenerations[group.keeper] {
            // Already an object: its name follows from its digest and identity.
            let name = Store.objectName(digest: group.digest, key: group.identity.key, generation: generation)
            let dir = try store.prefixDirectory(group.digest.firstByte)
            if let st = try? dir.stat(name), st.inode == keeper.inode {
                let o = Object(inode: group.keeper, generation: generation)
                objectOf[g] = o
                let f = try openLeased(dir, name, inode: group.keeper)
                hold(f, inode: group.keeper, group: g)
                return (o, f)
            }
            // Its store name does not say what it holds now: it is published under the right one.
        }
        // Publish the keeper: link it into the store under lease (no data copied).
        let nameIndex = keeper.firstName
        let dir = try keeperOpener.open(inventory.names[Int(nameIndex)].directory)
        let file = try openLeased(dir, inventory.fileName(nameIndex), inode: group.keeper)
        let generation = try publish(file, group: group, fromGeneration: 0)
        changeTime[group.keeper] = try file.stat().changeTime
        outcome.objectsCreated += 1
        let o = Object(inode: group.keeper, generation: generation)
        objectOf[g] = o
        hold(file, inode: group.keeper, group: g)
        return (o, file)
    }

    func hold(_ f: OpenFile, inode: Int32, group: Int) {
        if held.isEmpty { heldSince = MonotonicInstant.now().nanoseconds }
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
            let latest =
                held.values.compactMap { try? $0.file.stat().changeTime }.max() ?? Timestamp(seconds: 0, nanoseconds: 0)
            while !(latest < now) {
                sleep(microseconds: 500)
                now = coarseNow()
            }
        }
        for (inode, h) in held {
            // Our own links moved ctime while the lease kept writers out: the
            // state now is the object's verified state.
            guard let st = try? h.file.stat(), st.changeTime < now else { continue }
            if h.file.holdsReadLease {
                changeTime[inode] = st.changeTime
                contents.reverify(inode, changeTime: st.changeTime, at: now)
            } else {
                contents.forget(inode)
                changeTime[inode] = nil
                distrusted.insert(inode)  // never reused without verifying again
            }
            h.file.releaseLease()
            held[inode] = nil
        }
        heldSince = MonotonicInstant.now().nanoseconds
    }

    /// Publishes an open (leased) file as its group's object; returns its generation.
    func publish(_ file: OpenFile, group: Planner.Group, fromGeneration: Int) throws -> Int {
        let key = MetadataIdentity(stat: try file.stat(), xattrDigest: group.identity.xattrDigest).key
        return try store.publish(file, digest: group.digest, identityKey: key, fromGeneration: fromGeneration)
    }

    // MARK: replacing

    /// Calls `body` with every name, a directory at a time (a
    /// directory's names in walk order), the directories of one
    /// guest-relative path of all guests one after another: a group's victims
    /// in the guests then follow each other within moments, so its object is
    /// opened and leased once for them all instead of once per guest.
    func forEachNameInLinkingOrder(_ body: (Int32) -> Void) {
        for d in inventory.directoriesByRelativePath() {
            for n in inventory.nameRange(ofDirectory: d) { body(n) }
        }
    }

    /// What replacing one name did.
    enum Replacement {
        /// The name links the object now; `out` is what came out, `victimFile` the victim, open and leased.
        case linked(out: FileStat, victimFile: OpenFile)
        /// The object was full (the filesystem's link limit): the victim became the group's next object.
        case promoted
    }

    /// Replaces name `nameIndex` of `victim` by a link to group `g`'s object:
    /// the victim opened and leased, the object found or published, linked
    /// under a temporary name beside the victim and exchanged with it.
    /// `step` says what was under way when an error is thrown.
    func replace(
        _ nameIndex: Int32, victim: Int32, group g: Int, _ group: Planner.Group, step: inout Operation,
        failedGroups: inout Set<Int>
    ) throws -> Replacement {
        let dir = try directories.enter(inventory.names[Int(nameIndex)].directory)
        step = .open
        let name = inventory.fileName(nameIndex)
        let victimFile = try openLeased(dir, name, inode: victim)  // closing it drops the lease
        let object: Object
        let objectFile: OpenFile
        do {
            (object, objectFile) = try self.object(for: g, group)
        } catch {
            failedGroups.insert(g)
            let keeperName = inventory.inodes[Int(group.keeper)].firstName
            skip(keeperName, Self.reason(for: error, operation: .linkIntoStore))
            throw error
        }
        let temp = temporaries.next(.link)
        let victimInode = inventory.inodes[Int(victim)].inode
        let replaced: FileStat?
        step = .linkTemporary
        do {
            replaced = try directories.change {
                try objectFile.link(into: dir, as: temp)
                return try exchange(
                    temp, with: name, in: dir, expectedInode: victimInode,
                    tempInode: inventory.inodes[Int(object.inode)].inode,
                    journal: journal, lease: victimFile)
            }
        } catch Errno.tooManyLinks {
            // The object is full: this victim becomes the next object of the group.
            let generation = try publish(victimFile, group: group, fromGeneration: object.generation + 1)
            changeTime[victim] = try victimFile.stat().changeTime
            objectOf[g] = Object(inode: victim, generation: generation)
            outcome.objectsCreated += 1
            return .promoted
        }
        guard let out = replaced else {
            journal.keep(temp)
            skip(nameIndex, .unknownTemporary)
            throw Mismatch()
        }
        return .linked(out: out, victimFile: victimFile)
    }

    /// Counts a replaced name; when it was the victim's last, the victim is
    /// freed (it was held open under lease until now) and closed in the background.
    func count(_ out: FileStat, victimFile: OpenFile, nameIndex: Int32, victim: Int32, group: Planner.Group) throws {
        outcome.countLinked(
            guest: Int(inventory.guest(ofName: nameIndex)),
            otherModificationTime: inventory.inodes[Int(victim)].modificationTime != group.identity.modificationTime)
        if out.linkCount > 1 {
            // Names of it are left (later in this run): its state now is what they expect.
            changeTime[victim] = try victimFile.stat().changeTime
            return
        }
        outcome.countFreed(victim, owner: Int(inventory.guest(ofInode: victim)), bytes: out.allocatedBytes)
        contents.forget(victim)
        changeTime[victim] = nil
        closer.close(victimFile)
    }

    /// Every name of every victim, one directory at a time (`forEachNameInLinkingOrder`).
    func run(_ groups: [Planner.Group]) -> LinkOutcome {
        // By inode: the group it is a victim of, or one of the states below.
        let notVictim: Int32 = -1
        let promoted: Int32 = -2
        let failed: Int32 = -3
        var victimGroup = [Int32](repeating: notVictim, count: inventory.inodes.count)
        var total = 0
        for (g, group) in groups.enumerated() {
            for v in group.victims {
                victimGroup[Int(v)] = Int32(g)
                total += Int(inventory.inodes[Int(v)].nameCount)
            }
        }
        outcome.freed = [Bool](repeating: false, count: inventory.inodes.count)
        var failedGroups = Set<Int>()
        var done = 0
        forEachNameInLinkingOrder { nameIndex in
            let victim = inventory.names[Int(nameIndex)].inodeIndex
            let state = victimGroup[Int(victim)]
            if state == notVictim || state == promoted { return }
            if done & 255 == 0 { progress?(done, total) }
            done += 1
            // Keep object leases short: release them every 50 ms or at the budget's count.
            if held.count >= heldLimit {
                releaseObjects(groups, all: true)  // waits at most one clock tick
            } else if done & 31 == 0, !held.isEmpty, MonotonicInstant.now().nanoseconds - heldSince > 50_000_000 {
                releaseObjects(groups, all: false)
            }
            if state == failed {
                skip(nameIndex, .changedDuringRun)
                return
            }
            let g = Int(state)
            let group = groups[g]
            if failedGroups.contains(g) {
                skip(nameIndex, .changedDuringRun)
                return
            }
            // The step under way, for the report of an error that does not name its own.
            var step = Operation.openDirectory
            do {
                switch try replace(nameIndex, victim: victim, group: g, group, step: &step, failedGroups: &failedGroups)
                {
                case .promoted:
                    victimGroup[Int(victim)] = promoted
                case .linked(let out, let victimFile):
                    try count(out, victimFile: victimFile, nameIndex: nameIndex, victim: victim, group: group)
                }
            } catch {
                if !failedGroups.contains(g) || !(error is Mismatch) {
                    skip(nameIndex, Self.reason(for: error, operation: step))
                }
                // The victim's other names stay with it (never split an inode's names further).
                victimGroup[Int(victim)] = failed
            }
        }
        directories.finish()
        releaseObjects(groups, all: true)
        closer.finish()
        progress?(total, total)
        return outcome
    }
}
