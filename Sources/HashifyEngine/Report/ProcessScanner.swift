import HashifySystem
import SystemPackage

/// A process that still maps a file whose copy was replaced: it keeps the old
/// copy in memory until it restarts.
public struct StaleProcess: Sendable, Codable {
    public var pid: Int
    public var command: String
    public var staleFiles: Int
}

/// Finds processes mapping given inodes, from /proc/PID/maps.
public enum ProcessScanner {
    static func major(_ dev: UInt64) -> UInt64 { ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff) }
    static func minor(_ dev: UInt64) -> UInt64 { ((dev >> 12) & 0xffff_ff00) | (dev & 0xff) }

    /// Processes that map an inode of `device` for which `isWanted` is true.
    public static func processesMapping(device: UInt64, _ isWanted: (UInt64) -> Bool) -> [StaleProcess] {
        guard let proc = try? Directory.open(path: "/proc") else { return [] }
        let (wantMajor, wantMinor) = (major(device), minor(device))
        var result: [StaleProcess] = []
        for name in (try? proc.entryNames()) ?? [] {
            guard let pid = Int(String(decoding: name.bytes, as: UTF8.self)),
                let pdir = try? proc.openDirectory(name),
                let maps = try? pdir.openFileForReading(FileName("maps")).readAll()
            else { continue }
            var stale = Set<UInt64>()
            for line in maps.split(separator: 0x0a) {
                let f = line.split(separator: 0x20, maxSplits: 5, omittingEmptySubsequences: true)
                guard f.count >= 5 else { continue }
                let devParts = f[3].split(separator: 0x3a)
                guard devParts.count == 2,
                    UInt64(String(decoding: devParts[0], as: UTF8.self), radix: 16) == wantMajor,
                    UInt64(String(decoding: devParts[1], as: UTF8.self), radix: 16) == wantMinor,
                    let inode = UInt64(String(decoding: f[4], as: UTF8.self)), isWanted(inode)
                else { continue }
                stale.insert(inode)
            }
            if stale.isEmpty { continue }
            let comm = (try? pdir.openFileForReading(FileName("comm")).readAll()) ?? []
            result.append(
                StaleProcess(pid: pid, command: escapedPath(comm.filter { $0 != 0x0a }), staleFiles: stale.count))
        }
        return result.sorted { $0.pid < $1.pid }
    }

    /// Whether the process of `/proc/PID` (`pdir`) has a file open below the
    /// path `prefix`, or (`device` given: a mounted guest's own device) any
    /// file of that device, wherever its mount namespace puts it.
    static func holdsFileOpen(_ pdir: Directory, below prefix: [UInt8], device: UInt64?) -> Bool {
        guard let fds = try? pdir.openDirectory(FileName("fd")), let names = try? fds.entryNames() else { return false }
        for n in names {
            if let target = try? fds.readLink(n),
                target.count > prefix.count && target.starts(with: prefix) && target[prefix.count] == 0x2f
            {
                return true
            }
            // The open file itself (the link followed; nothing is opened).
            if let device, let st = try? fds.statFollowing(n), st.device == device {
                return true
            }
        }
        return false
    }

    /// Processes whose root or working directory is the directory `root`
    /// (canonical path `path`, attributes `stat`) or below it, or (a mounted
    /// guest, unless `rootOnly`) that hold a file of it open: by device and inode
    /// (containers in their own mount namespace), by the overlay's own
    /// device when the guest is mounted, and by path.
    public static func processesUsing(
        root path: FilePath, stat: FileStat, ownDevice: Bool, rootOnly: Bool = false
    ) -> [StaleProcess] {
        guard let proc = try? Directory.open(path: "/proc") else { return [] }
        let prefix = Array(path.string.utf8)
        let me = currentProcessID()
        var result: [StaleProcess] = []
        for name in (try? proc.entryNames()) ?? [] {
            guard let pid = Int(String(decoding: name.bytes, as: UTF8.self)), pid != me,
                let pdir = try? proc.openDirectory(name)
            else { continue }
            var inside = false
            for link in rootOnly ? ["root"] : ["root", "cwd"] {
                if let st = try? Directory.open(path: FilePath("/proc/\(pid)/\(link)")).stat(),
                    (st.device == stat.device && st.inode == stat.inode) || (ownDevice && st.device == stat.device)
                {
                    inside = true
                }
                if let target = try? pdir.readLink(FileName(link)),
                    target == prefix
                        || (target.count > prefix.count && target.starts(with: prefix) && target[prefix.count] == 0x2f)
                {
                    inside = true
                }
            }
            // A mounted guest's unmount fails on any open file of it (EBUSY): those holders are named too.
            if !inside && !rootOnly && ownDevice {
                inside = holdsFileOpen(pdir, below: prefix, device: stat.device)
            }
            if !inside { continue }
            let comm = (try? pdir.openFileForReading(FileName("comm")).readAll()) ?? []
            result.append(StaleProcess(pid: pid, command: escapedPath(comm.filter { $0 != 0x0a }), staleFiles: 0))
        }
        return result.sorted { $0.pid < $1.pid }
    }
}
