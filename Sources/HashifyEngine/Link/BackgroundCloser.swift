import Dispatch
import Synchronization
import HashifySystem

/// Closes replaced files on background threads. The last close of a file
/// whose last name is gone frees its blocks, and on a filesystem mounted with
/// `discard` that waits for the device once per file; done inline it would
/// hold every replacement up by that wait. Nothing of a guest depends on the
/// close: the file has no name left. Bounded: at most `limit` files wait.
final class BackgroundCloser: Sendable {
    private let queues: [DispatchQueue]
    private let group = DispatchGroup()
    private let slots: DispatchSemaphore
    private let next = Atomic(0)

    init(threads: Int = 4, limit: Int = 64) {
        queues = (0..<threads).map { DispatchQueue(label: "hashify.close.\($0)") }
        slots = DispatchSemaphore(value: limit)
    }

    /// Takes over the last reference to `file` and closes it in the background
    /// (which also drops its lease: the file has no name left to open it by).
    func close(_ file: OpenFile) {
        slots.wait()
        let i = next.add(1, ordering: .relaxed).oldValue % queues.count
        let box = Box(file)
        queues[i].async(group: group) { [slots] in
            box.file = nil
            slots.signal()
        }
    }

    /// Waits until every file handed over is closed (and its space freed).
    func finish() { group.wait() }

    private final class Box: @unchecked Sendable {
        var file: OpenFile?
        init(_ file: OpenFile) { self.file = file }
    }
}
