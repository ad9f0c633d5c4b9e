import Dispatch
import HashifySystem
import Synchronization

/// Removes the plain trees converted guests leave in the store (their data
/// lives on in the objects) in the background, while the next guest is
/// converted. Removing a tree frees the inodes of its files that were
/// duplicates of existing objects, and freeing waits on the disk (a discard
/// per file on a filesystem mounted `-o discard`), so names are unlinked by
/// several threads at once (`ParallelTreeRemoval`): one thread alone took
/// longer per tree than a conversion does.
///
/// A name whose inode has other links (hardlink mode shares inodes between
/// guests) is left for `finish`, when no guest is read any more: unlinking it
/// moves the inode's ctime, and the conversion of a guest reading that inode
/// through its own name would take it for a change made by a running guest.
/// A tree not removed (killed meanwhile) is removed by the guest's next
/// command (`removeGenerations` takes the scratch trees). The first failure
/// is rethrown by `finish`.
final class BackgroundRemover: @unchecked Sendable {
    private let queue = DispatchQueue(label: "hashify.remove")
    private let group = DispatchGroup()
    private let failure = Mutex<(any Error)?>(nil)
    /// Trees whose shared names are left for `finish`.
    private let left = Mutex<[(FileName, Directory)]>([])

    func remove(_ name: FileName, in directory: Directory) {
        queue.async(group: group) { [self] in
            do {
                if try ParallelTreeRemoval.remove(name, in: directory, keeping: { $0.linkCount > 1 }) {
                    left.withLock { $0.append((name, directory)) }
                }
            } catch {
                failure.withLock { if $0 == nil { $0 = error } }
            }
        }
    }

    /// Waits for every removal, then removes what was left; throws the first failure.
    func finish() throws {
        group.wait()
        if let error = failure.withLock({ $0 }) { throw error }
        let trees: [(FileName, Directory)] = left.withLock { l in
            let all = l
            l.removeAll()
            return all
        }
        for (name, directory) in trees { try directory.removeTree(name) }
    }
}
