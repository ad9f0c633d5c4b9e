import CHashifyShim

/// The inode attributes hashify reads with `statx(2)`.
public struct FileStat: Hashable, Sendable {
    public var device: UInt64
    public var inode: UInt64
    public var size: UInt64
    /// Allocated 512-byte blocks (what `du` counts).
    public var blocks: UInt64
    /// Mount id; two entries on one device but different mounts differ here.
    public var mountID: UInt64
    public var attributes: UInt64
    public var modificationTime: Timestamp
    public var changeTime: Timestamp
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var linkCount: UInt32
    /// The device a character or block device node stands for.
    public var deviceNumber: UInt64

    init(_ s: hashify_stat) {
        device = s.dev
        inode = s.ino
        size = s.size
        blocks = s.blocks
        mountID = s.mnt_id
        attributes = s.attributes
        modificationTime = Timestamp(seconds: s.mtime_sec, nanoseconds: s.mtime_nsec)
        changeTime = Timestamp(seconds: s.ctime_sec, nanoseconds: s.ctime_nsec)
        mode = s.mode
        uid = s.uid
        gid = s.gid
        linkCount = s.nlink
        deviceNumber = s.rdev
    }

    public var fileType: UInt32 { mode & 0o170000 }
    public var isRegular: Bool { fileType == 0o100000 }
    public var isDirectory: Bool { fileType == 0o040000 }
    public var isSymlink: Bool { fileType == 0o120000 }
    /// Immutable or append-only: hashify never touches such inodes.
    public var isImmutableOrAppendOnly: Bool {
        attributes & (HASHIFY_ATTR_IMMUTABLE | HASHIFY_ATTR_APPEND) != 0
    }
    /// Allocated bytes on disk.
    public var allocatedBytes: UInt64 { blocks &* 512 }

    /// True when both observations show the same content state: same device,
    /// inode, size, mtime and ctime (a change of content moves ctime).
    public func sameContentState(as other: FileStat) -> Bool {
        inode == other.inode && device == other.device && size == other.size
            && modificationTime == other.modificationTime && changeTime == other.changeTime
    }
}

/// The coarse realtime clock, the clock the kernel stamps ctime with.
/// A file whose ctime is strictly earlier than a reading of this clock taken
/// before it was read cannot change afterwards without its ctime moving.
public func coarseNow() -> Timestamp {
    var s: Int64 = 0
    var ns: UInt32 = 0
    hashify_coarse_now(&s, &ns)
    return Timestamp(seconds: s, nanoseconds: ns)
}
