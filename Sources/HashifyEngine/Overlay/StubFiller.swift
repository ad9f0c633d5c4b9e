import Dispatch
import HashifySystem
import Synchronization

/// Hashes the files of a generation being described on several threads and
/// finds or makes the object of each, so that walking the tree (one thread)
/// overlaps reading (as many as the disk serves). Each file's redirect is
/// kept under the key it was queued with (`results`); `finish` waits for
/// every file and throws the first error: the generation is written only after that.
final class StubFiller: @unchecked Sendable {
    /// What the filler counted, merged into the guest's report at the end.
    struct Counts {
        var objectsCreated = 0
        var filesSharingObjects = 0
        var bytesLinked: UInt64 = 0
        var bytesCopied: UInt64 = 0
    }

    /// The first failure of a worker (rethrown by `finish`: bad input stays bad input).
    struct Failure: Error, CustomStringConvertible {
        var message: String
        var isInputError: Bool
        var description: String { message }
    }

    private let objects: DataObjects
    private let objectLock = Mutex(())
    private let queue = DispatchQueue(label: "hashify.stubs", attributes: .concurrent)
    private let group = DispatchGroup()
    private let slots: DispatchSemaphore
    private let buffers: Mutex<[ReadBuffer]>
    private let state = Mutex<(counts: Counts, error: Failure?)>((Counts(), nil))
    /// The objects this filler made (a conversion that fails removes them again).
    private let made = Mutex<Set<[UInt8]>>([])
    var objectsMade: Set<[UInt8]> { made.withLock { $0 } }
    /// For each file queued (by its key): its object's redirect.
    private let resolved = Mutex<[Int: [UInt8]]>([:])
    var results: [Int: [UInt8]] { resolved.withLock { $0 } }

    /// `threads` files are read at once (each holds its source, its stub and a 1 MiB buffer).
    init(objects: DataObjects, threads: Int) {
        self.objects = objects
        slots = DispatchSemaphore(value: threads)
        buffers = Mutex((0..<threads).map { _ in ReadBuffer() })
    }

    deinit { group.wait() }

    /// Queues `file` (open): it is hashed (under a read lease when `lease`),
    /// its object found or made (the source inode linked when `linkSource`),
    /// and the object's redirect kept under `key` (`results`).
    func fill(_ file: TreeCopier.SourceFile, lease: Bool, linkSource: Bool, key: Int) {
        if state.withLock({ $0.error != nil }) { return }
        let (handle, stat, path) = (file.handle, file.stat, file.path)
        slots.wait()
        group.enter()
        queue.async { [self] in
            defer {
                slots.signal()
                group.leave()
            }
            let buffer = buffers.withLock { $0.removeLast() }
            defer { buffers.withLock { $0.append(buffer) } }
            do {
                let (f, digest) = try Overlay.leasedDigest(
                    handle, stat: stat, path: path, buffer: buffer.bytes, lease: lease)
                try? f.rewind()
                var counts = Counts()
                let redirect: [UInt8] = try objectLock.withLock { _ in
                    if let r = objects.redirect(for: digest) {
                        counts.filesSharingObjects += 1
                        return r
                    }
                    let r = try objects.publish(f, digest: digest, size: stat.size, linkSource: linkSource)
                    made.withLock { _ = $0.insert(r) }
                    counts.objectsCreated += 1
                    if linkSource {
                        counts.bytesLinked += stat.allocatedBytes
                    } else {
                        counts.bytesCopied += stat.allocatedBytes
                    }
                    return r
                }
                resolved.withLock { $0[key] = redirect }
                state.withLock {
                    $0.counts.objectsCreated += counts.objectsCreated
                    $0.counts.filesSharingObjects += counts.filesSharingObjects
                    $0.counts.bytesLinked += counts.bytesLinked
                    $0.counts.bytesCopied += counts.bytesCopied
                }
            } catch {
                let failure = Failure(message: "\(error)", isInputError: error is InputError)
                state.withLock { if $0.error == nil { $0.error = failure } }
            }
        }
    }

    /// Whether a redirect names a live object (the fold asks while files are being filled).
    func isLive(_ redirect: [UInt8]) -> Bool {
        objectLock.withLock { _ in objects.isLive(redirect) }
    }

    /// Waits for every queued file; throws the first error.
    func finish() throws -> Counts {
        group.wait()
        let (counts, error) = state.withLock { ($0.counts, $0.error) }
        if let error { throw error.isInputError ? InputError(error.message) as any Error : error }
        return counts
    }
}

/// A 1 MiB read buffer a worker borrows from the filler's pool.
private final class ReadBuffer: @unchecked Sendable {
    let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
    deinit { bytes.deallocate() }
}
