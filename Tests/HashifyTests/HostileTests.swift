import Foundation
import HashifyEngine
import HashifySystem
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A flag a background thread polls.
final class Flag: Sendable {
    let value = Mutex(false)
    func set() { value.withLock { $0 = true } }
    var isSet: Bool { value.withLock { $0 } }
}

/// Runs body on its own thread until `stop` is set; `join` waits for it.
final class Background: @unchecked Sendable {
    let stop = Flag()
    let done = DispatchSemaphore(value: 0)
    init(_ body: @escaping @Sendable (Flag) -> Void) {
        let stop = self.stop
        let done = self.done
        Thread.detachNewThread {
            body(stop)
            done.signal()
        }
    }
    func join() {
        stop.set()
        done.wait()
    }
}

/// Swaps directory `dir` for a symlink to `target` and back, again and again, until joined.
func symlinkSwapper(_ dir: String, to target: String, holdMicroseconds: UInt32 = 200) -> Background {
    Background { stop in
        let real = dir + ".real"
        while !stop.isSet {
            rename(dir, real)
            symlink(target, dir)
            usleep(holdMicroseconds)
            unlink(dir)
            rename(real, dir)
            usleep(holdMicroseconds / 2)
        }
    }
}

@Suite("live and hostile guests", .serialized)
struct HostileTests {
    @Test("a directory swapped for a symlink to outside the roots: nothing outside is changed or linked")
    func symlinkSwap() throws {
        let s = Scratch("hostile")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        let outside = s.sub("outside")
        for r in [a, b, outside + "/d"] {
            for i in 0..<30 {
                writeFile("\(r.hasSuffix("/d") ? r : r + "/usr/lib/d")/f\(i)", pseudoRandom(2000 + i, seed: UInt64(i)))
            }
        }
        for r in [a, b] {
            for i in 0..<200 { writeFile("\(r)/usr/share/x\(i)", pseudoRandom(500 + i, seed: UInt64(1000 + i))) }
        }
        settle()
        let outsideBefore = manifest([outside], inodes: true)
        let guestsBefore = manifest([a, b])
        let swapper = symlinkSwapper("\(a)/usr/lib/d", to: "\(outside)/d")
        for _ in 0..<8 {
            let r = hashify(["unify", "--json", a, b])
            #expect(r.status == 0 || r.status == 1, "\(r.err)")
        }
        swapper.join()
        #expect(manifest([outside], inodes: true) == outsideBefore, "outside tree untouched")
        for i in 0..<30 { #expect(linkCount("\(outside)/d/f\(i)") == 1) }
        // The guests' content is intact (the swapper itself changes directory mtimes).
        let stripMtimes = { (m: String) in
            m.split(separator: "\n").filter { !$0.contains(" d ") }.joined(separator: "\n")
        }
        #expect(stripMtimes(manifest([a, b])) == stripMtimes(guestsBefore))
        #expect(!run(["/usr/bin/find", s.path, "-name", ".hashify~*"]).out.contains("hashify~"))
    }

    @Test("mount points inside a guest (a tmpfs, a file bind-mounted from outside) are not crossed")
    func mountPointsNotCrossed() throws {
        guard isRoot else {
            print("skipped: mounting needs root")
            return
        }
        let s = Scratch("mounts")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        let outside = s.sub("outside")
        let content = pseudoRandom(9000, seed: 7)
        for r in [a, b] { writeFile("\(r)/usr/lib/same", content) }
        // The same content and identity behind two mount points in guest a.
        writeFile("\(outside)/file", content)
        writeFile("\(a)/usr/bound", [])
        mkdirs("\(a)/usr/mnt")
        guard mountTmpfs("\(a)/usr/mnt") else {
            print("skipped: this machine cannot mount a tmpfs")
            return
        }
        defer { unmount("\(a)/usr/mnt") }
        writeFile("\(a)/usr/mnt/same", content)
        guard run(["/bin/mount", "--bind", "\(outside)/file", "\(a)/usr/bound"]).status == 0 else {
            print("skipped: this machine cannot bind-mount a file")
            return
        }
        defer { unmount("\(a)/usr/bound") }
        settle()
        let before = manifest([a, b])
        let outsideInode = inode("\(outside)/file")
        let mountedInode = inode("\(a)/usr/mnt/same")
        let r = hashify(["unify", "--json", a, b])
        #expect(r.status == 0, "\(r.err)")
        #expect(inode("\(a)/usr/lib/same") == inode("\(b)/usr/lib/same"), "the files inside the guests are unified")
        #expect(
            inode("\(outside)/file") == outsideInode && linkCount("\(outside)/file") == 1,
            "the bind-mounted file is untouched")
        #expect(
            inode("\(a)/usr/mnt/same") == mountedInode && linkCount("\(a)/usr/mnt/same") == 1,
            "the tmpfs is not entered")
        let skipped = jsonReport(r.out)["skipped"] as? [[String: Any]] ?? []
        for path in ["/usr/mnt", "/usr/bound"] {
            #expect(
                skipped.contains { ($0["path"] as? String) == path && ($0["reason"] as? String) == "mount-point" },
                "\(path) reported as a mount point")
        }
        #expect(manifest([a, b]) == before, "what the guests see, mounts included, is unchanged")
        withExtendedLifetime(s) {}
    }

    @Test("a file held open for writing is not unified and loses no data")
    func heldOpenWriter() throws {
        let s = Scratch("writer")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        let initial = pseudoRandom(10_000, seed: 5)
        for r in [a, b] { writeFile("\(r)/usr/log", initial) }
        settle()
        let fd = open("\(a)/usr/log", O_WRONLY | O_CLOEXEC | O_APPEND)
        #expect(fd >= 0)
        let r = hashify(["unify", "--json", a, b])
        #expect(r.status == 0, "\(r.err)")
        let extra = Array("appended after the run\n".utf8)
        _ = extra.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        let data = try Data(contentsOf: URL(fileURLWithPath: "\(a)/usr/log"))
        #expect(Array(data) == initial + extra)
        let skipped = jsonReport(r.out)["skipped"] as? [[String: Any]] ?? []
        #expect(skipped.contains { ($0["reason"] as? String) == "open-for-writing" })
        #expect(inode("\(a)/usr/log") != inode("\(b)/usr/log"))
    }

    @Test("a file appended to during runs loses no data")
    func concurrentAppender() throws {
        let s = Scratch("append")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        let initial = pseudoRandom(50_000, seed: 6)
        for r in [a, b] {
            writeFile("\(r)/usr/log", initial)
            for i in 0..<300 { writeFile("\(r)/usr/share/x\(i)", pseudoRandom(3000, seed: UInt64(i))) }
        }
        settle()
        let path = "\(a)/usr/log"
        let written = Mutex([UInt8]())
        let appender = Background { stop in
            var n = 0
            while !stop.isSet {
                let chunk = Array("line \(n)\n".utf8)
                let fd = open(path, O_WRONLY | O_CLOEXEC | O_APPEND)
                if fd >= 0 {
                    _ = chunk.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                    close(fd)
                    written.withLock { $0 += chunk }
                }
                n += 1
                usleep(UInt32.random(in: 0...300))
            }
        }
        for _ in 0..<6 {
            let r = hashify(["unify", a, b])
            #expect(r.status == 0 || r.status == 1, "\(r.err)")
        }
        appender.join()
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(Array(data) == initial + written.withLock { $0 })
    }

    @Test(
        "SIGKILL at random moments: invariants hold after each kill; the next run completes and leaves no temporary names"
    )
    func killAtRandomMoments() throws {
        let s = Scratch("kill")
        let roots = (1...3).map { s.sub("guests/g\($0)") }
        for (g, r) in roots.enumerated() {
            for d in 0..<12 {
                for i in 0..<25 {
                    let size = 200 + (i * 997 + d * 131) % 60_000
                    // Most files identical across guests, some private.
                    let seed = (i + d) % 7 == 0 ? UInt64(g * 100_000 + d * 100 + i) : UInt64(d * 100 + i)
                    writeFile("\(r)/usr/d\(d)/f\(i)", pseudoRandom(size, seed: seed))
                }
            }
            link("\(r)/usr/d0/f1", "\(r)/usr/d1/hard")
            settleDirectoryTimes(r)
        }
        settle()
        let before = manifest(roots)
        let clean = { (m: String) in
            m.split(separator: "\n").filter { !$0.contains(".hashify~") }.map { line -> String in
                // Directory mtimes may differ while a temporary name is present.
                let f = line.split(separator: " ", omittingEmptySubsequences: false)
                return f.count > 6 && f[1] == "d" ? f[0..<6].joined(separator: " ") : String(line)
            }.joined(separator: "\n")
        }
        let cleanBefore = clean(before)
        // Size the kill window from this machine's speed: a dry run does the
        // walk and hashing, a real run adds linking (about as long again).
        let t0 = Date()
        _ = hashify(["unify", "-n", "-q"] + roots)
        // Each command's window: its last uninterrupted run (first guess: a dry run × 3).
        var window: [String: Double] = [:]
        let firstGuess = max(0.05, Date().timeIntervalSince(t0)) * 3
        var kills = 0
        var killedWhileLinking = 0
        var iteration = -1
        // At least 40 runs, and on until five kills have landed while guests were being changed.
        while iteration < 119 && (iteration < 39 || killedWhileLinking < 5) {
            iteration += 1
            let p = Process()
            p.executableURL = URL(fileURLWithPath: hashifyBinary)
            // Mostly unify (first runs and re-runs); also gc and split, killed the same way.
            switch iteration % 6 {
            case 2: p.arguments = ["gc", "-q"] + roots
            case 4: p.arguments = ["split", "-q", "--root", roots[iteration % 3]]
            default: p.arguments = ["unify", "-q"] + roots
            }
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            let command = p.arguments![0]
            let started = Date()
            try p.run()
            let w = window[command] ?? firstGuess
            usleep(UInt32(Double.random(in: (0.3 * w)...w) * 1_000_000))
            if p.isRunning {
                kill(p.processIdentifier, SIGKILL)
                kills += 1
            }
            p.waitUntilExit()
            if p.terminationReason == .exit { window[command] = max(0.005, Date().timeIntervalSince(started)) }
            // A run record exists only while a run is changing guests.
            if !run(["/bin/ls", "-A", s.sub("guests/.hashify/runs")]).out.isEmpty { killedWhileLinking += 1 }
            #expect(clean(manifest(roots)) == cleanBefore, "after kill \(iteration)")
            // Undo the sharing now and then so later runs have work to do again.
            if iteration % 3 == 2 {
                for r in roots {
                    _ = run([
                        "/bin/sh", "-c",
                        "cd '\(r)' && for f in usr/d*/f*; do cp -p \"$f\" \"$f.x\" && mv \"$f.x\" \"$f\"; done",
                    ])
                }
                for r in roots { settleDirectoryTimes(r) }
                settle()
            }
        }
        _ = hashify(["gc", "-q"] + roots)
        let final = hashify(["unify", "--json"] + roots)
        #expect(final.status == 0, "\(final.err)")
        #expect(manifest(roots) == manifest(roots))
        #expect(clean(manifest(roots)) == cleanBefore)
        let leftovers = run(["/usr/bin/find", s.path, "-name", ".hashify~*"]).out
        #expect(leftovers.isEmpty, "temporary names left: \(leftovers)")
        #expect(run(["/bin/ls", "-A", s.sub("guests/.hashify/runs")]).out.isEmpty)
        print("kill test: \(kills) of \(iteration + 1) runs killed, \(killedWhileLinking) while linking")
        #expect(kills > 5)
        #expect(killedWhileLinking >= 5, "kills must land in the linking phase")
        // After the final run the tree is fully unified: a dry run finds nothing to do.
        let dry = totals(hashify(["unify", "-n", "--json"] + roots).out)
        #expect(dry["pathsLinked"] as? Int == 0)
    }
}
