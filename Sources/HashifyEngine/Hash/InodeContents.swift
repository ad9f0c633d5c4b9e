import HashifySystem
import Synchronization

/// What is known of each walked inode's content, in arrays parallel to
/// `Inventory.inodes`: filled from the store's index, by hashing and by the
/// linker, and written back to the index at the end of a run. Digests and
/// xattr digests are interned: ten thousand distinct contents among a
/// million files cost ten thousand digests, not a million.
///
/// `record` is safe from several threads at once (hashing workers); reading,
/// `reverify` and `forget` are for one thread after hashing.
public final class InodeContents: @unchecked Sendable {
    /// A content digest together with the digest of the extended attributes.
    struct Fingerprint: Hashable {
        var digest: ContentDigest
        var xattrs: Int32
    }

    /// Per inode: index into `fingerprints`, or -1 while unknown.
    private(set) var fingerprintOf: [Int32]
    /// ctime of inodes hashify itself changed while they stayed verified
    /// (linking a name moves ctime), by inode index.
    private(set) var changeTimeAfterLinking: [Int32: Timestamp] = [:]
    private(set) var fingerprints: [Fingerprint] = []
    private var fingerprintIDs: [Fingerprint: Int32] = [:]
    private var xattrDigests: [[UInt8]] = [[]]
    private var xattrIDs: [[UInt8]: Int32] = [[]: 0]
    /// Index records for other filesystems, kept as they are.
    var otherDevices: [ContentIndex.Record] = []
    private let lock = Mutex(())

    public init(count: Int) {
        fingerprintOf = [Int32](repeating: -1, count: count)
    }

    /// True when the inode's content is known.
    public func isKnown(_ inode: Int32) -> Bool { fingerprintOf[Int(inode)] >= 0 }

    /// The content digest of an inode, if known.
    public func digest(of inode: Int32) -> ContentDigest? {
        let f = fingerprintOf[Int(inode)]
        return f < 0 ? nil : fingerprints[Int(f)].digest
    }

    /// The xattr digest of an inode (empty without xattrs or when unknown).
    public func xattrDigest(of inode: Int32) -> [UInt8] {
        let f = fingerprintOf[Int(inode)]
        return f < 0 ? [] : xattrDigests[Int(fingerprints[Int(f)].xattrs)]
    }

    /// An id equal for two inodes exactly when digest and xattr digest are
    /// equal (-1 when unknown).
    func fingerprintID(_ inode: Int32) -> Int32 { fingerprintOf[Int(inode)] }

    /// Records what an inode was verified to hold: its content equalled the
    /// digest at a coarse-clock reading later than its ctime (so any later
    /// change moves ctime). Thread-safe.
    public func record(_ inode: Int32, digest: ContentDigest, xattrDigest: [UInt8]) {
        lock.withLock { _ in
            var x = xattrIDs[xattrDigest] ?? -1
            if x < 0 {
                x = Int32(xattrDigests.count)
                xattrDigests.append(xattrDigest)
                xattrIDs[xattrDigest] = x
            }
            let fp = Fingerprint(digest: digest, xattrs: x)
            var id = fingerprintIDs[fp] ?? -1
            if id < 0 {
                id = Int32(fingerprints.count)
                fingerprints.append(fp)
                fingerprintIDs[fp] = id
            }
            fingerprintOf[Int(inode)] = id
        }
    }

    /// Records that hashify's own links moved an inode's ctime while it was
    /// held unchanged (leased); `at` is a coarse-clock reading after `ctime`.
    func reverify(_ inode: Int32, changeTime: Timestamp, at: Timestamp) {
        guard fingerprintOf[Int(inode)] >= 0, changeTime < at else {
            forget(inode)
            return
        }
        changeTimeAfterLinking[inode] = changeTime
    }

    /// Forgets an inode's content (it is gone, or no longer vouched for).
    public func forget(_ inode: Int32) {
        fingerprintOf[Int(inode)] = -1
        changeTimeAfterLinking[inode] = nil
    }

    // MARK: the index

    /// Takes every trusted index record that matches an inode of the
    /// inventory in the state the walk saw; keeps records of other
    /// filesystems. Returns the index's problem, if it was damaged (then
    /// nothing of it is used).
    public func load(from store: Store, inventory: Inventory) -> String? {
        let problem = ContentIndex.read(from: store) { r in
            guard r.key.device == inventory.device else {
                otherDevices.append(r)
                return
            }
            guard r.isTrusted, let i = inventory.index(ofInode: r.key.inode) else { return }
            let e = inventory.inodes[Int(i)]
            guard e.size == r.size, e.modificationTime == r.modificationTime, e.changeTime == r.changeTime,
                fingerprintOf[Int(i)] < 0
            else { return }
            record(i, digest: r.digest, xattrDigest: r.xattrDigest)
        }
        if problem != nil {
            for i in fingerprintOf.indices { fingerprintOf[i] = -1 }
            otherDevices = []
        }
        return problem
    }

    /// Writes the index: a record for every inode whose content is known and
    /// vouched for, and the records of other filesystems. Every inode known
    /// here was verified with its ctime older than the verification (and
    /// seen with that ctime since), so the records carry one `verifiedAt`:
    /// a coarse-clock reading taken now.
    public func save(to store: Store, inventory: Inventory) throws {
        let at = coarseNow()
        func changeTime(_ i: Int) -> Timestamp { changeTimeAfterLinking[Int32(i)] ?? inventory.inodes[i].changeTime }
        func isSaved(_ i: Int) -> Bool { fingerprintOf[i] >= 0 && changeTime(i) < at }
        let count = fingerprintOf.indices.reduce(0) { $0 + (isSaved($1) ? 1 : 0) } + otherDevices.count
        try ContentIndex.write(to: store, count: count) { emit in
            for i in fingerprintOf.indices where isSaved(i) {
                let e = inventory.inodes[i]
                let fp = fingerprints[Int(fingerprintOf[i])]
                emit(
                    ContentIndex.Record(
                        key: InodeKey(device: inventory.device, inode: e.inode), size: e.size,
                        modificationTime: e.modificationTime, changeTime: changeTime(i), verifiedAt: at,
                        digest: fp.digest, xattrDigest: xattrDigests[Int(fp.xattrs)]))
            }
            for r in otherDevices { emit(r) }
        }
    }
}
