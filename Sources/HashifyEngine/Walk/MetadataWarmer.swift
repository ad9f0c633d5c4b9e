import Dispatch
import HashifySystem
import Synchronization

/// Reads ahead of the walk on a cold cache: a second thread lists and stats
/// the guests from the last one backwards while the walk goes forwards, and
/// stops where they meet. It records nothing; it only brings directories and
/// inodes into the kernel's caches, so that each metadata read from disk is
/// waited for once, by one of the two. Same rules as the walk: descriptors
/// opened with `O_NOFOLLOW` relative to their parent, no mount crossed, no
/// excluded directory entered.
final class MetadataWarmer: Sendable {
    private let roots: [GuestRoot]
    private let filters: [PathFilter]
    /// The guest the walk is in (the warmer stops at it).
    private let walking = Atomic(0)
    private let stopped = Atomic(false)
    private let done = DispatchGroup()

    /// `filters[g]` is guest g's filter (the walk's).
    init(roots: [GuestRoot], filters: [PathFilter]) {
        self.roots = roots
        self.filters = filters
    }

    func start() {
        guard roots.count > 1 else { return }
        DispatchQueue.global().async(group: done) { self.run() }
    }

    /// The walk has begun guest `g`.
    func walkReached(_ g: Int) { walking.store(g, ordering: .relaxed) }

    /// Stops the warmer and waits for it.
    func stop() {
        stopped.store(true, ordering: .relaxed)
        done.wait()
    }

    private func shouldStop(_ g: Int) -> Bool {
        stopped.load(ordering: .relaxed) || walking.load(ordering: .relaxed) >= g
    }

    private func run() {
        for g in stride(from: roots.count - 1, to: 0, by: -1) {
            if shouldStop(g) { return }
            warm(g)
        }
    }

    private func warm(_ g: Int) {
        let root = roots[g]
        let filter = filters[g]
        // Directories to visit, opened only when their turn comes.
        var pending: [(parent: Directory?, name: [UInt8], path: [UInt8], scope: PathFilter.Scope)] = [
            (nil, [], [], filter.rootScope)
        ]
        while let (parent, name, path, scope) = pending.popLast() {
            if shouldStop(g) { return }
            // Every directory, the root too, through a descriptor of its own: a
            // listing moves its descriptor's offset, and the walk lists the
            // root through `root.directory` (sharing it lost the walk entries).
            guard
                let dir = try? withCName(
                    name.isEmpty ? [0x2e] : name, { try (parent ?? root.directory).openDirectory(cName: $0) })
            else { continue }
            try? dir.forEachEntry { cName, type, _ in
                // Symlinks, devices, fifos and sockets need no inode read by the walk.
                if type == 10 || type == 1 || type == 2 || type == 6 || type == 12 { return }
                guard let st = try? dir.stat(cName: cName), st.isDirectory else { return }
                guard st.mountID == root.stat.mountID, st.device == root.stat.device else { return }
                // The walk's own decision for this directory (same filter, same scope rules).
                let entry = PathFilter.Name(cString: cName, count: nameLength(cName))
                func sub() -> [UInt8] { path + [0x2f] + Array(entry.bytes) }
                let s = filter.enter(scope, entry, path: sub)
                if s.verdict != .excluded { pending.append((dir, Array(entry.bytes), sub(), s)) }
            }
        }
    }
}
