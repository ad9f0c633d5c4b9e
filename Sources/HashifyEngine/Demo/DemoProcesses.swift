import HashifySystem
import SystemPackage

/// The memory half of `hashify demo`: one long-running program per sample
/// guest (a host program copied into each guest with the files it maps, run
/// chrooted), and the total Pss of those processes, before unifying and after
/// a restart.
public struct DemoProcesses {
    /// The program and its arguments: perl when the host has it (it maps a few
    /// MiB of its own), else sleep.
    public var argv: [String]
    public private(set) var pids: [Int32] = []

    public init() {
        argv =
            hostPathExists("/usr/bin/perl", executable: true)
            ? ["/usr/bin/perl", "-e", "my $x = 0; $x += $_ for 1..200000; sleep 3600"]
            : ["/bin/sleep", "3600"]
    }

    /// Why the memory part cannot run here, or nil.
    public static var unavailableReason: String? {
        if !isRoot { return "the memory part needs root (it runs the guests' programs chrooted)" }
        if !hostPathExists("/usr/sbin/chroot", executable: true) { return "no /usr/sbin/chroot" }
        return nil
    }

    static func spawn(_ argv: [String]) -> Int32? {
        spawnProcess(argv, environment: ["LC_ALL=C", "PATH=/usr/bin:/bin"])
    }

    /// The files the program maps when it runs on the host (its libraries), from /proc/PID/maps.
    func mappedFiles() -> [[UInt8]] {
        guard let pid = Self.spawn(argv) else { return [] }
        defer { killAndReap(pid) }
        sleep(microseconds: 300_000)
        guard
            let maps = try? Directory.open(path: FilePath("/proc/\(pid)")).openFileForReading(FileName("maps"))
                .readAll()
        else { return [] }
        var out: [[UInt8]] = []
        for line in maps.split(separator: 0x0a) {
            let f = line.split(separator: 0x20, maxSplits: 5, omittingEmptySubsequences: true)
            guard f.count == 6 else { continue }
            let path = Array(f[5].drop { $0 == 0x20 })
            if path.first == 0x2f, !out.contains(path) { out.append(path) }
        }
        return out
    }

    /// Copies the program, what it maps and the usual ELF interpreter paths into
    /// each guest (symlinks on the way recreated as symlinks), and a /dev/null.
    public func install(into roots: [FilePath]) throws {
        let interpreters: [String] = ["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"].filter {
            hostPathExists($0)
        }
        var paths: [[UInt8]] = [Array(argv[0].utf8)]
        paths += mappedFiles()
        paths += interpreters.map { Array($0.utf8) }
        for r in roots {
            let root = try Directory.open(path: r)
            for p in paths { try Self.copyPath(p, into: root, depth: 0) }
            do { try root.makeDirectory(FileName("dev"), mode: 0o755) } catch Errno.fileExists {}
            try? root.openDirectory(FileName("dev")).makeNode(FileName("null"), mode: 0o020666, device: (1 << 8) | 3)
        }
    }

    /// Recreates host path `p` inside `root`: directories made, symlinks copied
    /// as symlinks (and their targets followed), the final file copied with its attributes.
    static func copyPath(_ p: [UInt8], into root: Directory, depth: Int) throws {
        guard depth < 16 else { return }
        let parts = p.split(separator: 0x2f).map { Array($0) }
        var host = try Directory.open(path: "/")
        var guest = root
        for (i, part) in parts.enumerated() {
            let name = FileName(part)
            guard let st = try? host.stat(name) else { return }
            var rest: [UInt8] = []
            for c in parts[(i + 1)...] { rest += [0x2f] + c }
            var here: [UInt8] = []
            for c in parts[...i] { here += [0x2f] + c }
            if st.isSymlink {
                let target = try host.readLink(name)
                if (try? guest.stat(name)) == nil { try guest.makeSymlink(name, target: target) }
                // Follow the link: absolute, or relative to the directory holding it.
                let base: [UInt8] = target.first == 0x2f ? [] : Array(here.dropLast(part.count + 1))
                let followed: [UInt8] = base + [0x2f] + target + rest
                try copyPath(followed, into: root, depth: depth + 1)
                return
            }
            if st.isDirectory {
                do { try guest.makeDirectory(name, mode: st.mode & 0o7777) } catch Errno.fileExists {}
                host = try host.openDirectory(name)
                guest = try guest.openDirectory(name)
                continue
            }
            guard st.isRegular, (try? guest.stat(name)) == nil else { return }
            let input = try host.openFileForReading(name)
            let out = try guest.createFile(name, mode: 0o600)
            try input.copyContent(to: out, size: st.size)
            try out.setOwner(uid: st.uid, gid: st.gid)
            try out.setMode(st.mode)
            try out.setModificationTime(st.modificationTime)
            return
        }
    }

    /// Starts the program in each guest (chrooted).
    public mutating func start(in roots: [FilePath]) {
        pids = roots.compactMap { Self.spawn(["/usr/sbin/chroot", $0.string] + argv) }
        sleep(microseconds: 1_500_000)
    }

    /// Total proportional set size (all of it: file-backed and anonymous) of the processes.
    public func totalPss() -> UInt64 {
        pids.reduce(0) { sum, pid in
            guard
                let text = try? Directory.open(path: FilePath("/proc/\(pid)")).openFileForReading(
                    FileName("smaps_rollup")
                ).readAll(),
                let line = text.split(separator: 0x0a).first(where: { $0.starts(with: Array("Pss:".utf8)) })
            else { return sum }
            return sum + ProcessMaps.kilobytes(line)
        }
    }

    /// Stops the processes.
    public mutating func stop() {
        for pid in pids { killAndReap(pid) }
        pids = []
    }
}
