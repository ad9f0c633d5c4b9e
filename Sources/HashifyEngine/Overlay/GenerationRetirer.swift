import Dispatch
import Synchronization

/// Removes the generations folds leave behind in the background, while the
/// next guest folds, then the data objects those folds stopped referencing.
///
/// Removing an old generation frees the inodes of its upper layer's files
/// that were copies of objects the store already had, and on a filesystem
/// mounted `-o discard` each free waits for its discard: done in line it
/// was a quarter of a fold after an update. Generations are removed one at
/// a time (each by `ParallelTreeRemoval`'s threads). The objects are removed
/// only in `finish`, once every old generation is gone: while a guest's
/// record holds a generation its state does not name, no object is proven
/// unused (`LayerReferences.unreferenced`). A run killed meanwhile leaves
/// an old generation the guest's next command removes; the guest is its
/// new generation from the switch on.
final class GenerationRetirer: @unchecked Sendable {
    /// What was retired for one guest: the objects its fold removed, or why its old generation stays.
    struct Outcome {
        var objectsRemoved = 0
        var objectsRemovedBytes: UInt64 = 0
        var note: String?

        /// Adds the outcome to the guest's report.
        func apply(to result: inout OverlayReport.Guest) {
            result.objectsRemoved += objectsRemoved
            result.objectsRemovedBytes += objectsRemovedBytes
            if let note { result.notes.append(note) }
        }
    }

    private struct Retired {
        var guest: OverlayGuest
        var generation: Int
        var candidates: Set<[UInt8]>
    }

    private let queue = DispatchQueue(label: "hashify.retire")
    private let group = DispatchGroup()
    private var retired: [Retired] = []
    private let failures = Mutex<[Int: String]>([:])

    /// Removes `guest`'s generations but `generation` in the background; the
    /// objects among `candidates` no guest references are removed by `finish`.
    func retire(_ guest: OverlayGuest, keeping generation: Int, candidates: Set<[UInt8]>) {
        let index = retired.count
        retired.append(Retired(guest: guest, generation: generation, candidates: candidates))
        queue.async(group: group) { [self] in
            do { try guest.removeGenerations(except: generation) } catch {
                failures.withLock {
                    $0[index] =
                        "generation \(generation - 1) could not be removed yet (\(error)); the next command removes it"
                }
            }
        }
    }

    /// Waits for every removal, then removes the objects no guest references
    /// any more; the outcome of each guest retired (`ObjectIdentifier` of its
    /// record). Whether an object is unused is proven once for all the folds'
    /// candidates (every guest's reference lists read once, however many
    /// guests folded); an object is counted for the first guest whose fold
    /// left it. An object that cannot be removed is left for `gc`, and said.
    func finish(session s: Overlay.Session) -> [ObjectIdentifier: Outcome] {
        group.wait()
        let failed = failures.withLock { $0 }
        let unused = LayerReferences.unreferenced(
            retired.reduce(into: Set()) { $0.formUnion($1.candidates) }, store: s.store)
        // Each object removed, with the bytes it held; the rest of `unused` stays (an unlink refused).
        var removed: [[UInt8]: UInt64] = [:]
        var removal = DataObjects.Removal()
        if !unused.isEmpty {
            var bytes: [[UInt8]: UInt64] = [:]
            for r in unused { bytes[r] = (try? s.objects.stat(r))?.allocatedBytes ?? 0 }
            removal = s.objects.remove(unused)
            for r in removal.removed { removed[r] = bytes[r] ?? 0 }
        }
        var counted = Set<[UInt8]>()
        var out: [ObjectIdentifier: Outcome] = [:]
        for (i, r) in retired.enumerated() {
            var outcome = Outcome(note: failed[i])
            var stuck: [any Error] = []
            for object in r.candidates where unused.contains(object) {
                guard let bytes = removed[object] else {
                    if let error = removal.refused[object] { stuck.append(error) }
                    continue
                }
                if counted.insert(object).inserted {
                    outcome.objectsRemoved += 1
                    outcome.objectsRemovedBytes += bytes
                }
            }
            var notes = [outcome.note].compactMap { $0 }
            if let first = stuck.first {
                notes.append(
                    "\(stuck.count) object\(stuck.count == 1 ? "" : "s") its fold left unused could not be removed (\(first)), left for gc"
                )
            }
            if let error = removal.indexError, !r.candidates.isDisjoint(with: removal.removed) {
                notes.append(
                    "the data index could not be rewritten without the objects removed (\(error)); gc rewrites it")
            }
            outcome.note = notes.isEmpty ? nil : notes.joined(separator: "; ")
            out[ObjectIdentifier(r.guest)] = outcome
        }
        retired = []
        return out
    }
}
