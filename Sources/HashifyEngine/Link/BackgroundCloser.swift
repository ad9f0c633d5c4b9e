import Dispatch
import HashifySystem
import Synchronization

/// Closes replaced files on background threads. The last close of a file
/// whose last name is gone frees its blocks, and on a filesystem mounted with
/// `discard` that waits for the device once per file; done inline it would
/// hold every replacement up by that wait. Nothing of a guest depends on the
/// close: the file has no name left. Files are handed over in small batches
/// (one thread wake-up per batch, not per file) and bounded: at most `limit`
/// files are open waiting, batch included. Used from one thread.
final class BackgroundCloser {
    private let queues: [DispatchQueue]
    private let group = DispatchGroup()
    private let slots: DispatchSemaphore
    private var next = 0
    private let batchSize: Int
    private var batch: [OpenFile] = []

    init(threads: Int, limit: Int) {
        queues = (0..<threads).map { DispatchQueue(label: "hashify.close.\($0)") }
        slots = DispatchSemaphore(value: limit)
        batchSize = max(1, min(16, limit / (threads * 2)))
    }

    /// Takes over the last reference to `file` and closes it in the background
    /// (which also drops its lease: the file has no name left to open it by).
    func close(_ file: OpenFile) {
        slots.wait()
        batch.append(file)
        if batch.count >= batchSize { flush() }
    }

    private func flush() {
        guard !batch.isEmpty else { return }
        let box = Box(batch)
        batch.removeAll(keepingCapacity: true)
        let q = queues[next % queues.count]
        next += 1
        q.async(group: group) { [slots] in
            let n = box.files.count
            box.files.removeAll()
            for _ in 0..<n { slots.signal() }
        }
    }

    /// Waits until every file handed over is closed (and its space freed).
    func finish() {
        flush()
        group.wait()
    }

    private final class Box: @unchecked Sendable {
        var files: [OpenFile]
        init(_ files: [OpenFile]) { self.files = files }
    }
}
