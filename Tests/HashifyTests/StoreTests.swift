import Foundation
import HashifyEngine
import HashifySystem
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("re-runs, index, status, verify, gc, split, lock", .serialized)
struct StoreTests {
    func guests(_ s: Scratch, count: Int = 3, files: Int = 40) -> [String] {
        let roots = (1...count).map { s.sub("guests/g\($0)") }
        for (i, r) in roots.enumerated() { makeGuest(r, index: i, files: files) }
        // Candidates that stay different: same size and metadata, other content.
        for (i, r) in roots.enumerated() {
            writeFile("\(r)/usr/share/same-size", pseudoRandom(4000, seed: UInt64(500 + i)))
        }
        settle()
        return roots
    }

    @Test("a re-run reads nothing when nothing changed")
    func rerunReadsNothing() {
        let s = Scratch("rerun")
        let roots = guests(s)
        let first = totals(hashify(["unify", "--json"] + roots).out)
        #expect((first["bytesHashed"] as? Int ?? 0) > 0)
        settle()
        let second = totals(hashify(["unify", "--json"] + roots).out)
        #expect(second["bytesHashed"] as? Int == 0)
        #expect(second["pathsLinked"] as? Int == 0)
        #expect((second["indexHits"] as? Int ?? 0) >= 3, "the same-size files are answered by the index")
    }

    @Test("a changed file is re-hashed, also when its mtime was put back (ctime moves)")
    func changedFileRehashed() throws {
        let s = Scratch("changed")
        let roots = guests(s)
        _ = hashify(["unify"] + roots)
        settle()
        // Change content, keep size, put the mtime back: only ctime tells.
        let path = "\(roots[1])/usr/share/same-size"
        var st = stat()
        lstat(path, &st)
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        _ = pwrite(fd, "X", 1, 0)
        var ts = [st.st_atim, st.st_mtim]
        futimens(fd, &ts)
        close(fd)
        settle()
        let r = totals(hashify(["unify", "--json"] + roots).out)
        #expect(r["bytesHashed"] as? Int == 4000, "only the changed file is read")
    }

    @Test("re-merge after independent updates equals a fresh full run")
    func remergeAfterUpdates() throws {
        let s = Scratch("update")
        let roots = guests(s, count: 4)
        let copy = s.sub("fresh")
        _ = hashify(["unify"] + roots)
        // Guests "update" lib3.so one by one: rename a new file over it (as dpkg does).
        for (i, r) in roots.enumerated() {
            writeFile("\(r)/usr/lib/lib3.so.dpkg-new", pseudoRandom(7777, seed: 4242), mtime: 1_710_000_000)
            rename("\(r)/usr/lib/lib3.so.dpkg-new", "\(r)/usr/lib/lib3.so")
            if i == 1 {
                settle()
                _ = hashify(["unify"] + roots)
            }  // half updated: partial re-merge
        }
        settle()
        let before = manifest(roots)
        // A fresh copy of the same guests, never unified.
        _ = run(["/bin/cp", "-a", s.sub("guests"), copy])
        let freshRoots = (1...4).map { "\(copy)/g\($0)" }
        _ = run(["/bin/rm", "-rf", "\(copy)/.hashify"])
        for r in freshRoots {
            _ = run([
                "/bin/sh", "-c",
                "cd '\(r)' && for f in $(find . -type f); do cp -p \"$f\" \"$f.x\" && mv \"$f.x\" \"$f\"; done",
            ])
        }
        settle()
        let incremental = totals(hashify(["unify", "--json"] + roots).out)
        let fresh = hashify(["unify", "--json"] + freshRoots)
        #expect(manifest(roots) == before)
        #expect(incremental["bytesHashed"] as? Int ?? 0 <= 4 * 7777 + 3 * 4000, "reads only what changed")
        // Same sharing structure: every guest path groups the same way.
        func groups(_ rs: [String]) -> Set<[String]> {
            var byInode: [UInt64: [String]] = [:]
            for (g, r) in rs.enumerated() {
                for line in run(["/usr/bin/find", r, "-type", "f", "-printf", "%i %P\n"]).out.split(separator: "\n") {
                    let f = line.split(separator: " ", maxSplits: 1)
                    byInode[UInt64(f[0])!, default: []].append("g\(g)/" + f[1])
                }
            }
            return Set(byInode.values.map { $0.sorted() })
        }
        #expect(groups(roots) == groups(freshRoots))
        #expect(totals(fresh.out)["pathsLinked"] as? Int ?? 0 > 0)
    }

    @Test(
        "a truncated or corrupt index is reported, rebuilt and never merges different content",
        arguments: ["truncate", "flip", "garbage"])
    func corruptIndex(_ damage: String) throws {
        let s = Scratch("index")
        let roots = guests(s)
        _ = hashify(["unify"] + roots)
        let index = s.sub("guests/.hashify/index")
        var data = try Data(contentsOf: URL(fileURLWithPath: index))
        switch damage {
        case "truncate": data = data.prefix(data.count / 2)
        case "flip": data[data.count / 2] ^= 0xff
        default: data = Data("not an index at all".utf8)
        }
        try data.write(to: URL(fileURLWithPath: index))
        settle()
        let before = manifest(roots)
        let r = hashify(["unify", "--json"] + roots)
        #expect(r.status == 0)
        let notes = jsonReport(r.out)["notes"] as? [String] ?? []
        #expect(notes.contains { $0.contains("index") }, "damage is reported: \(notes)")
        #expect(totals(r.out)["indexHits"] as? Int == 0)
        #expect(manifest(roots) == before)
        #expect(inode("\(roots[0])/usr/share/same-size") != inode("\(roots[1])/usr/share/same-size"))
        settle()
        #expect(totals(hashify(["unify", "--json"] + roots).out)["bytesHashed"] as? Int == 0, "rebuilt")
    }

    @Test("verify finds an object written in place; --repair splits it and removes the object")
    func verifyRepair() throws {
        let s = Scratch("verify")
        let roots = guests(s)
        _ = hashify(["unify"] + roots)
        var r = hashify(["verify", "--json"] + roots)
        #expect(r.status == 0)
        #expect((jsonReport(r.out)["damaged"] as? [Any])?.isEmpty == true)
        // A guest writes into a shared file in place: every guest sees it.
        let victim = "\(roots[0])/usr/bin/tool"
        let fd = open(victim, O_WRONLY | O_CLOEXEC)
        _ = pwrite(fd, "EVIL", 4, 100)
        close(fd)
        settle()
        let before = manifest(roots)
        r = hashify(["verify", "--json"] + roots)
        #expect(r.status == 1)
        let damaged = jsonReport(r.out)["damaged"] as? [[String: Any]] ?? []
        #expect(damaged.count == 1)
        #expect((damaged.first?["paths"] as? [Any])?.count == 3)
        r = hashify(["verify", "--repair", "--json"] + roots)
        #expect(r.status == 1)
        #expect(jsonReport(r.out)["pathsSplit"] as? Int == 3)
        #expect(manifest(roots) == before, "each path keeps what it showed")
        #expect(linkCount(victim) == 1)
        #expect(inode(victim) != inode("\(roots[1])/usr/bin/tool"))
        #expect(hashify(["verify"] + roots).status == 0, "the damaged object left the store")
    }

    @Test("gc removes only objects no guest links")
    func gc() throws {
        let s = Scratch("gc")
        let roots = guests(s)
        _ = hashify(["unify"] + roots)
        let objects = {
            run(["/usr/bin/find", s.sub("guests/.hashify/objects"), "-type", "f"]).out.split(separator: "\n").count
        }
        let n = objects()
        // Every guest drops lib5.so: its object is unreferenced now.
        for r in roots { unlink("\(r)/usr/lib/lib5.so") }
        let before = manifest(roots)
        var r = hashify(["gc", "-n", "--json"] + roots)
        #expect(jsonReport(r.out)["objectsRemoved"] as? Int == 1)
        #expect(objects() == n)
        r = hashify(["gc", "--json"] + roots)
        #expect(r.status == 0)
        #expect(jsonReport(r.out)["objectsRemoved"] as? Int == 1)
        #expect(objects() == n - 1)
        #expect(manifest(roots) == before)
        #expect(jsonReport(hashify(["gc", "--json"] + roots).out)["objectsRemoved"] as? Int == 0)
    }

    @Test("split keeps a guest's hard links: its names get one private copy together, by --root and by PATH")
    func splitKeepsGuestHardLinks() throws {
        let s = Scratch("split")
        let roots = guests(s)
        for r in roots { link("\(r)/usr/lib/lib4.so", "\(r)/usr/lib/lib4-again.so") }
        settle()
        #expect(hashify(["unify", "-q"] + roots).status == 0)
        let before = manifest(roots, links: true)
        // By --root: every unified file of the guest, each inode's names one copy.
        var r = hashify(["split", "-q", "--root", roots[0]])
        #expect(r.status == 0, "\(r.err)")
        #expect(inode("\(roots[0])/usr/lib/lib4.so") == inode("\(roots[0])/usr/lib/lib4-again.so"))
        #expect(linkCount("\(roots[0])/usr/lib/lib4.so") == 2, "a private inode with the guest's two names")
        // By PATH: the named path's other names in the guest come along.
        r = hashify(["split", "-q", "\(roots[1])/usr/lib/lib4-again.so"])
        #expect(r.status == 0, "\(r.err)")
        #expect(inode("\(roots[1])/usr/lib/lib4.so") == inode("\(roots[1])/usr/lib/lib4-again.so"))
        #expect(linkCount("\(roots[1])/usr/lib/lib4.so") == 2)
        #expect(inode("\(roots[1])/usr/lib/lib4.so") != inode("\(roots[2])/usr/lib/lib4.so"))
        let after = manifest(roots, links: true)
        #expect(after == before, "split changed what guests see:\n\(manifestDiff(before, after))")
        #expect(run(["/usr/bin/find", s.path, "-name", ".hashify~*"]).out.isEmpty)
    }

    @Test("split gives private copies with identical manifests")
    func split() throws {
        let s = Scratch("split")
        let roots = guests(s)
        _ = hashify(["unify"] + roots)
        let before = manifest(roots)
        var r = hashify([
            "split", "--store", s.sub("guests/.hashify"), "\(roots[0])/usr/bin/tool", "\(roots[0])/usr/lib/lib2.so",
        ])
        #expect(r.status == 0, "\(r.err)")
        #expect(linkCount("\(roots[0])/usr/bin/tool") == 1)
        #expect(linkCount("\(roots[1])/usr/bin/tool") == 3, "the other guests and the store still share it")
        #expect(manifest(roots) == before)
        r = hashify(["split", "--root", roots[1], "--include", "/usr/lib/*", "--json"])
        #expect(r.status == 0, "\(r.err)")
        #expect(linkCount("\(roots[1])/usr/lib/lib7.so") == 1)
        #expect(linkCount("\(roots[1])/usr/bin/tool") > 1)
        r = hashify(["split", "--root", roots[2]])
        #expect(r.status == 0)
        #expect(run(["/usr/bin/find", roots[2], "-type", "f", "-links", "+1"]).out.isEmpty)
        #expect(manifest(roots) == before)
        #expect(hashify(["split", "--store", s.sub("guests/.hashify"), "/etc/passwd"]).status == 2)
        #expect(run(["/usr/bin/find", s.path, "-name", ".hashify~*"]).out.isEmpty)
    }

    @Test("two runs on one store never interleave: the second waits, or exits 3 with --no-wait")
    func lock() throws {
        let s = Scratch("lock")
        let roots = guests(s)
        _ = hashify(["unify"] + roots)
        for r in roots { writeFile("\(r)/usr/new", pseudoRandom(999, seed: 1)) }
        settle()
        // Hold the store lock as another run would.
        let fd = open(s.sub("guests/.hashify/lock"), O_RDWR | O_CLOEXEC)
        #expect(flock(fd, LOCK_EX) == 0)
        let busy = hashify(["unify", "--no-wait"] + roots)
        #expect(busy.status == 3)
        #expect(busy.err.contains("in use"))
        #expect(hashify(["gc", "--no-wait"] + roots).status == 3)
        #expect(hashify(["split", "--no-wait", "--root", roots[0]]).status == 3)
        #expect(linkCount("\(roots[0])/usr/new") == 1, "nothing changed while locked")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: hashifyBinary)
        p.arguments = ["unify", "-q"] + roots
        try p.run()
        usleep(400_000)
        #expect(p.isRunning, "waits for the lock")
        #expect(linkCount("\(roots[0])/usr/new") == 1)
        close(fd)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        #expect(linkCount("\(roots[0])/usr/new") == 4)
    }

    @Test("status reports sharing, unreferenced objects and what a re-run would gain")
    func status() throws {
        let s = Scratch("status")
        let roots = guests(s)
        _ = hashify(["unify"] + roots)
        for r in roots { unlink("\(r)/usr/lib/lib5.so") }
        writeFile("\(roots[0])/usr/more", pseudoRandom(999, seed: 1))
        writeFile("\(roots[1])/usr/more", pseudoRandom(999, seed: 1))
        settle()
        let r = hashify(["status", "--json"] + roots)
        #expect(r.status == 0, "\(r.err)")
        let j = jsonReport(r.out)
        let health = j["storeHealth"] as? [String: Any] ?? [:]
        #expect(health["unreferencedObjects"] as? Int == 1)
        #expect(j["rerunWouldLinkPaths"] as? Int == 1)
        let g = (j["guests"] as? [[String: Any]])?.first ?? [:]
        #expect((g["pathsShared"] as? Int ?? 0) >= 40)
        // Without roots, the store remembers them.
        let remembered = hashify(["status", "--json", "--store", s.sub("guests/.hashify")])
        #expect((jsonReport(remembered.out)["guests"] as? [Any])?.count == 3)
    }
}
