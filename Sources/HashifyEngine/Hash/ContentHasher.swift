import Crypto
import Dispatch
import HashifySystem
import Synchronization
import SystemPackage

/// Establishes the content of candidate inodes on a bounded pool of threads,
/// each with two bounded buffers: SHA-256 for one member of each group of
/// equal size and metadata, an exact byte comparison for the others. A file
/// is only accepted when its inode, size, mtime and ctime are the same before
/// and after the read and its ctime is older than the read (so any later
/// change must move ctime).
public struct ContentHasher: Sendable {
    public var threads: Int
    public var bufferSize = 128 << 10
    /// The representatives of each group that fit in this many bytes side by
    /// side are kept in memory: the others are compared with those bytes, read once.
    public var cacheSize = 1 << 20
    /// When false (a dry run), a group whose every member is read gets no
    /// SHA-256: equality is established by exact comparison alone, and each
    /// distinct content gets a unique stand-in digest (never stored).
    public var needsDigests = true

    public init(threads: Int) { self.threads = max(1, threads) }

    /// Hashes groups of inodes that share size and known metadata. In each
    /// group one member is hashed (SHA-256) and the others are compared with
    /// it byte for byte: an exact comparison, so a member that matches takes
    /// the representative's digest without a second SHA-256 pass. A member
    /// that matches none of the first few representatives is hashed and
    /// becomes one. Every member is still checked like `hash` checks a file.
    /// What hashing could not establish, and how much it read.
    public struct Outcome: Sendable {
        public var skips: [(inode: Int32, reason: SkipReason)] = []
        public var bytesRead: UInt64 = 0
    }

    public func hashGroups(
        _ groups: Planner.Candidates, inventory: Inventory, roots: [Directory], contents: InodeContents,
        progress: (@Sendable (Int, UInt64) -> Void)? = nil
    ) -> Outcome {
        // Groups in the walk order of their first member: consecutive groups
        // then lie in the same directories, which stay open in each thread's cache.
        let order = (0..<groups.groupCount).sorted { groups.group($0).first! < groups.group($1).first! }
        let next = Mutex(0)
        let done = Mutex((0, UInt64(0)))
        let result = Mutex(Outcome())
        let (bufferSize, cacheSize, needsDigests) = (self.bufferSize, self.cacheSize, self.needsDigests)
        let standIns = Atomic<UInt64>(0)
        DispatchQueue.concurrentPerform(iterations: min(threads, max(1, groups.groupCount))) { _ in
            let workers = min(threads, max(1, groups.groupCount))
            let opener = DirectoryOpener(
                inventory: inventory, roots: roots,
                capacity: DescriptorBudget().cacheCapacity(
                    caches: workers,
                    heldElsewhere: workers * (Self.comparedRepresentatives + 2)))
            let a = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
            let cache = UnsafeMutableRawBufferPointer.allocate(byteCount: cacheSize, alignment: 4096)
            defer {
                a.deallocate()
                b.deallocate()
                cache.deallocate()
            }
            var mine = Outcome()
            while true {
                let i: Int = next.withLock { n in
                    let c = n
                    n += 1
                    return c
                }
                if i >= order.count { break }
                let group = groups.group(order[i])
                var standIn: (() -> ContentDigest)?
                if !needsDigests && groups.keptWhole[order[i]] {
                    standIn = { ContentDigest(standIn: standIns.add(1, ordering: .relaxed).newValue) }
                }
                Self.hashGroup(
                    group, inventory: inventory, opener: opener, contents: contents, into: &mine, a: a, b: b,
                    cache: cache, standIn: standIn)
                // Progress in candidate bytes finished (what the total counts), not bytes read.
                let groupBytes = group.reduce(UInt64(0)) { $0 + inventory.inodes[Int($1)].size }
                let (f, t) = done.withLock { d in
                    d.0 += group.count
                    d.1 += groupBytes
                    return d
                }
                progress?(f, t)
            }
            result.withLock { r in
                r.skips += mine.skips
                r.bytesRead += mine.bytesRead
            }
        }
        return result.withLock { r in
            r.skips.sort { $0.inode < $1.inode }
            return r
        }
    }

    /// How many representatives of a group each member is compared with.
    static let comparedRepresentatives = 4

    struct Representative {
        var file: OpenFile
        var stat: FileStat
        var before: Timestamp
        var digest: ContentDigest
        /// Where its bytes (the very bytes hashed) are in the cache, if they are.
        var cacheOffset: Int?
    }

    static func hashGroup(
        _ group: ArraySlice<Int32>, inventory: Inventory, opener: DirectoryOpener, contents: InodeContents,
        into out: inout Outcome, a: UnsafeMutableRawBufferPointer, b: UnsafeMutableRawBufferPointer,
        cache: UnsafeMutableRawBufferPointer, standIn: (() -> ContentDigest)? = nil
    ) {
        var reps: [Representative] = []
        for inode in group {
            let entry = inventory.inodes[Int(inode)]
            let nameIndex = entry.firstName
            do {
                let before = coarseNow()
                let dir = try opener.open(inventory.names[Int(nameIndex)].directory)
                let file = try opener.retryingWhenOutOfDescriptors {
                    try dir.openFileForReading(inventory.fileName(nameIndex))
                }
                let st = try file.stat()
                guard st.isRegular, entry.matches(st) else {
                    out.skips.append((inode, .changedDuringRun))
                    continue
                }
                let xattrs = try file.extendedAttributes()
                var digest: ContentDigest?
                if st.size > UInt64(cache.count) {
                    // Large: every member is hashed, one read each, and the
                    // digests tell the contents apart (no representative re-read).
                    let (d, total) = try contentDigest(of: file, size: st.size, buffer: a)
                    out.bytesRead += total
                    guard total == st.size else { throw ChangedWhileRead() }
                    digest = d
                }
                for rep in reps.prefix(Self.comparedRepresentatives) where digest == nil {
                    if let offset = rep.cacheOffset {
                        // Compared with the bytes that were hashed.
                        out.bytesRead += st.size
                        if try sameContent(
                            file, UnsafeRawBufferPointer(rebasing: cache[offset..<offset + Int(st.size)]), buffer: a)
                        {
                            digest = rep.digest
                        }
                        continue
                    }
                    let equal = try sameContent(file, rep.file, size: st.size, a: a, b: b)
                    out.bytesRead += st.size * 2
                    // The representative must still be what was hashed.
                    guard let rs = try? rep.file.stat(), rs.sameContentState(as: rep.stat), rs.changeTime < rep.before
                    else { break }
                    if equal { digest = rep.digest }
                }
                if digest == nil {
                    // The representatives that fit side by side in the cache are kept there,
                    // so members are compared with them without reading them again.
                    let offset = reps.count * Int(st.size)
                    let cacheOffset =
                        reps.count < Self.comparedRepresentatives && UInt64(offset) + st.size <= UInt64(cache.count)
                        ? offset : nil
                    // Only the representatives every later member is compared with may go
                    // without SHA-256; the rest are told apart by their digests.
                    let standIn = reps.count < Self.comparedRepresentatives ? standIn : nil
                    let (d, total) =
                        try cacheOffset.map {
                            try readAndDigest(
                                file, size: st.size, into: UnsafeMutableRawBufferPointer(rebasing: cache[$0...]),
                                standIn: standIn)
                        } ?? contentDigest(of: file, size: st.size, buffer: a, standIn: standIn)
                    out.bytesRead += total
                    guard total == st.size else { throw ChangedWhileRead() }
                    digest = d
                    // Only the representatives later members are compared with stay open.
                    if reps.count < Self.comparedRepresentatives {
                        reps.append(
                            Representative(file: file, stat: st, before: before, digest: d, cacheOffset: cacheOffset))
                    }
                }
                let after = try file.stat()
                guard after.sameContentState(as: st), after.changeTime < before else {
                    if reps.last?.file === file { reps.removeLast() }
                    out.skips.append((inode, .changedDuringRun))
                    continue
                }
                contents.record(inode, digest: digest!, xattrDigest: MetadataIdentity.digest(of: xattrs))
            } catch is DirectoryOpener.DirectoryChanged {
                out.skips.append((inode, .changedDuringRun))
            } catch is ChangedWhileRead {
                out.skips.append((inode, .changedDuringRun))
            } catch {
                let e = errnoCode(error)
                out.skips.append(
                    (
                        inode,
                        (e == .noSuchFileOrDirectory || e == .tooManySymbolicLinkLevels || e == .notDirectory)
                            ? .changedDuringRun
                            : .failed(OperationError(.read, error))
                    ))
            }
        }
    }

    struct ChangedWhileRead: Error {}

    /// Reads the whole file (`size` bytes) into `cache` and hashes it there.
    static func readAndDigest(
        _ file: OpenFile, size: UInt64, into cache: UnsafeMutableRawBufferPointer,
        standIn: (() -> ContentDigest)? = nil
    ) throws -> (ContentDigest, UInt64) {
        let n = try readFully(file, into: UnsafeMutableRawBufferPointer(rebasing: cache[0..<Int(size)]), at: 0)
        if let standIn { return (standIn(), UInt64(n)) }
        var sha = SHA256()
        sha.update(bufferPointer: UnsafeRawBufferPointer(rebasing: cache[0..<n]))
        return (ContentDigest(sha.finalize()), UInt64(n))
    }

    /// Reads until `buffer` is full or the file ends; returns the bytes read.
    static func readFully(_ file: OpenFile, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int
    {
        var got = 0
        while got < buffer.count {
            let m = try file.read(
                into: UnsafeMutableRawBufferPointer(rebasing: buffer[got...]), at: offset + UInt64(got))
            if m == 0 { break }
            got += m
        }
        return got
    }

    /// Whether the file's first `bytes.count` bytes are `bytes`; stops at the
    /// first difference. (Its size was checked before and is checked after.)
    static func sameContent(_ x: OpenFile, _ bytes: UnsafeRawBufferPointer, buffer: UnsafeMutableRawBufferPointer)
        throws -> Bool
    {
        var offset = 0
        while offset < bytes.count {
            let want = min(buffer.count, bytes.count - offset)
            let n = try readFully(
                x, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want]), at: UInt64(offset))
            if n < want || !bytesEqual(buffer.baseAddress!, bytes.baseAddress! + offset, count: n) { return false }
            offset += n
        }
        return true
    }

    /// Byte-for-byte comparison of two open files over `size` bytes (pread, so
    /// no file offset moves); stops at the first difference. (Both sizes
    /// were checked before and are checked after.)
    static func sameContent(
        _ x: OpenFile, _ y: OpenFile, size: UInt64,
        a: UnsafeMutableRawBufferPointer, b: UnsafeMutableRawBufferPointer
    ) throws -> Bool {
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
            if !bytesEqual(a.baseAddress!, b.baseAddress!, count: n) { return false }
            offset += UInt64(n)
        }
        return true
    }

    /// SHA-256 of the content and the metadata identity of an open file.
    static func digest(of file: OpenFile, buffer: UnsafeMutableRawBufferPointer) throws -> (
        ContentDigest, MetadataIdentity
    ) {
        let st = try file.stat()
        let xattrs = try file.extendedAttributes()
        let (d, _) = try contentDigest(of: file, size: st.size, buffer: buffer)
        return (d, MetadataIdentity(stat: st, xattrs: xattrs))
    }

    /// SHA-256 of the content of an open file read from its current offset to the end.
    static func contentDigest(
        of file: OpenFile, size: UInt64, buffer: UnsafeMutableRawBufferPointer,
        standIn: (() -> ContentDigest)? = nil
    ) throws -> (ContentDigest, UInt64) {
        if size > 1 << 20 { file.adviseSequential() }
        var sha = SHA256()
        var total: UInt64 = 0
        while total < size {
            let n = try file.read(
                into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(min(UInt64(buffer.count), size - total))]))
            if n == 0 { break }
            if standIn == nil { sha.update(bufferPointer: UnsafeRawBufferPointer(rebasing: buffer[0..<n])) }
            total += UInt64(n)
        }
        return (standIn?() ?? ContentDigest(sha.finalize()), total)
    }
}
