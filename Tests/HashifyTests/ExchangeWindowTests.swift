import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// hashify run under strace with every `renameat2` held back, so that a test
/// can act inside the window of an exchange: before it (the journal already
/// announces it) and between it and its undo.
final class SlowedRun {
    let tracer = Process()

    /// Starts `hashify args` with each renameat2 delayed by `delay` seconds.
    let outputPath: String

    deinit { unlink(outputPath) }

    /// What the traced hashify printed so far.
    var output: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }

    init(_ args: [String], delay: Double, syscall: String = "renameat2") throws {
        tracer.executableURL = URL(fileURLWithPath: "/usr/bin/strace")
        tracer.arguments =
            [
                "-f", "-qq", "-o", "/dev/null", "-e", "trace=\(syscall)",
                "-e", "inject=\(syscall):delay_enter=\(Int(delay * 1_000_000))", hashifyBinary,
            ] + args
        // What hashify says goes to a file, for the message of a test that fails.
        outputPath = "/var/tmp/hashify-test-slowed.\(getpid()).\(UInt32.random(in: 0...UInt32.max))"
        _ = FileManager.default.createFile(atPath: outputPath, contents: nil)
        let out = FileHandle(forWritingAtPath: outputPath)!
        tracer.standardOutput = out
        tracer.standardError = out
        try tracer.run()
    }

    static var available: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/strace") }

    /// The first temporary name the run makes in one of `dirs` (made before
    /// its exchange, which is then held back): (directory, name), waiting while
    /// the run lasts (a loaded machine's fsyncs can take seconds), at most 5 minutes.
    func temporaryName(in dirs: [String]) -> (dir: String, temp: String)? {
        for _ in 0..<30000 where tracer.isRunning {
            for d in dirs {
                if let t = ((try? FileManager.default.contentsOfDirectory(atPath: d)) ?? []).first(where: {
                    $0.hasPrefix(".hashify~")
                }) {
                    return (d, t)
                }
            }
            usleep(10_000)
        }
        return nil
    }

    /// The traced hashify process (the tracer's child).
    var hashifyPID: pid_t? {
        let children = run(["/bin/cat", "/proc/\(tracer.processIdentifier)/task/\(tracer.processIdentifier)/children"])
            .out
        return children.split(separator: " ").first.flatMap { pid_t($0) }
    }

    func killHashify() {
        if let pid = hashifyPID { kill(pid, SIGKILL) }
        tracer.waitUntilExit()
    }

}

/// Runs hashify with `syscall` failing as strace's `inject=SYSCALL:FAULT` says.
func hashifyFailing(_ syscall: String, _ fault: String, _ args: [String]) -> (status: Int32, out: String, err: String) {
    run(
        [
            "/usr/bin/strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=\(syscall)", "-e",
            "inject=\(syscall):\(fault)",
            hashifyBinary,
        ] + args)
}

/// Waits until `path` is the inode `ino` (up to 2 minutes).
func waitForInode(_ path: String, _ ino: UInt64) -> Bool {
    for _ in 0..<12000 {
        var st = stat()
        if lstat(path, &st) == 0, UInt64(st.st_ino) == ino { return true }
        usleep(10_000)
    }
    return false
}

/// Waits until `path` has the mtime `other` has (up to 2 minutes).
func waitForModificationTime(_ path: String, of other: String) -> Bool {
    for _ in 0..<24000 {
        var a = stat()
        var b = stat()
        if lstat(path, &a) == 0, lstat(other, &b) == 0, a.st_mtim.tv_sec == b.st_mtim.tv_sec,
            a.st_mtim.tv_nsec == b.st_mtim.tv_nsec
        {
            return true
        }
        usleep(5_000)
    }
    return false
}

func readText(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "<unreadable>" }

@Suite(
    "the window of an exchange: guests that act while hashify replaces a path", .serialized,
    .enabled(if: isRoot && SlowedRun.available, "needs root and strace (apt-get install strace)"))
struct ExchangeWindowTests {
    /// Two guests holding one identical file; returns (roots, store, relative path).
    func twoGuests(_ s: Scratch) -> ([String], String) {
        let roots = [s.sub("guests/g1"), s.sub("guests/g2")]
        for r in roots {
            writeFile("\(r)/usr/lib/a.so", String(repeating: "the same library in both guests\n", count: 600))
            settleDirectoryTimes(r)
        }
        settle()
        return (roots, s.sub("guests/.hashify"))
    }

    /// The guest's rename onto the name lands between hashify's exchange and its
    /// undo, and hashify is killed there: the guest's new file sits under the
    /// temporary name. The next run must put it back at its name.
    func renameInWindowThenKill(_ s: Scratch, command: [String], roots: [String]) throws {
        let slowed = try SlowedRun(command, delay: 1.0)
        // The path being replaced: the one in whose directory the temporary name is.
        guard let (dir, temp) = slowed.temporaryName(in: roots.map { "\($0)/usr/lib" }) else {
            slowed.killHashify()
            Issue.record("no temporary name made; hashify said: \(slowed.output)")
            return
        }
        let name = "a.so"
        // A private copy is ready for its exchange once it carries the original's mtime.
        #expect(waitForModificationTime("\(dir)/\(temp)", of: "\(dir)/\(name)"))
        writeFile("\(dir)/new", "the guest's new file\n")
        let newInode = inode("\(dir)/new")
        #expect(rename("\(dir)/new", "\(dir)/\(name)") == 0)
        // The exchange moves the guest's file to the temporary name; kill before the undo.
        #expect(waitForInode("\(dir)/\(temp)", newInode), "the exchange did not happen")
        slowed.killHashify()
        let r = hashify(["unify", "-q"] + roots)
        #expect(r.status == 0, "\(r.err)")
        #expect(
            readText("\(dir)/\(name)") == "the guest's new file\n", "the guest's rename was undone or its file lost")
        #expect(run(["/usr/bin/find", s.path, "-name", ".hashify~*"]).out.isEmpty)
    }

    @Test("unify killed inside an exchange a guest raced: the guest's file is put back at its name")
    func linkKilledInWindow() throws {
        let s = Scratch("xwin")
        let (roots, _) = twoGuests(s)
        try renameInWindowThenKill(s, command: ["unify", "-q"] + roots, roots: roots)
    }

    @Test("split killed inside an exchange a guest raced: the guest's file is put back, never deleted")
    func splitKilledInWindow() throws {
        let s = Scratch("xwin")
        let (roots, store) = twoGuests(s)
        #expect(hashify(["unify", "-q"] + roots).status == 0)
        #expect(linkCount("\(roots[0])/usr/lib/a.so") == 3)
        try renameInWindowThenKill(
            s, command: ["split", "-q", "--store", store, "\(roots[0])/usr/lib/a.so"],
            roots: roots)
    }

    @Test("a writer that opens the file while its exchange is under way loses nothing")
    func writerHeldOffByLease() throws {
        let s = Scratch("xwin")
        let (roots, _) = twoGuests(s)
        let original = readText("\(roots[0])/usr/lib/a.so")
        let slowed = try SlowedRun(["unify"] + roots, delay: 3)
        guard slowed.temporaryName(in: roots.map { "\($0)/usr/lib" }) != nil else {
            slowed.killHashify()
            Issue.record("no temporary name made; hashify said: \(slowed.output)")
            return
        }
        // The victim is the copy not yet linked into the store.
        guard let victim = roots.map({ "\($0)/usr/lib/a.so" }).first(where: { linkCount($0) == 1 }) else {
            slowed.killHashify()
            Issue.record("no victim")
            return
        }
        // The writer's open waits on hashify's lease; its write must land in the file at its name.
        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: "/bin/sh")
        writer.arguments = ["-c", "printf 'written by a guest' >> '\(victim)'"]
        try writer.run()
        slowed.tracer.waitUntilExit()
        writer.waitUntilExit()
        #expect(slowed.tracer.terminationStatus == 0)
        #expect(readText(victim) == original + "written by a guest", "the guest's write was lost")
        let other = roots.map { "\($0)/usr/lib/a.so" }.first { $0 != victim }!
        #expect(readText(other) == original, "the write reached another guest")
        #expect(run(["/usr/bin/find", s.path, "-name", ".hashify~*"]).out.isEmpty)
    }

    @Test("a guest's own change to a directory while hashify works in it keeps its mtime (not put back)")
    func guestChangeToDirectoryKept() throws {
        let s = Scratch("xwin")
        let roots = [s.sub("guests/g1"), s.sub("guests/g2")]
        for r in roots {
            writeFile("\(r)/usr/lib/a.so", String(repeating: "library a\n", count: 900))
            writeFile("\(r)/usr/lib/b.so", String(repeating: "library b\n", count: 900))
            settleDirectoryTimes(r)
        }
        settle()
        // Every fcntl (the read leases) held back 0.4 s: after the first victim's
        // exchange there is a moment before the second victim's.
        let slowed = try SlowedRun(["unify", "-q"] + roots, delay: 0.4, syscall: "fcntl")
        // The first victim replaced: a name in one guest now the other guest's inode.
        var exchanged: String?
        for _ in 0..<3000 where exchanged == nil {
            exchanged =
                ["a.so", "b.so"].lazy.compactMap { n -> String? in
                    let (p, q) = ("\(roots[0])/usr/lib/\(n)", "\(roots[1])/usr/lib/\(n)")
                    return inode(p) == inode(q) ? (linkCount(p) == 3 ? q : nil) : nil
                }.first
            usleep(10_000)
        }
        guard let exchanged else {
            slowed.killHashify()
            Issue.record("no exchange seen")
            return
        }
        usleep(800_000)
        let dir = (exchanged as NSString).deletingLastPathComponent
        writeFile(dir + "/made-by-the-guest", "new\n")
        var before = stat()
        lstat(dir, &before)
        slowed.tracer.waitUntilExit()
        #expect(slowed.tracer.terminationStatus == 0)
        var after = stat()
        lstat(dir, &after)
        #expect(
            after.st_mtim.tv_sec != 1_600_000_000, "the guest's change to the directory was given the walk's mtime back"
        )
        #expect(after.st_mtim.tv_sec >= before.st_mtim.tv_sec)
    }

    @Test("a system call that fails is reported with its operation, the path and the errno, in the text and in --json")
    func failureNamesOperationAndPath() throws {
        let s = Scratch("xwin")
        let (roots, _) = twoGuests(s)
        // Every exchange fails with EIO: the path is left as it was, and the report says where and why.
        let r = hashifyFailing("renameat2", "error=EIO", ["unify", "--json"] + roots)
        #expect(r.status == 1, "\(r.err)")
        let skipped = jsonReport(r.out)["skipped"] as? [[String: Any]] ?? []
        #expect(skipped.count == 1, "\(skipped)")
        let first = skipped.first ?? [:]
        #expect(first["reason"] as? String == "exchange-failed")
        #expect(first["operation"] as? String == "exchange")
        #expect(first["errno"] as? Int == Int(EIO))
        #expect(first["path"] as? String == "/usr/lib/a.so")
        #expect((first["detail"] as? String ?? "").contains("exchange: Input/output error"), "\(first)")
        #expect(readText("\(roots[1])/usr/lib/a.so") == readText("\(roots[0])/usr/lib/a.so"))
        #expect(run(["/usr/bin/find", s.path, "-name", ".hashify~*"]).out.isEmpty)
    }

    @Test(
        "an overlay fold that fails (its new upper root cannot be given its owner) leaves the guest as it was, and says why"
    )
    func foldFailureNamesPath() throws {
        let s = Scratch("xwin")
        let store = s.sub("store")
        let g = s.sub("guests/g")
        makeGuest(g, index: 0)
        settle()
        #expect(overlay(["convert", "-q", g], store: store).status == 0)
        // Every fchown failing (the new upper root's): the fold fails, the guest stays as it was.
        writeFile("\(g)/usr/share/written-again", pseudoRandom(9000, seed: 10))
        let changed = guestManifest(g)
        #expect(overlay(["umount", g], store: store).status == 0)
        let failed = hashifyFailing("fchown", "error=EIO", ["unify", "--json", "--store", store, g])
        #expect(failed.status == 1, "\(failed.out) \(failed.err)")
        let failedGuests = jsonReport(failed.out)["overlayGuests"] as? [[String: Any]] ?? []
        #expect(failedGuests.first?["action"] as? String == "left as it was", "\(failedGuests)")
        let failedNotes = (failedGuests.first?["notes"] as? [String] ?? []).joined()
        #expect(failedNotes.contains("fold failed: "), "\(failedGuests)")
        #expect(overlay(["mount", g], store: store).status == 0, "the generation in force still mounts")
        #expect(guestManifest(g) == changed)
    }
}
