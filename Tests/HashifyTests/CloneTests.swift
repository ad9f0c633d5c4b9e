import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("hashify clone", .serialized, .enabled(if: isRoot, "clones carry owners and trusted xattrs (root)"))
struct CloneTests {
    @Test("hardlink mode: a clone shows exactly the source; store objects linked, conffiles and mutable trees copied")
    func hardlinkClone() throws {
        let s = Scratch("clone")
        let store = s.sub("store")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        let c = s.sub("guests/c")
        try makeRichGuest(a, index: 0)
        try makeRichGuest(b, index: 1)
        writeFile(
            "\(a)/var/lib/dpkg/status",
            "Package: base-files\nStatus: install ok installed\nConffiles:\n /usr/lib/lib9.so 0123\n\n")
        settle()
        #expect(hashify(["unify", "-q", "--store", store, a, b]).status == 0)
        let before = guestManifest(a)
        let objectLinks = linkCount("\(a)/usr/lib/lib5.so")
        let r = hashify(["clone", "--json", "--store", store, a, c])
        #expect(r.status == 0, "\(r.err)")
        let report = jsonReport(r.out)
        #expect((report["filesShared"] as? Int ?? 0) > 20)
        #expect(guestManifest(c) == before, "the clone shows what the source shows")
        #expect(guestManifest(a) == before)
        #expect(linkCount("\(c)/usr/lib/lib5.so") == objectLinks + 1, "a store object, linked")
        #expect(inode("\(c)/usr/lib/lib5.so") == inode("\(a)/usr/lib/lib5.so"))
        #expect(inode("\(c)/etc/hostname") != inode("\(a)/etc/hostname"), "mutable trees are copied")
        #expect(inode("\(c)/usr/lib/lib9.so") != inode("\(a)/usr/lib/lib9.so"), "dpkg conffiles are copied")
        #expect(inode("\(c)/usr/bin/tool") == inode("\(c)/usr/bin/tool-hard"), "guest-local hard links kept")
        #expect(hashify(["clone", "--store", store, a, c]).status == 2, "DST exists")
        #expect(hashify(["clone", "--store", store, s.sub("missing"), s.sub("guests/d")]).status == 2)
        #expect(
            hashify(["clone", "--store", store, "--lxc", "x", a, s.sub("guests/x")]).status == 2,
            "--lxc needs an LXC rootfs")
    }

    @Test("a clone inside its source, a source on another filesystem: exit 2, nothing changed")
    func cloneRefusals() throws {
        let s = Scratch("clonebad")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        makeGuest(a, index: 0)
        makeGuest(b, index: 1)
        settleDirectoryTimes(a)
        settleDirectoryTimes(b)
        settle()
        #expect(hashify(["unify", "-q", a, b]).status == 0)
        let before = manifest([s.path])
        for (src, dst) in [
            (a, "\(a)/usr/clone"), (a, "\(a)/clone"), ("\(a)/usr", "\(a)/usr/x"), (a, "\(a)/usr/../clone"),
        ] {
            let r = hashify(["clone", src, dst])
            #expect(r.status == 2, "\(src) -> \(dst): \(r.status) \(r.err)")
            #expect(r.err.contains("inside the source"), "\(r.err)")
        }
        let proc = hashify(["clone", "--store", s.sub("guests/.hashify"), "/proc", s.sub("guests/p")])
        #expect(proc.status == 2, "\(proc.err)")
        #expect(proc.err.contains("/proc"), "\(proc.err)")
        let after = manifest([s.path])
        #expect(after == before, "a refusal changed something:\n\(manifestDiff(before, after))")
    }

    @Test("the new user's path: unify LXC guests, then clone one with --lxc into a container that does not exist yet")
    func newUserPath() throws {
        let s = Scratch("clonelxc")
        let lxcpath = s.sub("lxc")
        for (i, n) in ["web1", "web2"].enumerated() {
            makeGuest("\(lxcpath)/\(n)/rootfs", index: i)
            writeFile("\(lxcpath)/\(n)/config", "lxc.uts.name = \(n)\nlxc.rootfs.path = dir:\(lxcpath)/\(n)/rootfs\n")
        }
        settle()
        #expect(hashify(["unify", "-q", "\(lxcpath)/web1/rootfs", "\(lxcpath)/web2/rootfs"]).status == 0)
        #expect(FileManager.default.fileExists(atPath: "\(lxcpath)/.hashify/objects"))
        // Without --lxc the container directory must exist: one line, nothing made.
        let missing = hashify(["clone", "\(lxcpath)/web1/rootfs", "\(lxcpath)/web5/rootfs"])
        #expect(missing.status == 2 && missing.err.contains("\(lxcpath)/web5: no such directory"), "\(missing.err)")
        #expect(!FileManager.default.fileExists(atPath: "\(lxcpath)/web5"))
        // With --lxc, LXCPATH/NAME is made as lxc-copy makes it, and the store unify made is found.
        let r = hashify(["clone", "--lxc", "web4", "\(lxcpath)/web1/rootfs", "\(lxcpath)/web4/rootfs"])
        #expect(r.status == 0, "\(r.err)")
        #expect(guestManifest("\(lxcpath)/web4/rootfs") == guestManifest("\(lxcpath)/web1/rootfs"))
        let config = (try? String(contentsOfFile: "\(lxcpath)/web4/config", encoding: .utf8)) ?? ""
        #expect(config.contains("lxc.uts.name = web4") && config.contains("rootfs.path = dir:\(lxcpath)/web4/rootfs"))
        #expect(!FileManager.default.fileExists(atPath: "\(lxcpath)/web1/.hashify"), "a second store was made")
        // Every command finds the same store for the clone.
        #expect(hashify(["status", "-q", "\(lxcpath)/web4/rootfs"]).status == 0)
        #expect(hashify(["unify", "-q", "\(lxcpath)/web4/rootfs"]).status == 0)
        #expect(hashify(["split", "-q", "\(lxcpath)/web4/rootfs/usr/bin/tool"]).status == 0)
        #expect(!FileManager.default.fileExists(atPath: "\(lxcpath)/web4/.hashify"), "a second store was made")
        #expect(linkCount("\(lxcpath)/web4/rootfs/usr/bin/tool") == 1)
    }

    @Test("overlay mode: a clone is a new overlay guest over the same objects; writes stay in it")
    func overlayClone() throws {
        let s = Scratch("ovclone")
        let store = s.sub("store")
        let a = s.sub("guests/a")
        let c = s.sub("guests/c")
        try makeRichGuest(a, index: 0)
        settle()
        #expect(overlay(["convert", "-q", a], store: store).status == 0)
        writeFile("\(a)/usr/share/changed-in-a", pseudoRandom(5000, seed: 3))
        settle()
        let before = guestManifest(a)
        let r = hashify(["clone", "--json", "--store", store, a, c])
        #expect(r.status == 0, "\(r.err)")
        #expect(jsonReport(r.out)["mode"] as? String == "overlay")
        #expect(isOverlayMount(c))
        #expect(guestManifest(c) == before)
        writeFile("\(c)/usr/lib/lib1.so", "changed in the clone\n")
        settle()
        #expect(guestManifest(a) == before, "the source is unchanged")
        #expect(overlay(["umount", a, c], store: store).status == 0)
        #expect(hashify(["unify", "-q", "--store", store, a, c]).status == 0)
        #expect(overlay(["mount", a, c], store: store).status == 0)
        #expect(guestManifest(a) == before)
        // A source folded twice (its third image) clones exactly too, and shares its image.
        writeFile("\(a)/etc/changed-again", pseudoRandom(9000, seed: 4))
        settle()
        let again = guestManifest(a)
        #expect(overlay(["umount", a], store: store).status == 0)
        #expect(overlay(["fold", "-q", a], store: store).status == 0)
        #expect(overlay(["mount", a], store: store).status == 0)
        let status = jsonReport(hashify(["status", "--json", "--store", store]).out)
        let guests = (status["overlay"] as? [String: Any])?["guests"] as? [[String: Any]] ?? []
        #expect(guests.first { ($0["root"] as? String)?.hasSuffix("/a") == true }?["generation"] as? Int == 3)
        let d = s.sub("guests/d")
        #expect(hashify(["clone", "-q", "--store", store, a, d]).status == 0)
        #expect(guestManifest(d) == again)
        #expect(guestManifest(a) == again)
        // One image file for both (one page-cache copy) until one of them folds.
        let images = [a, d].map { r in
            run([
                "/bin/sh", "-c",
                "for x in \(store)/overlay/*; do [ \"$(cat $x/root)\" = '\(r)' ] && stat -c %i $x/g*/meta.erofs; done",
            ]).out
        }
        #expect(!images[0].isEmpty && images[0] == images[1], "\(images)")
    }

    @Test("SIGKILL during clone: DST is absent or complete, never half")
    func killDuringClone() throws {
        let s = Scratch("clonekill")
        let store = s.sub("store")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        try makeRichGuest(a, index: 0)
        for d in 0..<10 {
            for i in 0..<40 { writeFile("\(a)/usr/d\(d)/f\(i)", pseudoRandom(500 + i * 97, seed: UInt64(d * 40 + i))) }
        }
        settleDirectoryTimes(a)
        try makeRichGuest(b, index: 1)
        settle()
        #expect(hashify(["unify", "-q", "--store", store, a, b]).status == 0)
        let source = guestManifest(a)
        let t0 = Date()
        #expect(hashify(["clone", "-q", "--store", store, a, s.sub("guests/probe")]).status == 0)
        var window = max(0.05, Date().timeIntervalSince(t0))
        var kills = 0
        var i = 0
        // At least 12 runs, and on until 3 were killed mid-way (a loaded machine makes the window differ).
        while i < 12 || (kills < 3 && i < 60) {
            defer { i += 1 }
            let dst = s.sub("guests/k\(i)")
            let p = Process()
            p.executableURL = URL(fileURLWithPath: hashifyBinary)
            p.arguments = ["clone", "-q", "--store", store, a, dst]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            if killAtRandom(p, window: &window, fraction: 0.05...0.9, shrink: 0.7) { kills += 1 }
            p.waitUntilExit()
            if FileManager.default.fileExists(atPath: dst) {
                #expect(guestManifest(dst) == source, "after kill \(i): complete")
            }
        }
        print("clone kill test: \(kills) of \(i) killed")
        #expect(kills >= 3)
        #expect(guestManifest(a) == source)
    }
}

@Suite(
    "hashify clone with real LXC", .serialized,
    .enabled(
        if: isRoot && FileManager.default.isExecutableFile(atPath: lxcStart), "needs root and LXC (apt-get install lxc)"
    ))
struct CloneLXCTests {
    @Test(
        "clone --lxc of a container: the clone starts with lxc-start, under its own name, and shares the source's objects"
    )
    func lxcClone() throws {
        let s = Scratch("clonelxc")
        let store = s.sub("store")
        let lxcpath = s.sub("lxc")
        let src = "\(lxcpath)/c1/rootfs"
        let dst = "\(lxcpath)/c2/rootfs"
        makeLXCContainer(
            lxcpath: lxcpath, name: "c1", initScript: "hostname > /tmp/name 2>/dev/null || echo started > /tmp/name")
        // A second guest so that unify has something to share.
        let other = s.sub("other")
        installProgram("/bin/sh", into: other)
        installProgram("/bin/sleep", into: other)
        settle()
        #expect(hashify(["unify", "-q", "--store", store, src, other]).status == 0)
        mkdirs("\(lxcpath)/c2")
        let r = hashify(["clone", "--json", "--store", store, "--lxc", "c2", src, dst])
        #expect(r.status == 0, "\(r.err)")
        let config = (try? String(contentsOfFile: "\(lxcpath)/c2/config", encoding: .utf8)) ?? ""
        #expect(config.contains("lxc.uts.name = c2") && config.contains("lxc.rootfs.path = dir:\(dst)"), "\(config)")
        #expect(inode("\(dst)/bin/sleep") == inode("\(src)/bin/sleep"), "the clone links the store's object")
        defer { _ = run(["/usr/bin/lxc-stop", "-P", lxcpath, "-n", "c2", "-k"]) }
        let start = run(["/usr/bin/lxc-start", "-P", lxcpath, "-n", "c2", "-l", "INFO", "-o", s.sub("c2.log")])
        #expect(start.status == 0, "lxc-start: \(start.err)")
        var state = ""
        for _ in 0..<50 {
            state = run(["/usr/bin/lxc-info", "-P", lxcpath, "-n", "c2", "-s"]).out
            if state.contains("RUNNING") && FileManager.default.fileExists(atPath: "\(dst)/tmp/name") { break }
            usleep(100_000)
        }
        #expect(state.contains("RUNNING"), "\(state)")
        #expect(FileManager.default.fileExists(atPath: "\(dst)/tmp/name"), "the clone's init ran")
        #expect(!FileManager.default.fileExists(atPath: "\(src)/tmp/name"), "in the clone, not the source")
    }
}
