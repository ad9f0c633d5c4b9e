import Dispatch
import HashifySystem
import Synchronization

/// Removes the plain trees converted guests leave in the store (their data
/// lives on in the objects) on one background thread, while the next guest
/// is converted: unlinking a guest's ten thousand names costs about an eighth
/// of a conversion. A tree not removed (killed meanwhile) is removed by the
/// guest's next command (`removeGenerations` takes the scratch trees). The
/// first failure is rethrown by `finish`.
final class BackgroundRemover: @unchecked Sendable {
    private let queue = DispatchQueue(label: "hashify.remove")
    private let group = DispatchGroup()
    private let failure = Mutex<(any Error)?>(nil)

    func remove(_ name: FileName, in directory: Directory) {
        queue.async(group: group) { [self] in
            do { try directory.removeTree(name) } catch {
                failure.withLock { if $0 == nil { $0 = error } }
            }
        }
    }

    /// Waits for every removal; throws the first failure.
    func finish() throws {
        group.wait()
        if let error = failure.withLock({ $0 }) { throw error }
    }
}
