import HashifySystem
import SystemPackage

/// One process's memory as `/proc/PID/smaps` and its neighbours show it:
/// file-backed mappings summed per inode, anonymous memory, KSM pages.
struct ProcessMaps {
    /// The file-backed part of one process's mappings of one inode.
    struct Mapped {
        var device: UInt64
        var inode: UInt64
        /// The path as the kernel prints it (relative to our root, or to the process's own mount tree).
        var path: [UInt8]
        /// The file has no name left (" (deleted)").
        var deleted: Bool
        /// One mapped range, for `/proc/PID/map_files/START-END`.
        var range: [UInt8]
        var rss: UInt64 = 0
        /// Proportional share of the file's resident pages (anonymous copy-on-write pages taken out).
        var pss: UInt64 = 0
    }

    var pid: Int
    var command: String
    var mapped: [Mapped] = []
    var anonymousPss: UInt64 = 0
    var ksmMerged: UInt64 = 0

    /// makedev() of the "MAJ:MIN" (hex) field of a maps line.
    static func device(_ field: ArraySlice<UInt8>) -> UInt64? {
        let parts = field.split(separator: 0x3a)
        guard parts.count == 2, let ma = UInt64(String(decoding: parts[0], as: UTF8.self), radix: 16),
            let mi = UInt64(String(decoding: parts[1], as: UTF8.self), radix: 16)
        else { return nil }
        return ((ma & 0xffff_f000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0xff)
    }

    /// The number of kB in a "Name:   1234 kB" line, in bytes (no allocation: this runs for every line of smaps).
    static func kilobytes(_ line: ArraySlice<UInt8>) -> UInt64 {
        var value: UInt64 = 0
        var seen = false
        for b in line {
            if b >= 0x30 && b <= 0x39 {
                value = value &* 10 &+ UInt64(b - 0x30)
                seen = true
            } else if seen {
                break
            }
        }
        return value * 1024
    }

    static let rssField = Array("Rss:".utf8)
    static let pssField = Array("Pss:".utf8)
    static let anonymousField = Array("Anonymous:".utf8)
    static let deletedSuffix = Array(" (deleted)".utf8)

    /// Reads one process; nil when it vanished. Throws `Errno.permissionDenied` when its maps are not ours to read.
    static func read(pid: Int, in proc: Directory) throws -> ProcessMaps? {
        let dir: Directory
        do { dir = try proc.openDirectory(FileName(String(pid))) } catch Errno.noSuchFileOrDirectory { return nil }
        let smaps: [UInt8]
        do { smaps = try dir.openFileForReading(FileName("smaps")).readAll() } catch Errno.noSuchFileOrDirectory {
            return nil
        }
        let comm = (try? dir.openFileForReading(FileName("comm")).readAll()) ?? []
        var p = ProcessMaps(pid: pid, command: escapedPath(comm.filter { $0 != 0x0a }))
        var byInode: [UInt64: [Int]] = [:]
        var current: Int? = nil
        var anonymousInCurrent: UInt64 = 0
        var pssInCurrent: UInt64 = 0
        func close() {
            if let c = current {
                p.mapped[c].pss += pssInCurrent > anonymousInCurrent ? pssInCurrent - anonymousInCurrent : 0
            }
            current = nil
            pssInCurrent = 0
            anonymousInCurrent = 0
        }
        var start = smaps.startIndex
        while start < smaps.endIndex {
            let end = smaps[start...].firstIndex(of: 0x0a) ?? smaps.endIndex
            let line = smaps[start..<end]
            start = end + 1
            guard let first = line.first else { continue }
            // The fields that count start with R, P or A; a mapping's header with a hex digit.
            if first == 0x52 || first == 0x50 || first == 0x41 {
                guard current != nil else {
                    if line.starts(with: Self.anonymousField) { p.anonymousPss += kilobytes(line) }
                    continue
                }
                if line.starts(with: Self.rssField) {
                    p.mapped[current!].rss += kilobytes(line)
                } else if line.starts(with: Self.pssField) {
                    pssInCurrent = kilobytes(line)
                } else if line.starts(with: Self.anonymousField) {
                    anonymousInCurrent = kilobytes(line)
                    p.anonymousPss += anonymousInCurrent
                }
                continue
            }
            let isHeader = (0x30...0x39).contains(first) || (0x61...0x66).contains(first)
            guard isHeader, let dash = line.firstIndex(of: 0x2d), dash < (line.firstIndex(of: 0x20) ?? line.endIndex)
            else { continue }
            close()
            let f = line.split(separator: 0x20, maxSplits: 5, omittingEmptySubsequences: true)
            guard f.count >= 6, let dev = device(f[3]), let ino = UInt64(String(decoding: f[4], as: UTF8.self)),
                ino != 0
            else { continue }
            var path = Array(f[5].drop { $0 == 0x20 })
            if path.first != 0x2f { continue }  // [heap], [vdso], anonymous shared memory
            let deleted =
                path.count > Self.deletedSuffix.count
                && path.suffix(Self.deletedSuffix.count).elementsEqual(Self.deletedSuffix)
            if deleted { path.removeLast(Self.deletedSuffix.count) }
            let key = dev &* 1_000_003 ^ ino
            if let existing = byInode[key]?.first(where: { p.mapped[$0].device == dev && p.mapped[$0].inode == ino }) {
                current = existing
            } else {
                p.mapped.append(Mapped(device: dev, inode: ino, path: path, deleted: deleted, range: Array(f[0])))
                current = p.mapped.count - 1
                byInode[key, default: []].append(current!)
            }
        }
        close()
        if let ksm = try? dir.openFileForReading(FileName("ksm_merging_pages")).readAll(),
            let pages = UInt64(String(decoding: ksm.filter { $0 != 0x0a }, as: UTF8.self))
        {
            p.ksmMerged = pages * pageSize()
        }
        return p
    }

    /// The process's LXC container (cgroup `lxc.payload.NAME`) or systemd unit, when its cgroup says.
    static func group(pid: Int, in proc: Directory) -> String? {
        guard let dir = try? proc.openDirectory(FileName(String(pid))),
            let text = try? dir.openFileForReading(FileName("cgroup")).readAll()
        else { return nil }
        func after(_ needle: String, in line: ArraySlice<UInt8>) -> ArraySlice<UInt8>? {
            let n = Array(needle.utf8)
            guard line.count >= n.count else { return nil }
            var i = line.startIndex
            while i + n.count <= line.endIndex {
                if line[i..<i + n.count].elementsEqual(n) { return line[(i + n.count)...] }
                i += 1
            }
            return nil
        }
        let lines = text.split(separator: 0x0a)
        for line in lines {
            if let rest = after("lxc.payload.", in: line) {
                return "lxc:" + String(decoding: rest.prefix { $0 != 0x2f }, as: UTF8.self)
            }
            if let rest = after("machine-", in: line), line.suffix(6).elementsEqual(Array(".scope".utf8)) {
                return "nspawn:" + String(decoding: rest.dropLast(6), as: UTF8.self)
            }
        }
        for line in lines {
            if let unit = line.split(separator: 0x2f).last, unit.suffix(8).elementsEqual(Array(".service".utf8)) {
                return "unit:" + String(decoding: unit, as: UTF8.self)
            }
        }
        return nil
    }
}
