import CHashifyShim
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// An open directory. Every operation is relative to its descriptor and never
/// follows a symbolic link in the final name (`openat`-family calls with
/// `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`). The descriptor is closed on deinit.
public final class Directory: @unchecked Sendable {
    public let fd: Int32

    public init(adopting fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    /// Opens a directory named by an operator-supplied path (the one place a
    /// path is resolved as a whole; guest paths are never resolved this way).
    /// The corresponding C function is `open()`.
    public static func open(path: FilePath) throws -> Directory {
        let fd = try path.withPlatformString { p in
            try retrying { hashify_openat(AT_FDCWD, p, O_RDONLY | HASHIFY_O_DIRECTORY | HASHIFY_O_CLOEXEC, 0) }
        }
        return Directory(adopting: fd)
    }

    /// Opens the subdirectory `name` without following a symlink.
    /// The corresponding C function is `openat()` with `O_DIRECTORY | O_NOFOLLOW`.
    public func openDirectory(_ name: FileName) throws -> Directory {
        try name.withCString { try openDirectory(cName: $0) }
    }

    public func openDirectory(cName: UnsafePointer<CChar>) throws -> Directory {
        let fd = try retrying {
            hashify_openat(self.fd, cName, O_RDONLY | HASHIFY_O_DIRECTORY | HASHIFY_O_NOFOLLOW | HASHIFY_O_CLOEXEC, 0)
        }
        return Directory(adopting: fd)
    }

    /// Opens the regular file `name` read-only, without following a symlink,
    /// without blocking on a FIFO and (when permitted) without touching atime.
    public func openFileForReading(_ name: FileName) throws -> OpenFile {
        try name.withCString { try openFileForReading(cName: $0) }
    }

    public func openFileForReading(cName: UnsafePointer<CChar>) throws -> OpenFile {
        let base = O_RDONLY | HASHIFY_O_NOFOLLOW | HASHIFY_O_NONBLOCK | HASHIFY_O_CLOEXEC
        do {
            return OpenFile(adopting: try retrying { hashify_openat(self.fd, cName, base | HASHIFY_O_NOATIME, 0) })
        } catch Errno.notPermitted {
            return OpenFile(adopting: try retrying { hashify_openat(self.fd, cName, base, 0) })
        }
    }

    /// Opens the regular file `name` write-only, without following a symlink.
    public func openFileForWriting(_ name: FileName) throws -> OpenFile {
        let fd = try name.withCString { n in
            try retrying { hashify_openat(self.fd, n, O_WRONLY | HASHIFY_O_NOFOLLOW | HASHIFY_O_CLOEXEC, 0) }
        }
        return OpenFile(adopting: fd)
    }

    /// Creates `name` exclusively for writing. The corresponding C function is `openat()` with `O_CREAT | O_EXCL`.
    public func createFile(_ name: FileName, mode: UInt32) throws -> OpenFile {
        let fd = try name.withCString { n in
            try retrying {
                hashify_openat(self.fd, n, O_RDWR | O_CREAT | O_EXCL | HASHIFY_O_NOFOLLOW | HASHIFY_O_CLOEXEC, mode)
            }
        }
        return OpenFile(adopting: fd)
    }

    /// Creates a file without a name in this directory (`O_TMPFILE`): it
    /// vanishes with its descriptor unless linked (`OpenFile.link(into:as:)`).
    /// The corresponding C function is `openat()` with `O_TMPFILE`.
    public func createUnnamedFile(mode: UInt32) throws -> OpenFile {
        let fd = try withCName(Array(".".utf8)) { n in
            try retrying { hashify_openat(self.fd, n, O_RDWR | HASHIFY_O_TMPFILE | HASHIFY_O_CLOEXEC, mode) }
        }
        return OpenFile(adopting: fd)
    }

    /// Opens `name` for reading and writing (the store's lock and index files).
    public func openOrCreateFile(_ name: FileName, mode: UInt32) throws -> OpenFile {
        let fd = try name.withCString { n in
            try retrying { hashify_openat(self.fd, n, O_RDWR | O_CREAT | HASHIFY_O_NOFOLLOW | HASHIFY_O_CLOEXEC, mode) }
        }
        return OpenFile(adopting: fd)
    }

    /// Opens (creating) `name` for appending: each write lands whole at the end,
    /// also when several threads write. `openat()` with `O_APPEND`.
    public func openForAppending(_ name: FileName, mode: UInt32) throws -> OpenFile {
        let fd = try name.withCString { n in
            try retrying {
                hashify_openat(self.fd, n, O_WRONLY | O_APPEND | O_CREAT | HASHIFY_O_NOFOLLOW | HASHIFY_O_CLOEXEC, mode)
            }
        }
        return OpenFile(adopting: fd)
    }

    /// The corresponding C function is `fstatat()` (as `statx`, not following symlinks).
    public func stat(_ name: FileName) throws -> FileStat {
        try name.withCString { try stat(cName: $0) }
    }

    public func stat(cName: UnsafePointer<CChar>) throws -> FileStat {
        var s = hashify_stat()
        _ = try retrying { hashify_statx(self.fd, cName, 0, &s) }
        return FileStat(s)
    }

    /// The attributes of what `name` leads to, a symlink (or a /proc magic
    /// link, an open file's) followed: opened `O_PATH` (nothing read, a
    /// FIFO not waited on), then `fstat`.
    public func statFollowing(_ name: FileName) throws -> FileStat {
        let fd = try name.withCString { n in
            try retrying { hashify_openat(self.fd, n, HASHIFY_O_PATH | HASHIFY_O_CLOEXEC, 0) }
        }
        defer { close(fd) }
        var s = hashify_stat()
        _ = try retrying { hashify_fstatx(fd, &s) }
        return FileStat(s)
    }

    /// The directory's own attributes (`statx(fd, "", AT_EMPTY_PATH)`).
    public func stat() throws -> FileStat {
        var s = hashify_stat()
        _ = try retrying { hashify_fstatx(self.fd, &s) }
        return FileStat(s)
    }

    /// Links `name` here as `newName` in `target`. The corresponding C function is `linkat()`.
    public func link(_ name: FileName, to target: Directory, as newName: FileName) throws {
        _ = try name.withCString { o in
            try newName.withCString { n in try retrying { linkat(self.fd, o, target.fd, n, 0) } }
        }
    }

    /// Renames `name` to `newName` in `target`; `flags` are renameat2's
    /// (`noReplace`, `exchange`). The corresponding C function is `renameat2()`.
    public func rename(_ name: FileName, to target: Directory, as newName: FileName, flags: RenameFlags = []) throws {
        _ = try name.withCString { o in
            try newName.withCString { n in
                try retrying { hashify_renameat2(self.fd, o, target.fd, n, flags.rawValue) }
            }
        }
    }

    /// The corresponding C function is `unlinkat()`.
    public func unlink(_ name: FileName, isDirectory: Bool = false) throws {
        _ = try name.withCString { n in try retrying { unlinkat(self.fd, n, isDirectory ? AT_REMOVEDIR : 0) } }
    }

    /// The corresponding C function is `mkdirat()`.
    public func makeDirectory(_ name: FileName, mode: UInt32) throws {
        _ = try name.withCString { n in try retrying { mkdirat(self.fd, n, mode_t(mode)) } }
    }

    /// The corresponding C function is `symlinkat()`.
    public func makeSymlink(_ name: FileName, target: [UInt8]) throws {
        _ = try name.withCString { n in try withCName(target) { t in try retrying { symlinkat(t, self.fd, n) } } }
    }

    /// The corresponding C function is `readlinkat()`.
    public func readLink(_ name: FileName) throws -> [UInt8] {
        try name.withCString { n in
            var buf = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
            let len = try buf.withUnsafeMutableBytes { b in
                try retrying { readlinkat(self.fd, n, b.baseAddress!.assumingMemoryBound(to: CChar.self), b.count) }
            }
            return Array(buf[0..<len])
        }
    }

    /// Sets the modification time of this directory, leaving atime alone.
    public func setModificationTime(_ t: Timestamp) throws {
        _ = try retrying { hashify_set_mtime(self.fd, t.seconds, t.nanoseconds) }
    }

    /// Sets the modification time of `name` (not following a symlink).
    public func setModificationTime(of name: FileName, _ t: Timestamp) throws {
        _ = try name.withCString { n in try retrying { hashify_set_mtime_at(self.fd, n, t.seconds, t.nanoseconds) } }
    }

    /// The corresponding C function is `fchownat()` with `AT_SYMLINK_NOFOLLOW`.
    public func changeOwner(of name: FileName, uid: UInt32, gid: UInt32) throws {
        _ = try name.withCString { n in try retrying { fchownat(self.fd, n, uid, gid, AT_SYMLINK_NOFOLLOW) } }
    }

    /// The corresponding C function is `mknodat()`.
    public func makeNode(_ name: FileName, mode: UInt32, device: UInt64 = 0) throws {
        _ = try name.withCString { n in try retrying { hashify_mknodat(self.fd, n, mode, device) } }
    }

    /// The corresponding C function is `fchmodat()` (never on a symlink: Linux cannot change a symlink's mode).
    public func changeMode(of name: FileName, _ mode: UInt32) throws {
        _ = try name.withCString { n in try retrying { hashify_fchmodat(self.fd, n, mode & 0o7777) } }
    }

    /// This directory's owner and mode (`fchown()`, `fchmod()`).
    public func changeOwner(uid: UInt32, gid: UInt32) throws { _ = try retrying { fchown(self.fd, uid, gid) } }
    public func changeMode(_ mode: UInt32) throws { _ = try retrying { fchmod(self.fd, mode_t(mode & 0o7777)) } }

    /// This directory's extended attributes, sorted by name (`flistxattr` + `fgetxattr`).
    public func extendedAttributes() throws -> [ExtendedAttribute] { try extendedAttributesOf(descriptor: fd) }

    /// One extended attribute of this directory, or nil when it has none of that name.
    public func extendedAttribute(_ name: String) -> [UInt8]? { extendedAttributeOf(descriptor: fd, name) }

    /// One extended attribute: nil only when the directory has none of that
    /// name (ENODATA); any other failure throws.
    public func presentExtendedAttribute(_ name: String) throws -> [UInt8]? {
        try presentExtendedAttributeOf(descriptor: fd, name)
    }

    /// Sets one extended attribute of this directory (`fsetxattr`).
    public func setExtendedAttribute(_ a: ExtendedAttribute) throws { try setExtendedAttributeOf(descriptor: fd, a) }

    /// Removes one extended attribute of the directory (`fremovexattr`; absent is no error).
    public func removeExtendedAttribute(_ name: String) throws {
        if hashify_fremovexattr(fd, name) != 0 && errno != ENODATA { throw Errno(rawValue: errno) }
    }

    /// Replaces `name` with a file of what `write` writes, in one step, with
    /// the same durability for every file hashify replaces: it is written
    /// under a temporary name (`.NAME.new`), fsync'ed, renamed over `name`,
    /// and the directory fsync'ed; after a crash at any instant `name` holds
    /// the old content or the new one, whole. A failed write leaves `name` as it was.
    public func writeAtomically(_ name: FileName, mode: UInt32 = 0o600, _ write: (OpenFile) throws -> Void) throws {
        let temp = FileName(Array(".".utf8) + name.bytes + Array(".new".utf8))
        try? unlink(temp)
        let f = try createFile(temp, mode: mode)
        do {
            try write(f)
            try f.sync()
            try rename(temp, to: self, as: name)
        } catch {
            try? unlink(temp)
            throw error
        }
        try sync()
    }

    /// Replaces `name` with `bytes` in one step (see `writeAtomically(_:mode:_:)`).
    public func writeAtomically(_ bytes: [UInt8], as name: FileName, mode: UInt32 = 0o600) throws {
        try writeAtomically(name, mode: mode) { try $0.write(bytes) }
    }

    /// Makes this directory's entries durable. The corresponding C function is `fsync()`.
    public func sync() throws { _ = try retrying { fsync(self.fd) } }

    /// The most hard links an inode of this filesystem can have (ext4: 65,000).
    /// The corresponding C function is `fpathconf(_PC_LINK_MAX)`.
    public var linkLimit: Int { Int(fpathconf(fd, Int32(_PC_LINK_MAX))) }

    /// The bytes an unprivileged writer may still use on this filesystem.
    /// The corresponding C function is `fstatvfs()`.
    public func availableBytes() throws -> UInt64 {
        var fs = statvfs()
        _ = try retrying { fstatvfs(self.fd, &fs) }
        return UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
    }

    /// Flushes the whole filesystem this directory is on (`syncfs(2)`).
    public func syncFilesystem() throws { _ = try retrying { hashify_syncfs(self.fd) } }

    /// The filesystem's magic number (`fstatfs(2)`'s `f_type`).
    public var filesystemType: UInt64 { hashify_fs_type(fd) }

    /// The kernel's file handle of `name` (`name_to_handle_at`, the link
    /// itself for a symlink): its type as one byte, then its bytes — the form
    /// overlayfs records a lower file by in its index (`trusted.overlay.origin`).
    public func fileHandle(_ name: FileName) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: 128)
        var length: UInt32 = 128
        var type: Int32 = 0
        let ok = name.withCString { n in hashify_file_handle(fd, n, &out, &length, &type) } == 0
        guard ok, (0...255).contains(type) else { return nil }
        return [UInt8(type)] + out.prefix(Int(length))
    }

    /// The UUID of the btrfs filesystem the directory is on, the same in every
    /// subvolume (`BTRFS_IOC_FS_INFO`); nil when it is not on btrfs.
    public var btrfsFilesystemID: [UInt8]? {
        guard filesystemType == 0x9123_683E else { return nil }
        var out = [UInt8](repeating: 0, count: 16)
        return hashify_btrfs_fsid(fd, &out) == 0 ? out : nil
    }

    /// Whether `other` is on the same filesystem: the same device, or two subvolumes of one btrfs filesystem.
    public func isOnSameFilesystem(as other: Directory) throws -> Bool {
        if try stat().device == other.stat().device { return true }
        guard let mine = btrfsFilesystemID, let theirs = other.btrfsFilesystemID else { return false }
        return mine == theirs
    }

    /// The path through which this very directory is reached without
    /// resolving any name again (`/proc/self/fd/N`), for calls that take a path.
    public var procPath: [UInt8] { Array("/proc/self/fd/\(fd)".utf8) }

    /// Removes everything below this directory, never following a symlink
    /// and never descending into another mount.
    public func removeContents() throws { _ = try removeContents(keeping: { _ in false }) }

    /// Removes `name` and, when it is a directory, everything below it; no error when it is missing.
    public func removeTree(_ name: FileName) throws { _ = try removeTree(name, keeping: { _ in false }) }

    /// Removes everything below this directory as `removeContents()`, but the non-directories
    /// `keep` picks (and the directories that hold them). Returns whether
    /// anything was kept. Iterative (an explicit stack of the directories
    /// being emptied): a tree as deep as descriptors allow needs no deeper call stack.
    public func removeContents(keeping keep: (FileStat) -> Bool) throws -> Bool {
        // Each directory being emptied: its descriptor, its mount, the names still to remove (next last),
        // its name in the one below it in the stack, and whether something below it is kept.
        var open: [(directory: Directory, mount: UInt64, names: [FileName], name: FileName?, kept: Bool)] = [
            (self, try stat().mountID, try entryNames().reversed(), nil, false)
        ]
        // The loop ends when this directory is done: it returns then.
        while true {
            let top = open.count - 1
            guard let name = open[top].names.popLast() else {
                let done = open.removeLast()
                guard let doneName = done.name else { return done.kept }
                if done.kept {
                    open[top - 1].kept = true
                } else {
                    try open[top - 1].directory.unlink(doneName, isDirectory: true)
                }
                continue
            }
            let dir = open[top].directory
            let st = try dir.stat(name)
            if st.isDirectory {
                if st.mountID != open[top].mount { throw Errno.resourceBusy }
                let child = try dir.openDirectory(name)
                open.append((child, st.mountID, try child.entryNames().reversed(), name, false))
            } else if keep(st) {
                open[top].kept = true
            } else {
                try dir.unlink(name)
            }
        }
    }

    /// Removes `name` and, when it is a directory, everything below it but
    /// what `keep` picks (as `removeContents`); no error when it is missing.
    /// Returns whether anything was kept.
    public func removeTree(_ name: FileName, keeping keep: (FileStat) -> Bool) throws -> Bool {
        let st: FileStat
        do { st = try stat(name) } catch Errno.noSuchFileOrDirectory { return false }
        if st.isDirectory {
            if try openDirectory(name).removeContents(keeping: keep) { return true }
            try unlink(name, isDirectory: true)
        } else if keep(st) {
            return true
        } else {
            try unlink(name)
        }
        return false
    }

    /// Calls body for each entry but "." and "..", with the raw NUL-terminated
    /// name, its `d_type` and `d_ino`. Reads with `getdents64(2)` from a
    /// descriptor of its own (`openat(fd, ".")`): a directory's position is
    /// shared by every reader of one open file description, so two threads
    /// listing one `Directory` at once would each miss entries.
    public func forEachEntry(_ body: (UnsafePointer<CChar>, UInt8, UInt64) throws -> Void) throws {
        let own = try openDirectory(cName: ".")
        let size = 64 * 1024
        let buf = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { buf.deallocate() }
        while true {
            let n = try retrying { hashify_getdents64(own.fd, buf, size) }
            if n == 0 { return }
            var off = 0
            while off < n {
                var namePtr: UnsafePointer<CChar>? = nil
                var type: UInt8 = 0
                var ino: UInt64 = 0
                off = hashify_dirent_next(buf, off, &namePtr, &type, &ino)
                guard let name = namePtr else { continue }
                if name[0] == 0x2e && (name[1] == 0 || (name[1] == 0x2e && name[2] == 0)) { continue }
                try body(name, type, ino)
            }
        }
    }

    /// All entry names (but "." and ".."), unsorted.
    public func entryNames() throws -> [FileName] {
        var names: [FileName] = []
        try forEachEntry { p, _, _ in
            names.append(
                FileName(
                    bytes: UnsafeBufferPointer(
                        start: UnsafeRawPointer(p).assumingMemoryBound(to: UInt8.self), count: strlen(p))))
        }
        return names
    }
}

/// Flags of `renameat2(2)`.
public struct RenameFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let noReplace = RenameFlags(rawValue: UInt32(HASHIFY_RENAME_NOREPLACE))
    public static let exchange = RenameFlags(rawValue: UInt32(HASHIFY_RENAME_EXCHANGE))
}
