import Dispatch
import HashifySystem
import Synchronization
import SystemPackage

/// Removes a tree as `Directory.removeTree(_:keeping:)` does, with the
/// non-directories unlinked by several threads: one thread walks the tree
/// (`TreeTraversal`) and hands out batches of one directory's names; the
/// emptied directories are then removed as `removeTree` does. Returns whether anything was kept
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
                try unlinkFiles(below: try parent.openDirectory(name), keeping: keep, unlinker)
            } catch {
                _ = try? unlinker.finish()
                throw error
            }
            try unlinker.finish()
        }
        return try parent.removeTree(name, keeping: keep)
    }

    /// Hands every non-directory below `dir` that `keep` does not pick to
    /// `unlinker`, in batches of one directory's names (`TreeTraversal`: an
    /// explicit stack, whatever the depth; a mount inside fails the removal).
    private static func unlinkFiles(below dir: Directory, keeping keep: (FileStat) -> Bool, _ unlinker: BatchUnlinker)
        throws
    {
        var batch: [FileName] = []
        var batchDirectory = dir
        func flush() {
            if !batch.isEmpty { unlinker.unlink(batch, in: batchDirectory) }
            batch = []
        }
        var traversal = TreeTraversal<Void>()
        try traversal.run(dir, context: ()) { entry, _ in
            if entry.stat.isDirectory { return .enter(()) }
            if keep(entry.stat) { return .next }
            if entry.directory !== batchDirectory || batch.count == batchSize {
                flush()
                batchDirectory = entry.directory
            }
            batch.append(entry.name)
            return .next
        }
        flush()
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
