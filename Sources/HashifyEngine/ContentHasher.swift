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

/// Establishes the content of candidate inodes on a bounded pool of threads,
/// each with two bounded buffers: SHA-256 for one member of each group of
/// equal size and metadata, an exact byte comparison for the others. A file
/// is only accepted when its inode, size, mtime and ctime are the same before
/// and after the read and its ctime is older than the read (so any later
/// change must move ctime).
public struct ContentHasher: Sendable {
    public var threads: Int
    public var bufferSize = 1 << 20

    public init(threads: Int) { self.threads = max(1, threads) }

    /// Hashes groups of inodes that share size and known metadata. In each
    /// group one member is hashed (SHA-256) and the others are compared with
    /// it byte for byte: an exact comparison, so a member that matches takes
    /// the representative's digest without a second SHA-256 pass. A member
    /// that matches none of the first few representatives is hashed and
    /// becomes one. Every member is still checked like `hash` checks a file.
    public func hashGroups(_ groups: [[Int32]], inventory: Inventory, roots: [Directory],
                           progress: (@Sendable (Int, UInt64) -> Void)? = nil) -> [Int32: HashOutcome] {
        let order = groups.indices.sorted {
            inventory.inodes[Int(groups[$0][0])].stat.size * UInt64(groups[$0].count)
                > inventory.inodes[Int(groups[$1][0])].stat.size * UInt64(groups[$1].count)
        }
        let next = Mutex(0)
        let done = Mutex((0, UInt64(0)))
        let results = Mutex([Int32: HashOutcome]())
        let bufferSize = self.bufferSize
        DispatchQueue.concurrentPerform(iterations: min(threads, max(1, groups.count))) { _ in
            let opener = DirectoryOpener(inventory: inventory, roots: roots)
            let a = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
            defer { a.deallocate(); b.deallocate() }
            while true {
                let i: Int = next.withLock { n in let c = n; n += 1; return c }
                if i >= order.count { break }
                let group = groups[order[i]]
                let outcomes = Self.hashGroup(group, inventory: inventory, opener: opener, a: a, b: b)
                results.withLock { r in for (k, v) in outcomes { r[k] = v } }
                let bytes = outcomes.values.reduce(UInt64(0)) { $0 + $1.bytesRead }
                let (f, t) = done.withLock { d in d.0 += group.count; d.1 += bytes; return d }
                progress?(f, t)
            }
        }
        return results.withLock { $0 }
    }

    struct Representative {
        var file: OpenFile
        var stat: FileStat
        var before: Timestamp
        var digest: ContentDigest
    }

    static func hashGroup(_ group: [Int32], inventory: Inventory, opener: DirectoryOpener,
                          a: UnsafeMutableRawBufferPointer, b: UnsafeMutableRawBufferPointer) -> [Int32: HashOutcome] {
        var out: [Int32: HashOutcome] = [:]
        var reps: [Representative] = []
        for inode in group {
            let entry = inventory.inodes[Int(inode)]
            let nameIndex = entry.names[0]
            var outcome = HashOutcome()
            do {
                let before = coarseNow()
                let dir = try opener.open(inventory.names[Int(nameIndex)].directory)
                let file = try dir.openFileForReading(inventory.fileName(nameIndex))
                let st = try file.stat()
                guard st.isRegular, st.sameContentState(as: entry.stat), st.mode == entry.stat.mode,
                      st.uid == entry.stat.uid, st.gid == entry.stat.gid else {
                    outcome.skip = .changedDuringRun
                    out[inode] = outcome
                    continue
                }
                let xattrs = try file.extendedAttributes()
                var digest: ContentDigest?
                for rep in reps.prefix(4) {
                    let equal = try sameContent(file, rep.file, size: st.size, a: a, b: b)
                    outcome.bytesRead += st.size
                    // The representative must still be what was hashed.
                    guard let rs = try? rep.file.stat(), rs.sameContentState(as: rep.stat), rs.changeTime < rep.before else { break }
                    if equal { digest = rep.digest; break }
                }
                if digest == nil {
                    let (d, _, total) = try digestAndIdentity(of: file, stat: st, buffer: a)
                    outcome.bytesRead += total
                    guard total == st.size else { throw ChangedWhileRead() }
                    digest = d
                    reps.append(Representative(file: file, stat: st, before: before, digest: d))
                }
                let after = try file.stat()
                guard after.sameContentState(as: st), after.changeTime < before else {
                    if reps.last?.file === file { reps.removeLast() }
                    outcome.skip = .changedDuringRun
                    out[inode] = outcome
                    continue
                }
                outcome.digest = digest
                outcome.identity = MetadataIdentity(stat: st, xattrs: xattrs)
                outcome.stat = after
                outcome.verifiedAt = before
            } catch is DirectoryOpener.DirectoryChanged {
                outcome.skip = .changedDuringRun
            } catch is ChangedWhileRead {
                outcome.skip = .changedDuringRun
            } catch {
                let e = errnoCode(error)
                outcome.skip = (e == ENOENT || e == ELOOP || e == ENOTDIR) ? .changedDuringRun : .failed(operation: "read", errno: e)
            }
            out[inode] = outcome
        }
        return out
    }

    struct ChangedWhileRead: Error {}

    /// Byte-for-byte comparison of two open files of `size` bytes (pread, so
    /// no file offset moves); stops at the first difference.
    static func sameContent(_ x: OpenFile, _ y: OpenFile, size: UInt64,
                            a: UnsafeMutableRawBufferPointer, b: UnsafeMutableRawBufferPointer) throws -> Bool {
        var offset: UInt64 = 0
        while offset < size {
            let n = try x.read(into: a, at: offset)
            if n == 0 { return false }
            var got = 0
            while got < n {
                let m = try y.read(into: UnsafeMutableRawBufferPointer(rebasing: b[got..<n]), at: offset + UInt64(got))
                if m == 0 { return false }
                got += m
            }
            if memcmp(a.baseAddress!, b.baseAddress!, n) != 0 { return false }
            offset += UInt64(n)
        }
        return try x.read(into: a, at: size) == 0 && y.read(into: b, at: size) == 0
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
}
