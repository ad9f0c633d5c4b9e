import CHashifyShim
import Foundation
import HashifyEngine
import HashifySystem
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("unify keeps what guests see", .serialized)
struct UnifyTests {
    @Test("manifest identical after unify and after a second unify; duplicates share one inode")
    func manifestInvariant() throws {
        let s = Scratch("manifest")
        let roots = (1...3).map { s.sub("guests/g\($0)") }
        for (i, r) in roots.enumerated() { makeGuest(r, index: i) }
        // A sparse file: a hole then data.
        for r in roots {
            let fd = open("\(r)/usr/lib/sparse.img", O_WRONLY | O_CLOEXEC | O_CREAT, 0o644)
            _ = pwrite(fd, "tail", 4, 8 << 20)
            var ts = [
                timespec(tv_sec: 0, tv_nsec: Int(HASHIFY_UTIME_OMIT)), timespec(tv_sec: 1_700_000_000, tv_nsec: 0),
            ]
            futimens(fd, &ts)
            close(fd)
        }
        // Empty files are never linked.
        for r in roots { writeFile("\(r)/usr/share/empty", "") }
        for r in roots { settleDirectoryTimes(r) }
        settle()
        let before = manifest(roots)
        let r1 = hashify(["unify", "--json"] + roots)
        #expect(r1.status == 0, "\(r1.err)")
        #expect(manifest(roots) == before)
        for f in ["usr/lib/lib0.so", "usr/lib/lib39.so", "usr/bin/tool", "usr/lib/sparse.img"] {
            #expect(inode("\(roots[0])/\(f)") == inode("\(roots[1])/\(f)"))
            #expect(inode("\(roots[0])/\(f)") == inode("\(roots[2])/\(f)"))
        }
        #expect(inode("\(roots[0])/usr/share/empty") != inode("\(roots[1])/usr/share/empty"))
        #expect(inode("\(roots[0])/etc/hostname") != inode("\(roots[1])/etc/hostname"))
        // The sparse file stays sparse (it was linked, not copied).
        var st = stat()
        lstat("\(roots[0])/usr/lib/sparse.img", &st)
        #expect(st.st_blocks < 100)
        let t = totals(r1.out)
        #expect(t["pathsLinked"] as? Int == 2 * 42)
        #expect(t["bytesSaved"] as? Int == t["bytesSavedMaximum"] as? Int)
        // Re-run: nothing to do, nothing changes.
        let r2 = hashify(["unify", "--json"] + roots)
        #expect(r2.status == 0)
        #expect(totals(r2.out)["pathsLinked"] as? Int == 0)
        #expect(manifest(roots) == before)
        // No temporary names anywhere.
        #expect(!run(["/usr/bin/find", s.path, "-name", ".hashify~*"]).out.contains("hashify~"))
    }

    enum Attribute: String, CaseIterable, Sendable {
        case mode, uid, gid, mtime, mtimeNanoseconds, userXattr, capability, trustedXattr
    }

    @Test("files differing in one identity attribute stay separate", arguments: Attribute.allCases)
    func identityAttribute(_ attribute: Attribute) throws {
        if !isRoot && [.uid, .gid, .capability, .trustedXattr].contains(attribute) { return }
        let s = Scratch("identity")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        let c = s.sub("guests/c")
        let content = pseudoRandom(3000, seed: 7)
        let cap: [UInt8] = [0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]  // cap_net_raw+p
        writeFile(
            "\(a)/usr/bin/f", content, mode: 0o755,
            xattrs: attribute == .capability ? [("security.capability", cap)] : [])
        writeFile(
            "\(c)/usr/bin/f", content, mode: 0o755,
            xattrs: attribute == .capability ? [("security.capability", cap)] : [])
        switch attribute {
        case .mode: writeFile("\(b)/usr/bin/f", content, mode: 0o4755)
        case .uid: writeFile("\(b)/usr/bin/f", content, mode: 0o755, uid: 1000)
        case .gid: writeFile("\(b)/usr/bin/f", content, mode: 0o755, gid: 1000)
        case .mtime: writeFile("\(b)/usr/bin/f", content, mode: 0o755, mtime: 1_600_000_000)
        case .mtimeNanoseconds: writeFile(b + "/usr/bin/f", content, mode: 0o755, mtimeNsec: 1)
        case .userXattr: writeFile("\(b)/usr/bin/f", content, mode: 0o755, xattrs: [("user.note", Array("x".utf8))])
        case .capability:
            var other = cap
            other[5] = 0x04  // another capability
            writeFile("\(b)/usr/bin/f", content, mode: 0o755, xattrs: [("security.capability", other)])
        case .trustedXattr: writeFile("\(b)/usr/bin/f", content, mode: 0o755, xattrs: [("trusted.x", [1])])
        }
        settle()
        let before = manifest([a, b, c])
        let r = hashify(["unify", a, b, c])
        #expect(r.status == 0, "\(r.err)")
        #expect(manifest([a, b, c]) == before)
        #expect(inode("\(a)/usr/bin/f") == inode("\(c)/usr/bin/f"), "a and c are identical")
        #expect(inode("\(a)/usr/bin/f") != inode("\(b)/usr/bin/f"), "b differs in \(attribute)")
    }

    @Test("guest-local hard links move together; links outside the roots keep an inode alone")
    func guestLocalHardLinks() throws {
        let s = Scratch("links")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        let outside = s.sub("outside")
        let content = pseudoRandom(4096, seed: 3)
        writeFile("\(a)/usr/bin/x", content)
        link("\(a)/usr/bin/x", "\(a)/usr/bin/x-again")
        mkdirs("\(a)/usr/sbin")
        link("\(a)/usr/bin/x", "\(a)/usr/sbin/x")
        writeFile("\(b)/usr/bin/x", content)
        // y in b has a link outside the roots: it must be left alone.
        writeFile("\(a)/usr/bin/y", pseudoRandom(2048, seed: 4))
        writeFile("\(b)/usr/bin/y", pseudoRandom(2048, seed: 4))
        mkdirs(outside)
        link("\(b)/usr/bin/y", "\(outside)/y")
        settle()
        let before = manifest([a, b, outside], inodes: false)
        let r = hashify(["unify", "--json", a, b])
        #expect(r.status == 0, "\(r.err)")
        #expect(manifest([a, b, outside]) == before)
        let ino = inode("\(a)/usr/bin/x")
        #expect(
            inode("\(a)/usr/bin/x-again") == ino && inode("\(a)/usr/sbin/x") == ino && inode("\(b)/usr/bin/x") == ino)
        #expect(inode("\(b)/usr/bin/y") == inode("\(outside)/y"))
        #expect(inode("\(a)/usr/bin/y") != inode("\(b)/usr/bin/y"))
        let skipped = jsonReport(r.out)["skipped"] as? [[String: Any]] ?? []
        #expect(
            skipped.contains {
                ($0["reason"] as? String) == "links-outside-roots" && ($0["path"] as? String) == "/usr/bin/y"
            })
    }

    @Test("--dry-run changes nothing (not even the store) and predicts the real run")
    func dryRun() throws {
        let s = Scratch("dry")
        let roots = (1...3).map { s.sub("guests/g\($0)") }
        for (i, r) in roots.enumerated() { makeGuest(r, index: i) }
        settle()
        let before = manifest(roots, inodes: true)
        let dry = hashify(["unify", "-n", "--json"] + roots)
        #expect(dry.status == 0, "\(dry.err)")
        #expect(manifest(roots, inodes: true) == before)
        #expect(access(s.sub("guests/.hashify"), F_OK) != 0, "a dry run creates no store")
        let real = hashify(["unify", "--json"] + roots)
        for key in [
            "pathsLinked", "inodesFreed", "bytesSaved", "bytesSavedMaximum", "identityGroups", "objectsCreated",
            "pathsWithOtherModificationTime",
        ] {
            #expect(totals(dry.out)[key] as? Int == totals(real.out)[key] as? Int, "\(key)")
        }
        // Per guest too: the dry run is the same outcome, tallied instead of linked.
        let guests = { (out: String) in
            (jsonReport(out)["guests"] as? [[String: Any]] ?? []).map { g in
                ["pathsLinked", "inodesFreed", "bytesSaved", "pathsShared"].map { g[$0] as? Int ?? -1 }
            }
        }
        #expect(guests(dry.out) == guests(real.out))
        #expect((totals(real.out)["pathsLinked"] as? Int ?? 0) > 0)
    }

    @Test("default excludes, dpkg conffiles and --include")
    func excludesAndConffiles() throws {
        let s = Scratch("excl")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        for r in [a, b] {
            writeFile("\(r)/etc/big.conf", pseudoRandom(999, seed: 1))
            writeFile("\(r)/var/lib/x/data", pseudoRandom(999, seed: 2))
            writeFile("\(r)/usr/share/conf-in-usr", pseudoRandom(999, seed: 3))
            writeFile("\(r)/usr/share/plain", pseudoRandom(999, seed: 4))
            writeFile("\(r)/usr/share/skip.pyc", pseudoRandom(999, seed: 5))
            writeFile(
                "\(r)/var/lib/dpkg/status",
                """
                Package: demo
                Status: install ok installed
                Conffiles:
                 /usr/share/conf-in-usr 0123456789abcdef0123456789abcdef
                 /etc/big.conf 0123456789abcdef0123456789abcdef obsolete
                Description: x

                """)
        }
        settle()
        let before = manifest([a, b])
        var r = hashify(["unify", "--exclude", "*.pyc", a, b])
        #expect(r.status == 0, "\(r.err)")
        #expect(manifest([a, b]) == before)
        #expect(inode("\(a)/usr/share/plain") == inode("\(b)/usr/share/plain"))
        #expect(inode("\(a)/etc/big.conf") != inode("\(b)/etc/big.conf"))
        #expect(inode("\(a)/var/lib/x/data") != inode("\(b)/var/lib/x/data"))
        #expect(inode("\(a)/usr/share/conf-in-usr") != inode("\(b)/usr/share/conf-in-usr"))
        #expect(inode("\(a)/usr/share/skip.pyc") != inode("\(b)/usr/share/skip.pyc"))
        r = hashify(["unify", "--include", "/var/lib/x", a, b])
        #expect(r.status == 0)
        #expect(inode("\(a)/var/lib/x/data") == inode("\(b)/var/lib/x/data"))
        #expect(
            inode("\(a)/usr/share/conf-in-usr") != inode("\(b)/usr/share/conf-in-usr"), "conffiles are never unified")
        r = hashify(["unify", "--no-default-excludes", a, b])
        #expect(inode("\(a)/etc/big.conf") != inode("\(b)/etc/big.conf"), "conffiles are never unified")
        #expect(manifest([a, b]) == before)
    }

    @Test("parallel hashing gives the same plan as one thread")
    func parallelEqualsSequential() throws {
        let s = Scratch("par")
        let roots = (1...4).map { s.sub("guests/g\($0)") }
        for (i, r) in roots.enumerated() { makeGuest(r, index: i, files: 120) }
        settle()
        let one = totals(hashify(["unify", "-n", "--json", "--threads", "1"] + roots).out)
        let four = totals(hashify(["unify", "-n", "--json", "--threads", "4"] + roots).out)
        for key in ["pathsLinked", "inodesFreed", "bytesSaved", "identityGroups", "candidates", "bytesHashed"] {
            #expect(one[key] as? Int == four[key] as? Int, "\(key)")
        }
    }

    @Test("the walk sees every entry of a guest whose root the read-ahead is still listing")
    func walkSeesWholeRootWhileWarmerLists() throws {
        let s = Scratch("warm")
        // A tiny first guest and a last guest with a wide root: the read-ahead
        // starts at the last guest's root and is still listing it when the walk
        // arrives there from the first.
        let small = s.sub("guests/a")
        let wide = s.sub("guests/b")
        writeFile("\(small)/only", "x\n")
        mkdirs(wide)
        for i in 0..<12_000 { writeFile("\(wide)/f\(i)", "file \(i)\n") }
        settle()
        for attempt in 0..<5 {
            let files = (totals(hashify(["unify", "-n", "--json", small, wide]).out)["filesScanned"] as? Int) ?? -1
            #expect(files == 12_001, "attempt \(attempt): the walk saw \(files) files")
        }
    }

    @Test(
        "comparing within a size group never merges different files (late differences, more distinct contents than representatives)"
    )
    func comparisonNeverMergesDifferentFiles() throws {
        let s = Scratch("compare")
        let roots = (1...4).map { s.sub("guests/g\($0)") }
        let base = pseudoRandom(300_000, seed: 42)
        // Six contents of one size and one metadata: the same but for the last byte,
        // a middle byte, the first byte; each present in several guests.
        var variants: [[UInt8]] = [base]
        for position in [base.count - 1, base.count / 2, 0, 1 << 17, base.count - 2] {
            var v = base
            v[position] ^= 0x5a
            variants.append(v)
        }
        for (g, r) in roots.enumerated() {
            for (i, v) in variants.enumerated() {
                writeFile("\(r)/usr/v\(i)", v)
                writeFile("\(r)/usr/w\((i + g) % variants.count)", v)  // the same contents under shuffled names
            }
        }
        settle()
        let before = manifest(roots)
        // A dry run (which compares without SHA-256 where it can) predicts the real run exactly.
        let dry = totals(hashify(["unify", "-n", "--json", "--threads", "2"] + roots).out)
        let r = hashify(["unify", "--json", "--threads", "2"] + roots)
        #expect(r.status == 0, "\(r.err)")
        #expect(manifest(roots) == before)
        for key in ["pathsLinked", "inodesFreed", "bytesSaved", "identityGroups"] {
            #expect(dry[key] as? Int == totals(r.out)[key] as? Int, "\(key): dry run predicts the real run")
        }
        // Exactly one inode per distinct content.
        var inodesOf: [Int: Set<UInt64>] = [:]
        for (g, r) in roots.enumerated() {
            for i in 0..<variants.count {
                inodesOf[i, default: []].insert(inode("\(r)/usr/v\(i)"))
                inodesOf[i, default: []].insert(inode("\(r)/usr/w\((i + g) % variants.count)"))
            }
        }
        for i in 0..<variants.count { #expect(inodesOf[i]!.count == 1, "variant \(i) is one inode") }
        #expect(Set(inodesOf.values.map { $0.first! }).count == variants.count, "different contents stay apart")
        #expect(totals(r.out)["identityGroups"] as? Int == variants.count)
    }

    @Test("--ignore-mtime merges files that differ only in mtime and says how many paths got another mtime")
    func ignoreMtime() throws {
        let s = Scratch("mtime")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        writeFile("\(a)/usr/f", pseudoRandom(500, seed: 1), mtime: 1_600_000_000)
        writeFile("\(b)/usr/f", pseudoRandom(500, seed: 1), mtime: 1_700_000_000)
        settle()
        var r = hashify(["unify", "--json", a, b])
        #expect(inode("\(a)/usr/f") != inode("\(b)/usr/f"))
        r = hashify(["unify", "--json", "--ignore-mtime", a, b])
        #expect(r.status == 0)
        #expect(inode("\(a)/usr/f") == inode("\(b)/usr/f"))
        #expect(totals(r.out)["pathsWithOtherModificationTime"] as? Int == 1)
    }

    @Test("the store is mode 0700 and holds one object per identity")
    func storeLayout() throws {
        let s = Scratch("store")
        let roots = (1...2).map { s.sub("guests/g\($0)") }
        for (i, r) in roots.enumerated() { makeGuest(r, index: i) }
        settle()
        let r = hashify(["unify", "--json"] + roots)
        #expect(r.status == 0)
        var st = stat()
        #expect(lstat(s.sub("guests/.hashify"), &st) == 0)
        #expect(st.st_mode & 0o777 == 0o700)
        let objects = run(["/usr/bin/find", s.sub("guests/.hashify/objects"), "-type", "f"]).out.split(separator: "\n")
        #expect(objects.count == totals(r.out)["identityGroups"] as? Int)
        #expect(linkCount("\(roots[0])/usr/bin/tool") == 3)
    }
}

@Suite("descriptor budget")
struct DescriptorBudgetTests {
    @Test("under ulimit -n 256, a tree with more directories than that loses nothing to EMFILE")
    func lowDescriptorLimit() throws {
        let s = Scratch("fdlimit")
        let roots = (1...3).map { s.sub("guests/g\($0)") }
        // 3 guests × 400 directories, each with two files shared by every guest
        // and one group of distinct contents of equal size (representatives stay open).
        for (g, r) in roots.enumerated() {
            for d in 0..<400 {
                let dir = "\(r)/usr/share/d\(d / 20)/e\(d)"
                writeFile("\(dir)/a", pseudoRandom(300 + d, seed: UInt64(d)))
                writeFile("\(dir)/b", pseudoRandom(2000, seed: UInt64(d) + 10_000))
                writeFile("\(dir)/own", pseudoRandom(777, seed: UInt64(g * 1000 + d) + 50_000))
            }
        }
        for r in roots { settleDirectoryTimes(r) }
        settle()
        let before = manifest(roots)
        let r = run(["/usr/bin/prlimit", "--nofile=256:256", hashifyBinary, "unify", "--json"] + roots)
        #expect(r.status == 0, "\(r.err)")
        let t = totals(r.out)
        #expect(t["skipped"] as? Int == 0, "\(r.out.prefix(2000))")
        #expect(t["pathsLinked"] as? Int == 2 * 400 * 2)
        #expect(manifest(roots) == before)
        #expect(inode("\(roots[0])/usr/share/d19/e399/b") == inode("\(roots[2])/usr/share/d19/e399/b"))
    }
}

/// Records what a run reports as progress.
final class RecordingProgress: ProgressSink, @unchecked Sendable {
    let lock = NSLock()
    var hashUpdates: [(done: Int, total: Int?, bytes: UInt64, totalBytes: UInt64?)] = []
    func update(phase: Phase, done: Int, total: Int?, bytes: UInt64, totalBytes: UInt64?) {
        guard phase == .hash else { return }
        lock.lock()
        hashUpdates.append((done, total, bytes, totalBytes))
        lock.unlock()
    }
    func finish() {}
}

@Suite("progress and bytes read")
struct ProgressTests {
    @Test("hashing progress never passes its total and ends on it; large files are read once")
    func progressAddsUp() throws {
        let s = Scratch("progress")
        let roots = (1...3).map { s.sub("g\($0)") }
        for (g, r) in roots.enumerated() {
            makeGuest(r, index: g)
            // Large files: one group of equal content, one of distinct contents of equal size.
            writeFile("\(r)/usr/lib/big.bin", pseudoRandom(3 << 20, seed: 7))
            writeFile("\(r)/usr/lib/big-own.bin", pseudoRandom(2 << 20, seed: UInt64(100 + g)))
            // Small files of one size with distinct contents (more than one representative).
            for k in 0..<3 { writeFile("\(r)/usr/share/v\(k)", pseudoRandom(4096, seed: UInt64(1000 + (g + k) % 3))) }
        }
        settle()
        let before = manifest(roots)
        let sink = RecordingProgress()
        let report = try Unifier(options: UnifyOptions(roots: roots.map { FilePath($0) }), progress: sink).run()
        #expect(manifest(roots) == before)
        let last = try #require(sink.hashUpdates.max { $0.bytes < $1.bytes })
        for u in sink.hashUpdates { #expect(u.bytes <= u.totalBytes ?? 0 && u.done <= u.total ?? 0) }
        #expect(last.bytes == last.totalBytes && last.bytes == report.totals.bytesToHash)
        #expect(sink.hashUpdates.map(\.done).max() == report.totals.candidates)
        // Every large file is read once: 3 × 3 MiB + 3 × 2 MiB of the 15 MiB of large candidates.
        let large = UInt64(3 * (3 << 20) + 3 * (2 << 20))
        try #require(
            report.totals.bytesToHash >= large, "every large file is a candidate: \(report.skipped.map(\.detail))")
        let small = report.totals.bytesToHash - large
        #expect(report.totals.bytesHashed <= large + 2 * small)
    }
}
