import CHashifyShim
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// An open regular file. Closed on deinit (which also drops any lease).
public final class OpenFile: @unchecked Sendable {
    public let fd: Int32

    public init(adopting fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    /// Opens a file named by a whole path, read-only: only for paths the
    /// kernel provides (`/proc/PID/map_files/…`), never for paths inside a guest.
    public static func open(path: [UInt8]) throws -> OpenFile {
        OpenFile(
            adopting: try withCName(path) { p in
                try retrying { hashify_openat(AT_FDCWD, p, O_RDONLY | HASHIFY_O_CLOEXEC, 0) }
            })
    }

    /// Reads a file the operator names by path (a config file): a regular
    /// file of at most `limit` bytes, else `nil` with what it is instead. Opened
    /// without blocking, so a FIFO or device given by mistake cannot hang the run.
    public static func readSmallFile(path: [UInt8], limit: Int) throws -> Result<[UInt8], SmallFileProblem> {
        let f = OpenFile(
            adopting: try withCName(path) { p in
                try retrying { hashify_openat(AT_FDCWD, p, O_RDONLY | O_NONBLOCK | HASHIFY_O_CLOEXEC, 0) }
            })
        guard try f.stat().isRegular else { return .failure(.notRegular) }
        guard let bytes = try f.readAll(limit: limit) else { return .failure(.tooLarge(limit)) }
        return .success(bytes)
    }

    /// Why `readSmallFile` did not read a file.
    public enum SmallFileProblem: Error, CustomStringConvertible {
        case notRegular
        case tooLarge(Int)
        public var description: String {
            switch self {
            case .notRegular: return "not a regular file"
            case .tooLarge(let limit): return "larger than \(limit / 1024) KiB"
            }
        }
    }

    /// The corresponding C function is `fstat()` (as `statx` with `AT_EMPTY_PATH`).
    public func stat() throws -> FileStat {
        var s = hashify_stat()
        _ = try retrying { hashify_fstatx(self.fd, &s) }
        return FileStat(s)
    }

    /// Reads up to buffer.count bytes at the current offset; 0 at end of file.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try retrying { Glibc.read(self.fd, buffer.baseAddress, buffer.count) }
    }

    /// Reads up to buffer.count bytes at offset.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        try retrying { pread(self.fd, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    /// Writes all of bytes.
    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            done += try retrying { Glibc.write(self.fd, bytes.baseAddress! + done, bytes.count - done) }
        }
    }

    public func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0) }
    }

    /// Writes all of bytes at offset, the file offset left as it was.
    /// The corresponding C function is `pwrite()`.
    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { b in
            var done = 0
            while done < b.count {
                done += try retrying {
                    pwrite(self.fd, b.baseAddress! + done, b.count - done, off_t(offset) + off_t(done))
                }
            }
        }
    }

    /// Reads the whole file from offset 0.
    public func readAll() throws -> [UInt8] {
        try readAll(limit: Int.max)!
    }

    /// Reads the whole file from offset 0 if it holds at most `limit` bytes;
    /// nil when it holds more (what is read is bounded: a file the tool is
    /// given may be `/dev/zero`).
    public func readAll(limit: Int) throws -> [UInt8]? {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        var offset: UInt64 = 0
        while true {
            let n = try chunk.withUnsafeMutableBytes { try read(into: $0, at: offset) }
            if n == 0 { return out }
            if out.count + n > limit { return nil }
            out.append(contentsOf: chunk[0..<n])
            offset += UInt64(n)
        }
    }

    /// Bytes of the first `size` bytes of the file that are in the page cache
    /// (`cachestat(2)` where the kernel has it, else `mincore` of a mapping).
    public func cachedBytes(size: UInt64) -> UInt64 {
        let n = hashify_cached_bytes(fd, size)
        return n > 0 ? UInt64(n) : 0
    }

    /// Moves the file offset back to the start. The corresponding C function is `lseek()`.
    public func rewind() throws { _ = try retrying { lseek(self.fd, 0, SEEK_SET) } }

    /// Hints sequential access (`posix_fadvise(POSIX_FADV_SEQUENTIAL)`).
    public func adviseSequential() { _ = hashify_fadvise_sequential(fd) }

    /// Takes a read lease (`fcntl(F_SETLEASE, F_RDLCK)`). Fails with EAGAIN
    /// while anyone has the file open for writing; while held, an open for
    /// writing or a truncate waits until the lease is released.
    public func takeReadLease() throws {
        _ = try retrying { hashify_setlease(self.fd, HASHIFY_F_RDLCK) }
    }

    /// Whether this descriptor still holds its read lease (a lease a writer
    /// waited out is broken by the kernel). `fcntl(F_GETLEASE)`.
    public var holdsReadLease: Bool { hashify_getlease(fd) == HASHIFY_F_RDLCK }

    /// Releases the lease (`fcntl(F_SETLEASE, F_UNLCK)`).
    public func releaseLease() {
        _ = hashify_setlease(fd, HASHIFY_F_UNLCK)
    }

    /// Links this very inode as `name` in `directory` (`linkat(fd, "", …,
    /// AT_EMPTY_PATH)`, which needs CAP_DAC_READ_SEARCH): no name is resolved,
    /// so the link is to the inode that was checked, whatever happened to its names.
    public func link(into directory: Directory, as name: FileName) throws {
        do {
            _ = try name.withCString { n in
                try withCName([UInt8]()) { empty in
                    try retrying { linkat(self.fd, empty, directory.fd, n, HASHIFY_AT_EMPTY_PATH) }
                }
            }
        } catch Errno.noSuchFileOrDirectory {
            // Without CAP_DAC_READ_SEARCH: the same inode through its /proc magic link.
            _ = try name.withCString { n in
                try withCName(Array("/proc/self/fd/\(fd)".utf8)) { p in
                    try retrying { linkat(AT_FDCWD, p, directory.fd, n, AT_SYMLINK_FOLLOW) }
                }
            }
        }
    }

    /// Copies the whole content into `target` (`copy_file_range`).
    public func copyContent(to target: OpenFile, size: UInt64) throws {
        if hashify_copy_all(fd, target.fd, size) != 0 { throw Errno(rawValue: errno) }
    }

    /// Makes `target` hold this file's content: shared extents where the
    /// filesystem can (`FICLONE` on btrfs and XFS), else a copy.
    public func cloneContent(to target: OpenFile, size: UInt64) throws {
        if hashify_clone_file(fd, target.fd) == 0 { return }
        _ = lseek(fd, 0, SEEK_SET)
        try copyContent(to: target, size: size)
    }

    /// Sets atime-preserving mtime (`futimens`).
    public func setModificationTime(_ t: Timestamp) throws {
        _ = try retrying { hashify_set_mtime(self.fd, t.seconds, t.nanoseconds) }
    }

    /// The corresponding C functions are `fchown()` and `fchmod()`.
    public func setOwner(uid: UInt32, gid: UInt32) throws { _ = try retrying { fchown(self.fd, uid, gid) } }
    public func setMode(_ mode: UInt32) throws { _ = try retrying { fchmod(self.fd, mode_t(mode & 0o7777)) } }
    public func sync() throws { _ = try retrying { fsync(self.fd) } }
    public func truncate(_ size: UInt64) throws { _ = try retrying { ftruncate(self.fd, off_t(size)) } }

    /// Frees the file's blocks up to `length`, keeping its size (reads of them give zeros).
    public func punchHole(_ length: UInt64) throws {
        _ = try retrying { hashify_punch_hole(self.fd, Int64(length)) }
    }

    /// Every extended attribute, sorted by name (`flistxattr` + `fgetxattr`).
    public func extendedAttributes() throws -> [ExtendedAttribute] { try extendedAttributesOf(descriptor: fd) }

    /// One extended attribute, or nil when the file has none of that name.
    public func extendedAttribute(_ name: String) -> [UInt8]? { extendedAttributeOf(descriptor: fd, name) }

    /// One extended attribute: nil only when the file has none of that name
    /// (ENODATA); any other failure (EIO, say) throws, so that a read error
    /// is never taken for an absent attribute.
    public func presentExtendedAttribute(_ name: String) throws -> [UInt8]? {
        try presentExtendedAttributeOf(descriptor: fd, name)
    }

    /// Sets one extended attribute (`fsetxattr`).
    public func setExtendedAttribute(_ a: ExtendedAttribute) throws { try setExtendedAttributeOf(descriptor: fd, a) }

    /// Removes one extended attribute (`fremovexattr`; absent is no error).
    public func removeExtendedAttribute(_ name: [UInt8]) throws {
        let failed = withCName(name) { hashify_fremovexattr(fd, $0) != 0 }
        if failed && errno != ENODATA { throw Errno(rawValue: errno) }
    }
}

/// Every extended attribute of an open descriptor, sorted by name.
func extendedAttributesOf(descriptor fd: Int32) throws -> [ExtendedAttribute] {
    try readExtendedAttributes(
        list: { buf, size in hashify_flistxattr(fd, buf, size) },
        get: { name, buf, size in hashify_fgetxattr(fd, name, buf, size) })
}

/// One extended attribute of an open descriptor, or nil (absent, or not readable).
func extendedAttributeOf(descriptor fd: Int32, _ name: String) -> [UInt8]? {
    (try? presentExtendedAttributeOf(descriptor: fd, name)) ?? nil
}

/// `fgetxattr` of one name: nil on ENODATA, the value (of any size), or the error.
func presentExtendedAttributeOf(descriptor fd: Int32, _ name: String) throws -> [UInt8]? {
    while true {
        let size = hashify_fgetxattr(fd, name, nil, 0)
        if size < 0 {
            if errno == ENODATA { return nil }
            if errno == EINTR { continue }
            throw Errno(rawValue: errno)
        }
        var value = [UInt8](repeating: 0, count: max(size, 1))
        let n = value.withUnsafeMutableBytes { hashify_fgetxattr(fd, name, $0.baseAddress, $0.count) }
        if n >= 0 { return Array(value[0..<n]) }
        if errno == ENODATA { return nil }
        // ERANGE: it grew meanwhile; EINTR: again.
        if errno != ERANGE && errno != EINTR { throw Errno(rawValue: errno) }
    }
}

/// `fsetxattr` on an open descriptor.
func setExtendedAttributeOf(descriptor fd: Int32, _ a: ExtendedAttribute) throws {
    _ = try withCName(a.name) { n in
        try a.value.withUnsafeBytes { v in try retrying { hashify_fsetxattr(fd, n, v.baseAddress, v.count) } }
    }
}

/// One extended attribute: name and value as raw bytes.
public struct ExtendedAttribute: Hashable, Sendable {
    public var name: [UInt8]
    public var value: [UInt8]
    public init(name: [UInt8], value: [UInt8]) {
        self.name = name
        self.value = value
    }
}

/// Reads every xattr through the given list/get calls, sorted by name.
func readExtendedAttributes(
    list: (UnsafeMutablePointer<CChar>?, Int) -> Int,
    get: (UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
) throws -> [ExtendedAttribute] {
    var size = 0
    var names = [CChar]()
    while true {
        size = try retrying { list(nil, 0) }
        if size == 0 { return [] }
        names = [CChar](repeating: 0, count: size)
        let n = names.withUnsafeMutableBufferPointer { list($0.baseAddress, size) }
        if n >= 0 {
            size = n
            break
        }
        if errno != ERANGE && errno != EINTR { throw Errno(rawValue: errno) }
    }
    var result: [ExtendedAttribute] = []
    var start = 0
    while start < size {
        var end = start
        while end < size && names[end] != 0 { end += 1 }
        let nameBytes = names[start..<end].map { UInt8(bitPattern: $0) }
        let value: [UInt8] = try names.withUnsafeBufferPointer { nb in
            let namePtr = nb.baseAddress! + start
            while true {
                let vsize = get(namePtr, nil, 0)
                if vsize < 0 {
                    if errno == ENODATA { return [] }
                    if errno == EINTR { continue }
                    throw Errno(rawValue: errno)
                }
                var v = [UInt8](repeating: 0, count: vsize)
                let got = v.withUnsafeMutableBytes { get(namePtr, $0.baseAddress, vsize) }
                if got >= 0 { return Array(v[0..<got]) }
                if errno != ERANGE && errno != EINTR { throw Errno(rawValue: errno) }
            }
        }
        if !nameBytes.isEmpty { result.append(ExtendedAttribute(name: nameBytes, value: value)) }
        start = end + 1
    }
    result.sort { $0.name.lexicographicallyPrecedes($1.name) }
    return result
}

/// Extended attributes of a non-regular entry (a symlink, say), read through
/// `/proc/self/fd/DIRFD/NAME` with the l-variants so the final name is not followed.
public func extendedAttributes(in directory: Directory, of name: FileName) throws -> [ExtendedAttribute] {
    let path = Array("/proc/self/fd/\(directory.fd)/".utf8) + name.bytes
    return try withCName(path) { p in
        try readExtendedAttributes(
            list: { buf, size in hashify_llistxattr(p, buf, size) },
            get: { n, buf, size in hashify_lgetxattr(p, n, buf, size) })
    }
}

/// Sets an xattr on a non-regular entry (`lsetxattr` through /proc/self/fd).
public func setExtendedAttribute(in directory: Directory, of name: FileName, _ a: ExtendedAttribute) throws {
    let path = Array("/proc/self/fd/\(directory.fd)/".utf8) + name.bytes
    _ = try withCName(path) { p in
        try withCName(a.name) { n in
            try a.value.withUnsafeBytes { v in try retrying { hashify_lsetxattr(p, n, v.baseAddress, v.count) } }
        }
    }
}

/// An exclusive `flock(2)` on an open file; released when the file closes.
public func lockExclusively(_ file: OpenFile, wait: Bool) throws {
    _ = try retrying { hashify_flock_exclusive(file.fd, wait ? 0 : 1) }
}
