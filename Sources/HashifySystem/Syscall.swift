import CHashifyShim
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Runs a call that returns -1 and sets errno on failure, retrying on EINTR.
@inline(__always)
func retrying<T: FixedWidthInteger>(_ call: () -> T) throws -> T {
    while true {
        let r = call()
        if r >= 0 { return r }
        let e = errno
        if e == EINTR { continue }
        throw Errno(rawValue: e)
    }
}

/// Raises the open-file limit to its hard limit (deep trees hold one
/// descriptor per level) and ignores SIGIO (lease breaks) and SIGPIPE.
public func prepareProcessForUnification() -> UInt64 {
    hashify_ignore_lease_signals()
    hashify_tune_malloc()
    return hashify_raise_fd_limit()
}

/// The process's current limit on open descriptors.
public func openFileLimit() -> UInt64 {
    var limit = rlimit()
    guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 1024 }
    return UInt64(limit.rlim_cur)
}

/// The processors online (`sysconf(_SC_NPROCESSORS_ONLN)`), at least 1.
public func onlineProcessors() -> Int { max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))) }

/// The process's peak resident set size in bytes.
public func peakResidentBytes() -> UInt64 {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return UInt64(max(0, usage.ru_maxrss)) * 1024
}

/// The running kernel's release as (major, minor), from uname(2).
public func kernelVersion() -> (Int, Int) {
    var u = utsname()
    uname(&u)
    let release = withUnsafeBytes(of: u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    let parts = release.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
    return parts.count == 2 ? (parts[0], parts[1]) : (0, 0)
}
