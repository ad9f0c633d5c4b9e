import HashifySystem
import SystemPackage

/// Kernel samepage merging for the anonymous memory files cannot share:
/// `hashify ksm run` marks a command's whole process mergeable
/// (`PR_SET_MEMORY_MERGE`), `hashify ksm status` shows ksmd and what it merged per guest.
public enum KSM {
    static let sysfs: FilePath = "/sys/kernel/mm/ksm"

    /// ksmd's state and what it merged, overall and per guest.
    public struct Status: Sendable, Codable {
        /// One guest's (or the host's) processes.
        public struct Guest: Sendable, Codable {
            public var guest: String
            public var processes = 0
            /// Processes marked mergeable as a whole (`ksm_merge_any`, what `ksm run` sets).
            public var mergeAnyProcesses = 0
            public var mergingPages = 0
            public var mergedBytes: UInt64 = 0
            /// The kernel's estimate of what merging saved, net of its own metadata (`ksm_process_profit`).
            public var profitBytes: Int64 = 0
        }
        public var schema = 1
        public var command = "ksm status"
        /// `/sys/kernel/mm/ksm/*`: run, pages_to_scan, sleep_millisecs, pages_shared, pages_sharing, general_profit, …
        public var settings: [String: Int64] = [:]
        public var running: Bool
        public var guests: [Guest] = []
        public var notes: [String] = []
    }

    static func readSysfs() -> [String: Int64] {
        guard let dir = try? Directory.open(path: sysfs) else { return [:] }
        var out: [String: Int64] = [:]
        for name in (try? dir.entryNames()) ?? [] {
            guard let text = try? dir.openFileForReading(name).readAll(),
                let v = Int64(String(decoding: text.filter { $0 != 0x0a }, as: UTF8.self))
            else { continue }
            out[String(decoding: name.bytes, as: UTF8.self)] = v
        }
        return out
    }

    /// A warning when ksmd is not merging, with how to start it (nil when it runs).
    public static func notRunningWarning() -> String? {
        let run = readSysfs()["run"]
        if run == 1 { return nil }
        if run == nil { return "this kernel has no KSM (/sys/kernel/mm/ksm is missing): nothing will be merged" }
        return
            "ksmd is not running, so nothing is merged yet: start it with `echo 1 > /sys/kernel/mm/ksm/run` (it costs CPU: see the README)"
    }

    /// `hashify ksm run`: marks this process mergeable and becomes `argv` (never returns on success).
    public static func exec(_ argv: [String]) throws -> Never {
        guard let file = argv.first else { throw InputError("give the command to run") }
        let (major, minor) = kernelVersion()
        if (major, minor) < (6, 7) {
            throw InputError(
                "Linux \(major).\(minor) does not keep PR_SET_MEMORY_MERGE across execve (Linux 6.7 or later is needed)"
            )
        }
        do { try setMemoryMerge() } catch {
            throw InputError("prctl(PR_SET_MEMORY_MERGE) failed: \(error) (needs Linux 6.4+ with CONFIG_KSM)")
        }
        throw InputError("\(file): cannot run: \(execute(argv))")
    }

    /// `hashify ksm status`.
    public static func status(_ options: MemoryOptions) throws -> Status {
        let (rootPaths, store, notes) = try MemoryScanner.guestPaths(options)
        let guests = try MemoryScanner.loadGuests(rootPaths, store: store)
        let settings = readSysfs()
        var out = Status(settings: settings, running: settings["run"] == 1)
        out.notes = notes
        if settings.isEmpty { out.notes.append("this kernel has no KSM (/sys/kernel/mm/ksm is missing)") }
        if let w = notRunningWarning(), !settings.isEmpty { out.notes.append(w) }
        var rows = (guests.map(\.label) + ["host"]).map { Status.Guest(guest: $0) }
        guard let proc = try? Directory.open(path: "/proc") else { return out }
        let page = pageSize()
        for name in (try? proc.entryNames()) ?? [] {
            guard let pid = Int(String(decoding: name.bytes, as: UTF8.self)),
                let dir = try? proc.openDirectory(name),
                let text = try? dir.openFileForReading(FileName("ksm_stat")).readAll()
            else { continue }
            var fields: [String: String] = [:]
            for line in text.split(separator: 0x0a) {
                let f = line.split(separator: 0x20, maxSplits: 1)
                if f.count == 2 {
                    fields[String(decoding: f[0], as: UTF8.self).replacingColon()] = String(
                        decoding: f[1], as: UTF8.self)
                }
            }
            let g = MemoryScanner.guest(of: pid, among: guests, proc: proc)
            let slot = g < 0 ? guests.count : g
            rows[slot].processes += 1
            if fields["ksm_merge_any"] == "yes" { rows[slot].mergeAnyProcesses += 1 }
            let pages = Int(fields["ksm_merging_pages"] ?? "") ?? 0
            rows[slot].mergingPages += pages
            rows[slot].mergedBytes += UInt64(pages) * page
            rows[slot].profitBytes += Int64(fields["ksm_process_profit"] ?? "") ?? 0
        }
        out.guests = rows.enumerated().filter { $0.offset < guests.count || $0.element.processes > 0 }.map(\.element)
        return out
    }
}

extension String {
    /// "ksm_merge_any:" → "ksm_merge_any" (ksm_stat writes some keys with a colon).
    fileprivate func replacingColon() -> String { hasSuffix(":") ? String(dropLast()) : self }
}
