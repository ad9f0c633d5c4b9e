import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Starts perl, chrooted, in each guest; returns the processes (the test kills them).
func startPerl(in guests: [String]) throws -> [Process] {
    let procs = try guests.map { g -> Process in
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/chroot")
        p.arguments = [g, "/usr/bin/perl", "-e", "my $x = 0; $x += $_ for 1..200000; sleep 120"]
        p.environment = ["LC_ALL": "C", "PATH": "/usr/bin:/bin"]
        try p.run()
        return p
    }
    usleep(1_500_000)
    return procs
}

func stop(_ procs: [Process]) {
    for p in procs {
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
    }
}

/// An independent sum of the file-backed Pss (Pss minus anonymous pages) of processes, from smaps.
func smapsFilePss(_ pids: [Int32]) -> UInt64 {
    var total: UInt64 = 0
    for pid in pids {
        var inFile = false
        var pss: UInt64 = 0
        for line in run(["/bin/cat", "/proc/\(pid)/smaps"]).out.split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            if let first = f.first, first.contains("-"), f.count >= 5, first.allSatisfy({ $0.isHexDigit || $0 == "-" })
            {
                inFile = f[4] != "0" && f.count >= 6 && f[5].hasPrefix("/")
                continue
            }
            guard inFile, f.count >= 2, let kb = UInt64(f[1]) else { continue }
            if f[0] == "Pss:" { pss = kb }
            if f[0] == "Anonymous:" { total += (pss > kb ? pss - kb : 0) * 1024 }
        }
    }
    return total
}

func memReport(_ args: [String]) -> [String: Any] {
    let r = hashify(["mem", "--json"] + args)
    precondition(r.status == 0, "hashify mem: \(r.err)")
    return jsonReport(r.out)
}

func guestFigures(_ report: [String: Any], _ root: String) -> [String: Any] {
    let gs = report["guests"] as? [[String: Any]] ?? []
    return gs.first { $0["guest"] as? String == root }?["figures"] as? [String: Any] ?? [:]
}

func sum(_ report: [String: Any], _ roots: [String], _ key: String) -> Int {
    roots.reduce(0) { $0 + (guestFigures(report, $1)[key] as? Int ?? 0) }
}

@Suite("hashify mem on real processes", .serialized, .enabled(if: isRoot, "reading every process's smaps needs root"))
struct MemoryTests {
    @Test(
        "before unify: duplicated MiB per guest; after: the restart list; after restart: duplicated near zero, shared up; agrees with smaps"
    )
    func hardlinkCycle() throws {
        let s = Scratch("mem")
        let guests = (1...3).map { s.sub("guests/g\($0)") }
        for g in guests { installProgram("/usr/bin/perl", into: g) }
        settle()
        var procs = try startPerl(in: guests)
        defer { stop(procs) }
        let before = memReport(guests)
        let independent = smapsFilePss(procs.map(\.processIdentifier))
        let fileBacked = sum(before, guests, "fileBackedBytes")
        print(
            "mem before unify: file-backed \(fileBacked), smaps \(independent), duplicated \(sum(before, guests, "duplicatedBytes")), shared \(sum(before, guests, "sharedBytes"))"
        )
        #expect(
            abs(Double(fileBacked) - Double(independent)) <= 0.05 * Double(independent),
            "mem \(fileBacked) vs smaps \(independent)")
        for g in guests { #expect(guestFigures(before, g)["processes"] as? Int == 1) }
        // Three separate copies of perl and its libraries: two of them are duplicates.
        #expect(Double(sum(before, guests, "duplicatedBytes")) > 0.5 * Double(fileBacked))

        #expect(hashify(["unify", "-q"] + guests).status == 0)
        let after = memReport(guests)
        let restart = after["processesToRestart"] as? [[String: Any]] ?? []
        let pids = Set(procs.map { Int($0.processIdentifier) })
        let listed = restart.filter { pids.contains($0["pid"] as? Int ?? -1) }
        #expect(listed.count >= 2, "perl processes to restart: \(restart)")
        #expect(listed.allSatisfy { ($0["bytes"] as? Int ?? 0) > 0 && ($0["command"] as? String) == "perl" })
        // What the processes still map of the replaced copies is a restart's to free, not unify's (a re-run links nothing).
        #expect(after["unifyWouldSaveBytes"] as? Int == 0, "\(after["unifyWouldSaveBytes"] ?? "-")")
        let dupFiles = after["duplicatedFiles"] as? [[String: Any]] ?? []
        #expect(!dupFiles.isEmpty && dupFiles.allSatisfy { $0["mergedBy"] as? String == "a restart" }, "\(dupFiles)")
        #expect(dupFiles.allSatisfy { !($0["path"] as? String ?? "").contains(".hashify~") }, "\(dupFiles)")
        let rerun = hashify(["unify", "--json"] + guests)
        #expect(totals(rerun.out)["pathsLinked"] as? Int == 0)

        stop(procs)
        procs = try startPerl(in: guests)
        let restarted = memReport(guests)
        let dup = sum(restarted, guests, "duplicatedBytes")
        print("mem after restart: duplicated \(dup), shared \(sum(restarted, guests, "sharedBytes"))")
        #expect(Double(dup) < 0.05 * Double(fileBacked), "duplicated after restart: \(dup)")
        #expect(sum(restarted, guests, "sharedBytes") > sum(before, guests, "sharedBytes"))
        #expect(
            (restarted["processesToRestart"] as? [[String: Any]] ?? []).filter {
                pids.contains($0["pid"] as? Int ?? -1)
            }.isEmpty)
        #expect(
            Double(sum(restarted, guests, "fileBackedBytes")) < 0.6 * Double(fileBacked), "one copy instead of three")
    }

    @Test("overlay guests' mappings are resolved to their shared data objects: shared, not duplicated")
    func overlayShared() throws {
        let s = Scratch("memov")
        let store = s.sub("store")
        let guests = (1...2).map { s.sub("guests/g\($0)") }
        for g in guests { installProgram("/usr/bin/perl", into: g) }
        settle()
        #expect(overlay(["convert", "-q"] + guests, store: store).status == 0)
        let procs = try startPerl(in: guests)
        defer { stop(procs) }
        let r = memReport(["--store", store] + guests)
        let file = sum(r, guests, "fileBackedBytes")
        let shared = sum(r, guests, "sharedBytes")
        let dup = sum(r, guests, "duplicatedBytes")
        print(
            "mem overlay: file-backed \(file), shared \(shared), duplicated \(dup), store cached \(r["storeCachedBytes"] ?? 0)"
        )
        #expect(Double(shared) > 0.9 * Double(file))
        #expect(Double(dup) < 0.05 * Double(file))
        #expect((r["storeCachedBytes"] as? Int ?? 0) > 0)

        // perl replaced by the same bytes in one guest (a package reinstall), then folded: the
        // guest's generation stacks its old upper layer, where perl is a stub of the same object.
        stop(procs)
        #expect(run(["/bin/cp", "-p", "\(guests[0])/usr/bin/perl", "\(guests[0])/usr/bin/perl.new"]).status == 0)
        #expect(rename("\(guests[0])/usr/bin/perl.new", "\(guests[0])/usr/bin/perl") == 0)
        #expect(overlay(["umount"] + guests, store: store).status == 0)
        #expect(overlay(["fold", "-q"] + guests, store: store).status == 0)
        #expect(overlay(["mount"] + guests, store: store).status == 0)
        let again = try startPerl(in: guests)
        defer { stop(again) }
        let stacked = memReport(["--store", store] + guests)
        let stackedFile = sum(stacked, guests, "fileBackedBytes")
        #expect(Double(sum(stacked, guests, "sharedBytes")) > 0.9 * Double(stackedFile), "\(stacked)")
        #expect(Double(sum(stacked, guests, "duplicatedBytes")) < 0.05 * Double(stackedFile))
    }

    @Test(
        "each duplicate says what would merge it: copies of one owner unify, copies shifted to another id range only overlay mode; unify would save only the first"
    )
    func mergeAdvice() throws {
        let s = Scratch("memadvice")
        let same = (1...2).map { s.sub("guests/same\($0)") }
        let shifted = s.sub("guests/shifted")
        for g in same + [shifted] { installProgram("/usr/bin/perl", into: g) }
        // An unprivileged guest's files as they lie on disk: every owner shifted by 100000.
        #expect(run(["/usr/bin/chown", "-R", "-h", "100000:100000", shifted]).status == 0)
        settle()
        let procs = try startPerl(in: same + [shifted])
        defer { stop(procs) }
        let r = memReport(same + [shifted])
        let files = r["duplicatedFiles"] as? [[String: Any]] ?? []
        let perl = files.first { ($0["path"] as? String)?.hasSuffix("/perl") == true } ?? [:]
        #expect(perl["copies"] as? Int == 3, "\(files)")
        #expect(perl["mergedBy"] as? String == "unify, then overlay mode", "\(perl)")
        let unify = perl["unifyWouldSaveBytes"] as? Int ?? 0
        let overlayOnly = perl["overlayModeWouldSaveBytes"] as? Int ?? 0
        #expect(unify > 0 && overlayOnly > 0)
        #expect(unify + overlayOnly == perl["duplicatedBytes"] as? Int ?? -1)
        let total = r["unifyWouldSaveBytes"] as? Int ?? 0
        #expect(total >= unify && total < sum(r, same + [shifted], "duplicatedBytes"), "only what unify merges")

        // What unify says it would save is what it does save: after unify and a restart,
        // only the shifted guest's copies stay duplicated, and only overlay mode would merge them.
        #expect(hashify(["unify", "-q"] + same + [shifted]).status == 0)
        stop(procs)
        let again = try startPerl(in: same + [shifted])
        defer { stop(again) }
        let after = memReport(same + [shifted])
        #expect((after["unifyWouldSaveBytes"] as? Int ?? -1) < total / 10, "\(after["duplicatedFiles"] ?? [])")
        #expect((after["overlayModeWouldSaveBytes"] as? Int ?? 0) > 0)
        let left = (after["duplicatedFiles"] as? [[String: Any]] ?? []).compactMap { $0["mergedBy"] as? String }
        #expect(!left.isEmpty && left.allSatisfy { $0 == "overlay mode" }, "\(left)")
    }

    @Test(
        "mem --metrics: the file parses as Prometheus text (prometheus_client) and equals the run's --json",
        .enabled(if: hasPrometheusParser, "needs python3-prometheus-client (the independent parser)"))
    func metrics() throws {
        let s = Scratch("memmetrics")
        let guests = (1...2).map { s.sub("guests/g\($0)") }
        for g in guests { installProgram("/usr/bin/perl", into: g) }
        settle()
        let procs = try startPerl(in: guests)
        defer { stop(procs) }
        let file = s.sub("mem.prom")
        let r = hashify(["mem", "--json", "--metrics", file] + guests)
        #expect(r.status == 0, "\(r.err)")
        let report = jsonReport(r.out)
        guard let m = prometheusSamples(file) else {
            Issue.record("does not parse: \((try? String(contentsOfFile: file, encoding: .utf8)) ?? "")")
            return
        }
        let fields = [
            ("file_backed", "fileBackedBytes"), ("shared", "sharedBytes"), ("duplicated", "duplicatedBytes"),
            ("anonymous", "anonymousBytes"), ("ksm_merged", "ksmMergedBytes"),
        ]
        for g in report["guests"] as? [[String: Any]] ?? [] {
            let name = g["guest"] as? String ?? ""
            let f = g["figures"] as? [String: Any] ?? [:]
            for (metric, key) in fields {
                #expect(
                    m["hashify_mem_\(metric)_bytes{guest=\(name)}"] == Double(f[key] as? Int ?? -1), "\(metric) \(name)"
                )
            }
            #expect(m["hashify_mem_processes{guest=\(name)}"] == Double(f["processes"] as? Int ?? -1))
        }
        let totals = report["totals"] as? [String: Any] ?? [:]
        for (metric, key) in fields {
            #expect(m["hashify_mem_\(metric)_total_bytes"] == Double(totals[key] as? Int ?? -1))
        }
        #expect(m["hashify_mem_unify_would_save_bytes"] == Double(report["unifyWouldSaveBytes"] as? Int ?? -1))
        #expect(m["hashify_mem_store_cached_bytes"] == Double(report["storeCachedBytes"] as? Int ?? -1))
        let restart = (report["processesToRestart"] as? [[String: Any]] ?? []).reduce(0) {
            $0 + ($1["bytes"] as? Int ?? 0)
        }
        #expect(m["hashify_mem_restart_frees_bytes"] == Double(restart))
        #expect(abs((m["hashify_mem_duration_seconds"] ?? -1) - (report["seconds"] as? Double ?? 0)) < 0.001)
        #expect(abs((m["hashify_mem_timestamp_seconds"] ?? 0) - Date().timeIntervalSince1970) < 60)
        #expect(!FileManager.default.fileExists(atPath: s.sub(".mem.prom.new")), "written atomically")
    }

    @Test("bad input: a root that is not a directory; reading as nobody is partial and says so")
    func badInput() throws {
        let s = Scratch("membad")
        let r = hashify(["mem", s.sub("missing")])
        #expect(r.status == 2 && r.err.contains("no such directory"), "\(r.err)")
        let nobody = run([
            "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", hashifyBinary, "mem", "--json",
        ])
        #expect(nobody.status == 0, "\(nobody.err)")
        let report = jsonReport(nobody.out)
        #expect(report["partial"] as? Bool == true)
        #expect((report["unreadableProcesses"] as? Int ?? 0) > 0)
    }
}

/// Whether this machine has KSM that root can start.
let ksmAvailable = isRoot && access("/sys/kernel/mm/ksm/run", W_OK) == 0

@Suite("hashify ksm", .serialized, .enabled(if: ksmAvailable, "needs root and /sys/kernel/mm/ksm (CONFIG_KSM)"))
struct KSMTests {
    @Test(
        "ksm run: a process allocating identical anonymous pages gets them merged; ksm status shows it; ksmd's settings are put back"
    )
    func mergesAnonymousPages() throws {
        let knobs = ["run", "pages_to_scan", "sleep_millisecs"]
        let saved = knobs.map {
            (try? String(contentsOfFile: "/sys/kernel/mm/ksm/\($0)", encoding: .utf8))?.trimmingCharacters(
                in: .whitespacesAndNewlines) ?? ""
        }
        func set(_ knob: String, _ value: String) {
            _ = run(["/bin/sh", "-c", "echo \(value) > /sys/kernel/mm/ksm/\(knob)"])
        }
        defer { for (k, v) in zip(knobs, saved).reversed() where !v.isEmpty { set(k, v) } }
        set("pages_to_scan", "5000")
        set("sleep_millisecs", "10")
        set("run", "1")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: hashifyBinary)
        p.arguments = [
            "ksm", "run", "--", "/usr/bin/python3", "-c",
            "b = bytearray(b'Z' * (16 << 20)); import time; time.sleep(60)",
        ]
        try p.run()
        defer {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
        }
        var merged = 0
        for _ in 0..<100 {
            merged =
                Int(
                    run(["/bin/cat", "/proc/\(p.processIdentifier)/ksm_merging_pages"]).out.trimmingCharacters(
                        in: .whitespacesAndNewlines)) ?? 0
            if merged > 1000 { break }
            usleep(200_000)
        }
        #expect(merged > 1000, "pages merged: \(merged)")
        #expect(run(["/bin/cat", "/proc/\(p.processIdentifier)/ksm_stat"]).out.contains("ksm_merge_any: yes"))
        let status = jsonReport(hashify(["ksm", "status", "--json"]).out)
        #expect(status["running"] as? Bool == true)
        let host = (status["guests"] as? [[String: Any]] ?? []).first { $0["guest"] as? String == "host" } ?? [:]
        #expect((host["mergedBytes"] as? Int ?? 0) >= merged * 4096 / 2)
        #expect((host["mergeAnyProcesses"] as? Int ?? 0) >= 1)
    }

    @Test("ksm run without a command is bad usage")
    func noCommand() {
        let r = hashify(["ksm", "run"])
        #expect(r.status == 2 && r.err.contains("give the command"), "\(r.err)")
    }
}

@Suite(
    "hashify mem on reflinked copies", .serialized,
    .enabled(
        if: isRoot && FileManager.default.isExecutableFile(atPath: "/usr/sbin/mkfs.xfs"),
        "needs root and mkfs.xfs (xfsprogs)"))
struct ReflinkMemoryTests {
    @Test("two reflinked copies of perl on XFS, both running: shared extents on disk, but duplicated in memory")
    func reflinkIsDuplicated() throws {
        let s = Scratch("memxfs")
        let image = s.sub("xfs.img")
        let mnt = s.sub("xfs")
        #expect(run(["/usr/bin/truncate", "-s", "512M", image]).status == 0)
        #expect(run(["/usr/sbin/mkfs.xfs", "-q", "-m", "reflink=1", image]).status == 0)
        mkdirs(mnt)
        let m = run(["/bin/mount", "-o", "loop", image, mnt])
        #expect(m.status == 0, "\(m.err)")
        defer { _ = run(["/bin/umount", mnt]) }
        let a = "\(mnt)/guests/a"
        let b = "\(mnt)/guests/b"
        installProgram("/usr/bin/perl", into: a)
        mkdirs("\(mnt)/guests")
        #expect(run(["/bin/cp", "-a", "--reflink=always", a, b]).status == 0, "reflink copy")
        let procs = try startPerl(in: [a, b])
        defer { stop(procs) }
        let r = memReport([a, b])
        let file = sum(r, [a, b], "fileBackedBytes")
        let dup = sum(r, [a, b], "duplicatedBytes")
        print("mem on reflinked XFS copies: file-backed \(file), duplicated \(dup)")
        #expect(Double(dup) > 0.3 * Double(file), "one of the two copies is a duplicate in memory")
        #expect(sum(r, [a, b], "sharedBytes") == 0)
    }
}

@Suite("hashify demo", .enabled(if: isRoot, "the demo's memory part runs chrooted programs (root)"))
struct DemoTests {
    @Test("the demo saves disk and memory in both modes, shows copy-on-write and leaves nothing behind")
    func demo() throws {
        let s = Scratch("demo")
        let r = hashify(["demo", "--directory", s.path])
        #expect(r.status == 0, "\(r.err)")
        let line = r.out.split(separator: "\n").first { $0.hasPrefix("memory (total Pss") } ?? ""
        #expect(!line.isEmpty, "\(r.out)")
        #expect(r.out.contains("saved ("))
        // Overlay mode: the same guests converted, the same memory shared, and a write kept in its guest.
        #expect(r.out.contains("memory (total Pss of one perl process per overlay guest)"), "\(r.out)")
        let cow = r.out.split(separator: "\n").first { $0.hasPrefix("copy-on-write:") } ?? ""
        #expect(cow.contains("the other guests still read the original"), "\(r.out)")
        #expect(mountPoints(under: s.path).isEmpty, "the demo unmounts its overlay guests")
        let left = try FileManager.default.contentsOfDirectory(atPath: s.path)
        #expect(left.isEmpty, "the demo removes its guests: \(left)")
        #expect(run(["/usr/bin/pgrep", "-f", s.path]).out.isEmpty, "no demo process left")
    }
}
