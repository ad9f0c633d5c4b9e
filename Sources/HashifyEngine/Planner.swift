import HashifySystem

/// Groups of inodes to merge: pure data in, pure data out (no system calls).
public enum Planner {
    /// Inodes that share size and the metadata the walk already knows
    /// (mode, owner, group, mtime unless ignored) with another inode. Only
    /// these are ever read; every other file is left unread.
    public struct Candidates: Sendable {
        public var inodes: [Int32] = []
        /// The same inodes, as groups of equal size and known metadata.
        public var groups: [[Int32]] = []
        /// Candidates that have hard links outside the scanned roots.
        public var incomplete: [Int32] = []
    }

    struct PreKey: Hashable {
        var size: UInt64
        var mode: UInt32
        var uid: UInt32
        var gid: UInt32
        var mtime: Timestamp
    }

    static func preKey(_ s: FileStat, ignoreModificationTime: Bool) -> PreKey {
        PreKey(size: s.size, mode: s.mode, uid: s.uid, gid: s.gid,
               mtime: ignoreModificationTime ? Timestamp(seconds: 0, nanoseconds: 0) : s.modificationTime)
    }

    /// Whether every name of the inode is known: in the roots or in the store.
    public static func namesComplete(_ e: Inventory.InodeEntry) -> Bool {
        UInt32(e.names.count) + (e.storeObject >= 0 ? 1 : 0) == e.stat.linkCount
    }

    public static func candidates(_ inventory: Inventory, ignoreModificationTime: Bool) -> Candidates {
        var groups: [PreKey: [Int32]] = [:]
        for (i, e) in inventory.inodes.enumerated() {
            groups[preKey(e.stat, ignoreModificationTime: ignoreModificationTime), default: []].append(Int32(i))
        }
        var result = Candidates()
        for (_, members) in groups where members.count > 1 {
            var complete: [Int32] = []
            for m in members {
                if namesComplete(inventory.inodes[Int(m)]) {
                    complete.append(m)
                } else {
                    result.incomplete.append(m)
                }
            }
            result.inodes += complete
            if !complete.isEmpty { result.groups.append(complete.sorted()) }
        }
        result.inodes.sort()
        result.incomplete.sort()
        return result
    }

    /// A set of inodes with equal content and identity, merged into `keeper`.
    public struct Group: Sendable {
        public var size: UInt64
        public var digest: ContentDigest
        /// The keeper's identity (its mtime is the one every path gets).
        public var identity: MetadataIdentity
        public var keeper: Int32
        public var victims: [Int32]
    }

    struct GroupKey: Hashable {
        var size: UInt64
        var digest: ContentDigest
        var identity: MetadataIdentity
    }

    /// Final groups from hash outcomes (parallel to `candidates`).
    public static func groups(_ inventory: Inventory, candidates: [Int32], outcomes: [HashOutcome],
                              ignoreModificationTime: Bool) -> [Group] {
        var byKey: [GroupKey: [Int]] = [:]
        for (slot, o) in outcomes.enumerated() {
            guard let d = o.digest, let id = o.identity else { continue }
            let key = GroupKey(size: inventory.inodes[Int(candidates[slot])].stat.size, digest: d,
                               identity: ignoreModificationTime ? id.withoutModificationTime : id)
            byKey[key, default: []].append(slot)
        }
        var result: [Group] = []
        for (key, slots) in byKey where slots.count > 1 {
            let members = slots.map { candidates[$0] }
            // Keeper: an existing store object (the one with most room), else the inode with most names.
            let objects = members.filter { inventory.inodes[Int($0)].storeObject >= 0 }
            let keeper: Int32
            if let o = objects.min(by: { inventory.inodes[Int($0)].stat.linkCount < inventory.inodes[Int($1)].stat.linkCount }) {
                keeper = o
            } else {
                keeper = members.max { a, b in
                    let na = inventory.inodes[Int(a)].names.count, nb = inventory.inodes[Int(b)].names.count
                    return na != nb ? na < nb : a > b
                }!
            }
            let keeperSlot = slots[members.firstIndex(of: keeper)!]
            // Other store objects stay as they are (they are not re-linked).
            let victims = members.filter { $0 != keeper && inventory.inodes[Int($0)].storeObject < 0 }
            if victims.isEmpty { continue }
            result.append(Group(size: key.size, digest: key.digest, identity: outcomes[keeperSlot].identity!,
                                keeper: keeper, victims: victims.sorted()))
        }
        result.sort { $0.keeper < $1.keeper }
        return result
    }
}
