import HashifySystem

/// Groups of inodes to merge: pure data in, pure data out (no system calls).
public enum Planner {
    /// Inodes that share size and the metadata the walk already knows
    /// (mode, owner, group, mtime unless ignored) with another inode. Only
    /// these are ever read; every other file is left unread. Groups are
    /// stored flat: `members[groupStarts[i]..<groupStarts[i + 1]]`.
    public struct Candidates: Sendable {
        public var members: [Int32] = []
        var groupStarts: [Int32] = [0]
        /// Per group: true when no member was left out by `filtered`.
        public var keptWhole: [Bool] = []
        /// Candidates that have hard links outside the scanned roots.
        public var incomplete: [Int32] = []

        public var groupCount: Int { groupStarts.count - 1 }
        public func group(_ i: Int) -> ArraySlice<Int32> { members[Int(groupStarts[i])..<Int(groupStarts[i + 1])] }

        /// The same groups with only the members `keep` accepts (empty groups dropped).
        public func filtered(_ keep: (Int32) -> Bool) -> Candidates {
            var out = Candidates()
            for g in 0..<groupCount {
                let before = out.members.count
                for m in group(g) where keep(m) { out.members.append(m) }
                if out.members.count > before {
                    out.groupStarts.append(Int32(out.members.count))
                    out.keptWhole.append(keptWhole[g] && out.members.count - before == group(g).count)
                }
            }
            return out
        }

        /// The candidates without the inodes `drop` names, as if the walk had
        /// never offered them: a group keeps being whole, and one left with a
        /// single member is dropped (nothing to merge it with).
        public func removing(_ drop: (Int32) -> Bool) -> Candidates {
            var out = Candidates()
            for g in 0..<groupCount {
                let kept = group(g).filter { !drop($0) }
                if kept.count < 2 { continue }
                out.members += kept
                out.groupStarts.append(Int32(out.members.count))
                out.keptWhole.append(keptWhole[g])
            }
            out.incomplete = incomplete.filter { !drop($0) }
            return out
        }
    }

    /// Whether every name of the inode is known: in the roots or in the store.
    public static func namesComplete(_ e: Inventory.InodeEntry) -> Bool {
        UInt32(e.nameCount) + (e.isStoreObject ? 1 : 0) == e.linkCount
    }

    /// Orders inodes by size and known metadata (then by index).
    static func precedes(
        _ a: Inventory.InodeEntry, _ ai: Int32, _ b: Inventory.InodeEntry, _ bi: Int32, ignoreModificationTime: Bool
    ) -> Bool {
        if a.size != b.size { return a.size < b.size }
        if a.mode != b.mode { return a.mode < b.mode }
        if a.uid != b.uid { return a.uid < b.uid }
        if a.gid != b.gid { return a.gid < b.gid }
        if !ignoreModificationTime && a.modificationTime != b.modificationTime {
            return a.modificationTime < b.modificationTime
        }
        return ai < bi
    }

    static func samePreKey(_ a: Inventory.InodeEntry, _ b: Inventory.InodeEntry, ignoreModificationTime: Bool) -> Bool {
        a.size == b.size && a.mode == b.mode && a.uid == b.uid && a.gid == b.gid
            && (ignoreModificationTime || a.modificationTime == b.modificationTime)
    }

    public static func candidates(_ inventory: Inventory, ignoreModificationTime: Bool) -> Candidates {
        let inodes = inventory.inodes
        var order = [Int32](0..<Int32(inodes.count))
        order.sort {
            precedes(inodes[Int($0)], $0, inodes[Int($1)], $1, ignoreModificationTime: ignoreModificationTime)
        }
        var result = Candidates()
        var start = 0
        while start < order.count {
            var end = start + 1
            while end < order.count
                && samePreKey(
                    inodes[Int(order[start])], inodes[Int(order[end])], ignoreModificationTime: ignoreModificationTime)
            {
                end += 1
            }
            if end - start > 1 {
                let before = result.members.count
                for m in order[start..<end] {
                    if namesComplete(inodes[Int(m)]) { result.members.append(m) } else { result.incomplete.append(m) }
                }
                if result.members.count > before {
                    result.groupStarts.append(Int32(result.members.count))
                    result.keptWhole.append(true)
                }
            }
            start = end
        }
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

    /// Final groups: candidates whose content and xattrs are known equal.
    public static func groups(_ inventory: Inventory, candidates: Candidates, contents: InodeContents) -> [Group] {
        var result: [Group] = []
        for g in 0..<candidates.groupCount {
            let known = candidates.group(g).filter { contents.isKnown($0) }
                .sorted { (contents.fingerprintID($0), $0) < (contents.fingerprintID($1), $1) }
            var start = 0
            while start < known.count {
                var end = start + 1
                while end < known.count && contents.fingerprintID(known[end]) == contents.fingerprintID(known[start]) {
                    end += 1
                }
                if end - start > 1,
                    let group = group(Array(known[start..<end]), inventory: inventory, contents: contents)
                {
                    result.append(group)
                }
                start = end
            }
        }
        result.sort { $0.keeper < $1.keeper }
        return result
    }

    static func group(_ members: [Int32], inventory: Inventory, contents: InodeContents) -> Group? {
        // Keeper: an existing store object (the one with most room), else the inode with most names.
        let objects = members.filter { inventory.inodes[Int($0)].isStoreObject }
        let keeper: Int32
        if let o = objects.min(by: { inventory.inodes[Int($0)].linkCount < inventory.inodes[Int($1)].linkCount }) {
            keeper = o
        } else {
            keeper = members.max { a, b in
                let na = inventory.inodes[Int(a)].nameCount
                let nb = inventory.inodes[Int(b)].nameCount
                return na != nb ? na < nb : a > b
            }!
        }
        // Other store objects stay as they are (they are not re-linked).
        let victims = members.filter { $0 != keeper && !inventory.inodes[Int($0)].isStoreObject }
        if victims.isEmpty { return nil }
        let e = inventory.inodes[Int(keeper)]
        return Group(
            size: e.size, digest: contents.digest(of: keeper)!,
            identity: MetadataIdentity(
                mode: e.mode, uid: e.uid, gid: e.gid, modificationTime: e.modificationTime,
                xattrDigest: contents.xattrDigest(of: keeper)),
            keeper: keeper, victims: victims)
    }
}
