import CHashifyShim
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

// The calls about the process and the host that the engine makes: with the
// file calls of `Directory` and `OpenFile`, the only door to the kernel.

/// Sleeps for `microseconds`. The corresponding C function is `usleep()`.
public func sleep(microseconds: UInt32) { _ = usleep(microseconds) }

/// This process's id. The corresponding C function is `getpid()`.
public func currentProcessID() -> Int32 { getpid() }

/// Whether this process runs as root. The corresponding C function is `getuid()`.
public var isRoot: Bool { getuid() == 0 }

/// The user id this process acts as on files. The corresponding C function is `geteuid()`.
public var effectiveUserID: UInt32 { geteuid() }

/// The memory page size. The corresponding C function is `sysconf(_SC_PAGESIZE)`.
public func pageSize() -> UInt64 { UInt64(sysconf(Int32(_SC_PAGESIZE))) }

/// Whether `path` (a host path, never one inside a guest) names something
/// that exists (and, with `executable`, that this process may run).
/// The corresponding C function is `access()`.
public func hostPathExists(_ path: String, executable: Bool = false) -> Bool {
    access(path, executable ? X_OK : F_OK) == 0
}

/// `path` with every symlink resolved and made absolute, or nil when it does
/// not resolve. For the operator's paths (roots, store), never for paths
/// inside a guest. The corresponding C function is `realpath()`.
public func resolvedPath(_ path: FilePath) -> FilePath? {
    path.withPlatformString { s -> FilePath? in
        guard let r = realpath(s, nil) else { return nil }
        defer { free(r) }
        return FilePath(platformString: r)
    }
}

/// Makes a new directory from `template` ending in `XXXXXX` (mode 0700).
/// The corresponding C function is `mkdtemp()`.
public func makeTemporaryDirectory(_ template: String) throws -> FilePath {
    var t = Array(template.utf8CString)
    guard t.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else { throw Errno(rawValue: errno) }
    return FilePath(String(decoding: t.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
}

/// Removes the empty directory at `path`. The corresponding C function is `rmdir()`.
public func removeEmptyDirectory(_ path: FilePath) throws {
    _ = try path.withPlatformString { p in try retrying { rmdir(p) } }
}

/// Whether `name` matches the shell pattern `pattern` (`*` and `?` never
/// match '/' when `pathname`; a leading '.' only explicitly).
/// The corresponding C function is `fnmatch()` with `FNM_PERIOD`.
public func patternMatches(_ pattern: UnsafePointer<CChar>, _ name: UnsafePointer<CChar>, pathname: Bool) -> Bool {
    fnmatch(pattern, name, FNM_PERIOD | (pathname ? FNM_PATHNAME : 0)) == 0
}

/// The length of a NUL-terminated name. The corresponding C function is `strlen()`.
public func nameLength(_ cName: UnsafePointer<CChar>) -> Int { strlen(cName) }

/// Whether `count` bytes at `a` and `b` are equal. The corresponding C function is `memcmp()`.
public func bytesEqual(_ a: UnsafeRawPointer, _ b: UnsafeRawPointer, count: Int) -> Bool { memcmp(a, b, count) == 0 }

/// How `a` sorts against `b` byte by byte, a prefix first: negative, zero or
/// positive (`lexicographicallyPrecedes` by `memcmp()`, without a call per byte).
public func compareBytes(_ a: [UInt8], _ b: [UInt8]) -> Int {
    let n = min(a.count, b.count)
    let c =
        n == 0
        ? 0
        : a.withUnsafeBufferPointer { pa in b.withUnsafeBufferPointer { memcmp(pa.baseAddress!, $0.baseAddress!, n) } }
    return c != 0 ? Int(c) : a.count - b.count
}

/// `count` bytes from the kernel's random source. The corresponding C function is `getrandom()`.
public func randomBytes(_ count: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    _ = bytes.withUnsafeMutableBytes { hashify_random($0.baseAddress, count) }
    return bytes
}

// MARK: processes

/// Starts `argv` (an absolute program path) with stdin, stdout and stderr on
/// /dev/null and the environment `environment`; returns its pid, or nil when
/// it cannot start. The corresponding C function is `posix_spawn()`.
public func spawnProcess(_ argv: [String], environment: [String]) -> Int32? {
    var pid: pid_t = 0
    var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
    cArgs.append(nil)
    defer { for a in cArgs { free(a) } }
    var env: [UnsafeMutablePointer<CChar>?] = environment.map { strdup($0) } + [nil]
    defer { for e in env { free(e) } }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    for fd: Int32 in [0, 1, 2] {
        posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0)
    }
    guard posix_spawn(&pid, argv[0], &actions, nil, &cArgs, &env) == 0 else { return nil }
    return pid
}

/// Kills a process this one started with SIGKILL and waits for it.
/// The corresponding C functions are `kill()` and `waitpid()`.
public func killAndReap(_ pid: Int32) {
    kill(pid, SIGKILL)
    var status: Int32 = 0
    _ = waitpid(pid, &status, 0)
}

/// Marks this process's anonymous memory mergeable by KSM (inherited by
/// children). The corresponding C function is `prctl(PR_SET_MEMORY_MERGE)`.
public func setMemoryMerge() throws {
    if hashify_set_memory_merge() != 0 { throw Errno(rawValue: errno) }
}

/// Replaces this process with `argv` (searched in PATH); returns only with
/// the reason it could not. The corresponding C function is `execvp()`.
public func execute(_ argv: [String]) -> Errno {
    var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
    cArgs.append(nil)
    defer { for a in cArgs { free(a) } }
    _ = hashify_execvp(argv[0], &cArgs)
    return Errno(rawValue: errno)
}

// MARK: mounts

/// Mounts a filesystem of `type` from `source` on `target` with `options`.
/// The corresponding C function is `mount()`.
public func mountFilesystem(source: String, target: [UInt8], type: String, readOnly: Bool, options: String) throws {
    let r = withCName(target) { t in
        options.withCString { o in hashify_mount(source, t, type, readOnly ? HASHIFY_MS_RDONLY : 0, o) }
    }
    if r != 0 { throw Errno(rawValue: errno) }
}

/// Unmounts the filesystem mounted on `target`. The corresponding C function is `umount2()`.
public func unmountFilesystem(_ target: FilePath) throws {
    if target.withPlatformString({ hashify_umount($0, 0) }) != 0 { throw Errno(rawValue: errno) }
}

/// Unmounts `target` lazily (`MNT_DETACH`): it leaves the namespace at once
/// and goes when nothing holds it (an overlay holds its layers' mounts).
public func detachFilesystem(_ target: FilePath) throws {
    if target.withPlatformString({ hashify_umount($0, HASHIFY_MNT_DETACH) }) != 0 { throw Errno(rawValue: errno) }
}

/// Attaches `file` to a free loop device, read-only and with autoclear, and
/// returns the device's path and an open descriptor of it: the device
/// detaches itself once that descriptor is closed and nothing mounts it.
public func attachLoopDevice(_ file: OpenFile) throws -> (path: String, device: OpenFile) {
    var buffer = [CChar](repeating: 0, count: 64)
    let fd = hashify_loop_attach(file.fd, &buffer, buffer.count)
    if fd < 0 { throw Errno(rawValue: errno) }
    return (
        String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), OpenFile(adopting: fd)
    )
}
