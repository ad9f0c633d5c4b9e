import Crypto
import Dispatch
import HashifySystem
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The result of hashing one inode.
public struct HashOutcome: Sendable {
    public var digest: ContentDigest?
    public var identity: MetadataIdentity?
    public var skip: SkipReason?
    public var bytesRead: UInt64 = 0
    /// The state the file had while it was read (compared again before linking).
    public var stat: FileStat?
    /// A coarse-clock reading taken before the read (ctime is older).
    public var verifiedAt: Timestamp?
    /// True when the digest came from the store's index (nothing was read).
    public var fromIndex = false
}

/// Hashes candidate inodes with SHA-256 on a bounded pool of threads, each
/// with one bounded buffer, visiting directories in walk order. A file is
/// only accepted when its inode, size, mtime and ctime are the same before
/// and after the read and its ctime is older than the read (so any later
/// change must move ctime).
public struct ContentHasher: Sendable {
    public var threads: Int
    public var bufferSize = 1 << 20

    public init(threads: Int) { self.threads = max(1, threads) }

    final class Results: @unchecked Sendable {
        let buffer: UnsafeMutableBufferPointer<HashOutcome>
        init(count: Int) {
            buffer = .allocate(capacity: count)
            buffer.initialize(repeating: HashOutcome())
        }
        deinit { buffer.deinitialize(); buffer.deallocate() }
    }

    /// Hashes `candidates` (indices into inventory.inodes); the result array
    /// is parallel to `candidates`. `progress` gets (files, bytes) done so far.
    public func hash(_ candidates: [Int32], inventory: Inventory, roots: [Directory],
                     progress: (@Sendable (Int, UInt64) -> Void)? = nil) -> [HashOutcome] {
        if candidates.isEmpty { return [] }
        // Walk order: by the directory of the first name.
        let order = candidates.indices.sorted { a, b in
            let na = inventory.inodes[Int(candidates[a])].names[0], nb = inventory.inodes[Int(candidates[b])].names[0]
            let da = inventory.names[Int(na)].directory, db = inventory.names[Int(nb)].directory
            return da != db ? da < db : na < nb
        }
        let chunk = 64
        let chunks = (order.count + chunk - 1) / chunk
        let next = Mutex(0)
        let done = Mutex((0, UInt64(0)))
        let results = Results(count: candidates.count)
        let workers = min(threads, chunks)
        let bufferSize = self.bufferSize
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
            let opener = DirectoryOpener(inventory: inventory, roots: roots)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
            defer { buffer.deallocate() }
            while true {
                let c: Int = next.withLock { n in let c = n; n += 1; return c }
                if c >= chunks { break }
                var files = 0
                var bytes: UInt64 = 0
                for i in (c * chunk)..<min(order.count, (c + 1) * chunk) {
                    let slot = order[i]
                    let outcome = Self.hashOne(inode: candidates[slot], inventory: inventory, opener: opener, buffer: buffer)
                    results.buffer[slot] = outcome
                    files += 1
                    bytes += outcome.bytesRead
                }
                let (f, b) = done.withLock { d in d.0 += files; d.1 += bytes; return d }
                progress?(f, b)
            }
        }
        return Array(results.buffer)
    }

    /// SHA-256 of the content and the metadata identity of an open file.
    static func digest(of file: OpenFile, buffer: UnsafeMutableRawBufferPointer) throws -> (ContentDigest, MetadataIdentity) {
        let (d, i, _) = try digestAndIdentity(of: file, stat: try file.stat(), buffer: buffer)
        return (d, i)
    }

    static func digestAndIdentity(of file: OpenFile, stat st: FileStat,
                                  buffer: UnsafeMutableRawBufferPointer) throws -> (ContentDigest, MetadataIdentity, UInt64) {
        let xattrs = try file.extendedAttributes()
        if st.size > 1 << 20 { file.adviseSequential() }
        var sha = SHA256()
        var total: UInt64 = 0
        while true {
            let n = try file.read(into: buffer)
            if n == 0 { break }
            sha.update(bufferPointer: UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            total += UInt64(n)
        }
        return (ContentDigest(bytes: Array(sha.finalize())), MetadataIdentity(stat: st, xattrs: xattrs), total)
    }

    static func hashOne(inode: Int32, inventory: Inventory, opener: DirectoryOpener,
                        buffer: UnsafeMutableRawBufferPointer) -> HashOutcome {
        let entry = inventory.inodes[Int(inode)]
        let nameIndex = entry.names[0]
        let expected = entry.stat
        var outcome = HashOutcome()
        do {
            let before = coarseNow()
            let dir = try opener.open(inventory.names[Int(nameIndex)].directory)
            let file = try dir.openFileForReading(inventory.fileName(nameIndex))
            let st = try file.stat()
            guard st.isRegular, st.sameContentState(as: expected), st.mode == expected.mode,
                  st.uid == expected.uid, st.gid == expected.gid else {
                outcome.skip = .changedDuringRun
                return outcome
            }
            let (digest, identity, total) = try digestAndIdentity(of: file, stat: st, buffer: buffer)
            outcome.bytesRead = total
            let after = try file.stat()
            guard total == st.size, after.sameContentState(as: st), after.changeTime < before else {
                outcome.skip = .changedDuringRun
                return outcome
            }
            outcome.digest = digest
            outcome.identity = identity
            outcome.verifiedAt = before
            outcome.stat = after
        } catch is DirectoryOpener.DirectoryChanged {
            outcome.skip = .changedDuringRun
        } catch {
            let e = errnoCode(error)
            outcome.skip = (e == ENOENT || e == ELOOP || e == ENOTDIR) ? .changedDuringRun : .failed(operation: "read", errno: e)
        }
        return outcome
    }
}
