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
/// (`F_RDLCK`: refused while anyone has them open for writing; holds off
/// new writers) and compared with the state they had when hashed. The
/// replacement links the object to a temporary name and exchanges it with
/// the path (`renameat2(RENAME_EXCHANGE)`), then checks that what came out is
/// the victim; if a guest renamed something else there meanwhile, the
/// exchange is undone and nothing of the guest's is lost.
final class HardlinkLinker {
    let inventory: Inventory
    let roots: [GuestRoot]
    let store: Store
    let journal: RunJournal
    let opener: DirectoryOpener
    var expected: [Int32: FileStat] = [:]
    var temporaryCounter = 0
    var outcome = LinkOutcome()
    var progress: (@Sendable (Int, Int) -> Void)?

    init(inventory: Inventory, roots: [GuestRoot], store: Store, journal: RunJournal, hashed: [Int32: FileStat]) {
        self.inventory = inventory
        self.roots = roots
        self.store = store
        self.journal = journal
        self.opener = DirectoryOpener(inventory: inventory, roots: roots.map(\.directory))
        self.expected = hashed
    }

    struct Mismatch: Error {}

    func skip(_ nameIndex: Int32, _ reason: SkipReason) {
        outcome.skips.append(Skip(guest: Int(inventory.guest(ofName: nameIndex)), path: inventory.path(ofName: nameIndex), reason: reason))
    }

    static func reason(for error: any Error, operation: String) -> SkipReason {
        if error is Mismatch || error is DirectoryOpener.DirectoryChanged { return .changedDuringRun }
        let e = errnoCode(error)
        if e == EAGAIN { return .openForWriting }
        if e == ENOENT || e == ELOOP || e == ENOTDIR || e == ESTALE { return .changedDuringRun }
        return .failed(operation: operation, errno: e)
    }

    /// Checks an open file against the state hashify last saw it in.
    func verify(_ file: OpenFile, inode: Int32) throws -> FileStat {
        let st = try file.stat()
        guard let exp = expected[inode], st.sameContentState(as: exp), st.mode == exp.mode,
              st.uid == exp.uid, st.gid == exp.gid else { throw Mismatch() }
        return st
    }

    /// Opens `name` in `dir`, leases it and checks it twice (before and under the lease).
    func openLeased(_ dir: Directory, _ name: FileName, inode: Int32) throws -> OpenFile {
        let f = try dir.openFileForReading(name)
        _ = try verify(f, inode: inode)
        try f.takeReadLease()
        _ = try verify(f, inode: inode)
        return f
    }

    // The object of each group: (inode, name, generation).
    var objectOf: [Int: (inode: Int32, name: FileName, generation: Int)] = [:]

    func run(_ groups: [Planner.Group]) -> LinkOutcome {
        createObjects(groups)
        replaceVictims(groups)
        return outcome
    }

    /// Phase 1: a store object for every group whose keeper is not one yet.
    func createObjects(_ groups: [Planner.Group]) {
        let storeObjects = Dictionary(uniqueKeysWithValues: ((try? store.listObjects()) ?? []).map {
            (InodeKey(device: $0.stat.device, inode: $0.stat.inode), $0.name)
        })
        let order = groups.indices.sorted {
            let a = inventory.inodes[Int(groups[$0].keeper)].names[0], b = inventory.inodes[Int(groups[$1].keeper)].names[0]
            return inventory.names[Int(a)].directory < inventory.names[Int(b)].directory
        }
        for g in order {
            let group = groups[g]
            let keeper = inventory.inodes[Int(group.keeper)]
            let key = InodeKey(device: keeper.stat.device, inode: keeper.stat.inode)
            if keeper.storeObject >= 0, let name = storeObjects[key] {
                objectOf[g] = (group.keeper, name, Store.parseObjectName(name)?.2 ?? 0)
                continue
            }
            let nameIndex = keeper.names[0]
            do {
                let dir = try opener.open(inventory.names[Int(nameIndex)].directory)
                let file = try openLeased(dir, inventory.fileName(nameIndex), inode: group.keeper)
                let (name, generation) = try publish(file, group: group, fromGeneration: 0)
                expected[group.keeper] = try file.stat()
                file.releaseLease()
                objectOf[g] = (group.keeper, name, generation)
                outcome.objectsCreated += 1
            } catch {
                skip(nameIndex, Self.reason(for: error, operation: "link into store"))
            }
        }
    }

    /// Links an open (leased) file into the store under the first free generation.
    func publish(_ file: OpenFile, group: Planner.Group, fromGeneration: Int) throws -> (FileName, Int) {
        let dir = try store.prefixDirectory(group.digest.bytes[0])
        let key = MetadataIdentity(stat: try file.stat(), xattrs: try file.extendedAttributes()).key
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

    struct Action {
        var group: Int
        var victim: Int32
        var name: Int32
    }

    /// Phase 2: every name of every victim, in walk order, one directory at a time.
    func replaceVictims(_ groups: [Planner.Group]) {
        var actions: [Action] = []
        for (g, group) in groups.enumerated() where objectOf[g] != nil {
            for v in group.victims {
                for n in inventory.inodes[Int(v)].names { actions.append(Action(group: g, victim: v, name: n)) }
            }
        }
        actions.sort { a, b in
            let da = inventory.names[Int(a.name)].directory, db = inventory.names[Int(b.name)].directory
            return da != db ? da < db : a.name < b.name
        }
        var remainingNames: [Int32: Int] = [:]
        for a in actions { remainingNames[a.victim, default: 0] += 1 }
        var promoted = Set<Int32>()
        var failedVictims = Set<Int32>()
        var currentDir: Int32 = -1
        var currentDirectory: Directory?
        var restoreMtime = false
        let tempPrefix = Walker.temporaryPrefix + Array("\(journal.runID)~".utf8)

        func finishDirectory() {
            guard currentDir >= 0, let d = currentDirectory else { return }
            if restoreMtime {
                try? d.setModificationTime(inventory.directories[Int(currentDir)].modificationTime)
            }
            journal.endDirectory()
            currentDirectory = nil
            currentDir = -1
        }

        for (i, action) in actions.enumerated() {
            if i & 255 == 0 { progress?(i, actions.count) }
            let group = groups[action.group]
            let nameIndex = action.name
            let dirID = inventory.names[Int(nameIndex)].directory
            if promoted.contains(action.victim) { continue }
            if failedVictims.contains(action.victim) {
                skip(nameIndex, .changedDuringRun)
                continue
            }
            do {
                if dirID != currentDir {
                    finishDirectory()
                    let d = try opener.open(dirID)
                    let entry = inventory.directories[Int(dirID)]
                    restoreMtime = (try d.stat().modificationTime) == entry.modificationTime
                    journal.beginDirectory(root: Array(roots[Int(entry.guest)].path.string.utf8), inode: entry.inode,
                                           mtime: entry.modificationTime)
                    currentDir = dirID
                    currentDirectory = d
                }
                let dir = currentDirectory!
                let name = inventory.fileName(nameIndex)
                let victimFile = try openLeased(dir, name, inode: action.victim)
                defer { victimFile.releaseLease() }
                guard var object = objectOf[action.group] else { continue }
                let objectDir = try store.prefixDirectory(group.digest.bytes[0])
                let objectFile = try openLeased(objectDir, object.name, inode: object.inode)
                defer { objectFile.releaseLease() }
                temporaryCounter += 1
                let temp = FileName(tempPrefix + Array(String(temporaryCounter).utf8))
                do {
                    try objectFile.link(into: dir, as: temp)
                } catch Errno.tooManyLinks {
                    // The object is full: this victim becomes the next object of the group.
                    let (newName, generation) = try publish(victimFile, group: group, fromGeneration: object.generation + 1)
                    expected[action.victim] = try victimFile.stat()
                    object = (action.victim, newName, generation)
                    objectOf[action.group] = object
                    promoted.insert(action.victim)
                    outcome.objectsCreated += 1
                    continue
                }
                expected[object.inode] = try objectFile.stat()
                try dir.rename(temp, to: dir, as: name, flags: .exchange)
                let out = try dir.stat(temp)
                if out.inode != inventory.inodes[Int(action.victim)].stat.inode {
                    // Someone put another file at this name meanwhile: give it back.
                    try dir.rename(temp, to: dir, as: name, flags: .exchange)
                    if (try? dir.stat(temp))?.inode == inventory.inodes[Int(object.inode)].stat.inode {
                        try? dir.unlink(temp)
                    } else {
                        skip(nameIndex, .unknownTemporary)
                    }
                    throw Mismatch()
                }
                try dir.unlink(temp)
                let after = try victimFile.stat()
                expected[action.victim] = after
                expected[object.inode] = try objectFile.stat()
                outcome.pathsLinked += 1
                let guest = Int(inventory.guest(ofName: nameIndex))
                outcome.perGuestPaths[guest, default: 0] += 1
                if inventory.inodes[Int(action.victim)].stat.modificationTime != group.identity.modificationTime {
                    outcome.pathsWithOtherModificationTime += 1
                }
                remainingNames[action.victim]! -= 1
                if after.linkCount == 0 {
                    let owner = Int(inventory.inodes[Int(action.victim)].guest)
                    outcome.inodesFreed += 1
                    outcome.bytesSaved += after.allocatedBytes
                    outcome.perGuestInodes[owner, default: 0] += 1
                    outcome.perGuestBytes[owner, default: 0] += after.allocatedBytes
                    outcome.freed.append(InodeKey(device: after.device, inode: after.inode))
                }
            } catch {
                skip(nameIndex, Self.reason(for: error, operation: "replace"))
                // The victim's other names stay with it (never split an inode's names further).
                failedVictims.insert(action.victim)
            }
        }
        finishDirectory()
        progress?(actions.count, actions.count)
    }
}
