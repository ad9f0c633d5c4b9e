import HashifySystem

/// Shares the process's descriptor limit out among the components that keep
/// descriptors open at the same time (directory caches, hashing threads'
/// open files, objects held under lease, files waiting to be closed), so that
/// their sum stays below the limit and `EMFILE` never turns into a skipped
/// file. `prepareProcessForUnification` raises the soft limit to the hard one
/// first, as long-running tools do.
struct DescriptorBudget {
    /// The store's object prefix directories kept open at most (of 256).
    static var storeDirectories: Int { openFileLimit() >= 4096 ? 256 : 32 }

    /// Kept free for everything else: standard streams, the store, its lock,
    /// index, journal and prefix directories, the walk's chain of open
    /// directories, a margin.
    static var reserved: Int { 64 + storeDirectories }
    let limit: Int

    init(limit: Int = Int(clamping: openFileLimit())) { self.limit = max(limit, Self.reserved + 32) }

    /// What the components may use together.
    var available: Int { limit - Self.reserved }

    /// Objects the linker may hold open under lease at once.
    var heldObjects: Int { max(4, min(512, available / 8)) }

    /// Replaced files that may wait for their background close.
    var pendingCloses: Int { max(2, min(256, available / 8)) }

    /// Threads that close replaced files. Freeing a file's blocks waits for
    /// the device on a `discard` mount; with 16 such waits in flight the
    /// linker no longer waits for them (measured: 4 threads left it waiting,
    /// 16 and 32 were alike).
    var closingThreads: Int { max(1, min(16, pendingCloses / 8)) }

    /// Directories each of `caches` caches may keep open while
    /// `heldElsewhere` descriptors are in use by other components.
    func cacheCapacity(caches: Int, heldElsewhere: Int) -> Int {
        max(4, min(2048, (available - heldElsewhere) / max(1, caches)))
    }

    /// Directories each of the linker's two caches may keep open.
    var linkerCacheCapacity: Int { cacheCapacity(caches: 2, heldElsewhere: heldObjects + pendingCloses + 8) }
}
