import Dispatch
import HashifySystem
import Synchronization
import SystemPackage

/// Removes a tree as `Directory.removeTree(_:keeping:)` does, with the
/// non-directories unlinked by several threads: one thread walks the tree
/// (depth first, a directory open only while it or a batch of its names is
/// being worked on) and hands out batches of names; the emptied directories
/// are then removed as `removeTree` does. Returns whether anything was kept
/// (the directories holding a kept name stay too).
enum ParallelTreeRemoval {
    /// Names unlinked at once.
    static let threads = 8
    /// Names a batch holds (one directory's).
    static let batchSize = 128

    /// Removes `name` and everything below it; no error when it is missing.
    static func remove(_ name: FileName, in parent: Directory) throws {
        _ = try remove(name, in: parent, keeping: { _ in false })
    }

    static func remove(_ name: FileName, in parent: Directory, keeping keep: (FileStat) -> Bool) throws -> Bool {
        let st: FileStat
        do { st = try parent.stat(name) } catch Errno.noSuchFileOrDirectory { return false }
        if st.isDirectory {
            let unlinker = BatchUnlinker(threads: threads)
            do {
                let dir = try parent.openDirectory(name)
                try unlinkFiles(below: dir, mount: try dir.stat().mountID, keeping: keep, unlinker)
            } catch {
                _ = try? unlinker.finish()
                throw error
            }
            try unlinker.finish()
        }
        return try parent.removeTree(name, keeping: keep)
    }

    /// Hands every non-directory below `dir` that `keep` does not pick to `unlinker`.
    private static func unlinkFiles(
        below dir: Directory, mount: UInt64, keeping keep: (FileStat) -> Bool, _ unlinker: BatchUnlinker
    ) throws {
        var batch: [FileName] = []
        for entry in try dir.entryNames() {
            let st = try dir.stat(entry)
            if st.isDirectory {
                if st.mountID != mount { throw Errno.resourceBusy }
                try unlinkFiles(below: try dir.openDirectory(entry), mount: mount, keeping: keep, unlinker)
            } else if !keep(st) {
                batch.append(entry)
                if batch.count == batchSize {
                    unlinker.unlink(batch, in: dir)
                    batch = []
                }
            }
        }
        if !batch.isEmpty { unlinker.unlink(batch, in: dir) }
    }
}

/// Unlinks batches of names on several threads; `finish` waits and throws the first failure.
private final class BatchUnlinker: @unchecked Sendable {
    private let queue = DispatchQueue(label: "hashify.unlink", attributes: .concurrent)
    private let group = DispatchGroup()
    private let slots: DispatchSemaphore
    private let failure = Mutex<(any Error)?>(nil)

    init(threads: Int) { slots = DispatchSemaphore(value: threads) }

    func unlink(_ names: [FileName], in directory: Directory) {
        slots.wait()
        queue.async(group: group) { [self] in
            defer { slots.signal() }
            do {
                for n in names { try directory.unlink(n) }
            } catch {
                failure.withLock { if $0 == nil { $0 = error } }
            }
        }
    }

    func finish() throws {
        group.wait()
        if let error = failure.withLock({ $0 }) { throw error }
    }
}
