import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The entries of a `manifest --json` report by path.
private func manifestEntries(_ out: String) -> [String: [String: Any]] {
    let entries = jsonReport(out)["entries"] as? [[String: Any]] ?? []
    return Dictionary(entries.map { ($0["path"] as? String ?? "", $0) }, uniquingKeysWith: { a, _ in a })
}

private func sha256(_ path: String) -> String {
    String(run(["/usr/bin/sha256sum", path]).out.prefix(64))
}

@Suite("hashify manifest: what is unified in one guest")
struct ManifestTests {
    @Test(
        "hardlink mode: every entry with its attributes, shared files with their guest count, private ones marked; nothing changed; found by name"
    )
    func hardlinkManifest() throws {
        let s = Scratch("manifest")
        let roots = (0..<3).map { s.sub("guests/g\($0)") }
        for (i, r) in roots.enumerated() { makeGuest(r, index: i) }
        writeFile(
            "\(roots[0])/usr/share/tagged", pseudoRandom(1500, seed: 12), xattrs: [("user.origin", Array("guest".utf8))]
        )
        settle()
        #expect(hashify(["unify", "-q"] + roots).status == 0)
        settle()
        let before = manifest(roots, inodes: true)
        let r = hashify(["manifest", "--json", roots[0]])
        #expect(r.status == 0, "\(r.err)")
        let e = manifestEntries(r.out)
        let found = Set(
            run(["/usr/bin/find", roots[0]]).out.split(separator: "\n").map { p -> String in
                let rel = String(p.dropFirst(roots[0].count))
                return rel.isEmpty ? "/" : rel
            })
        #expect(Set(e.keys) == found, "every entry of the guest, nothing else")
        let lib = e["/usr/lib/lib4.so"] ?? [:]
        #expect(lib["sharing"] as? String == "shared" && lib["guests"] as? Int == 3, "\(lib)")
        #expect(lib["digest"] as? String == sha256("\(roots[0])/usr/lib/lib4.so"))
        #expect(
            lib["mode"] as? String == "0644" && lib["type"] as? String == "file" && lib["size"] as? Int == 1000 + 4 * 37
        )
        let own = e["/usr/share/private-0"] ?? [:]
        #expect(own["sharing"] as? String == "private" && own["guests"] as? Int == 1)
        #expect(
            e["/usr/bin/link"]?["type"] as? String == "symlink"
                && e["/usr/bin/link"]?["target"] as? String == "../lib/lib1.so")
        #expect(e["/usr/share/fifo"]?["type"] as? String == "fifo" && e["/usr/share/fifo"]?["sharing"] == nil)
        #expect((e["/usr/share/tagged"]?["xattrs"] as? [String: String])?["user.origin"] == "6775657374")
        let totals = jsonReport(r.out)["totals"] as? [String: Any] ?? [:]
        #expect(totals["sharedFiles"] as? Int == 41 && (totals["privateFiles"] as? Int ?? 0) >= 1, "\(totals)")

        // By the name a config gives it; the text form has a line per entry and the totals.
        let config = s.sub("hashify.toml")
        writeFile(config, "[guest.web]\nroot = \"\(roots[0])\"\n")
        let text = hashify(["manifest", "--config", config, "--store", s.sub("guests/.hashify"), "web"])
        #expect(text.status == 0, "\(text.err)")
        #expect(
            text.out.contains("shared     3  file        0644  0:0") && text.out.contains("/usr/lib/lib4.so"),
            "\(text.out.prefix(600))")
        #expect(text.out.contains("web (hardlink mode): \(e.count) entries"), "\(text.out.suffix(300))")
        let unknown = hashify(["manifest", "--config", config, "nosuchguest"])
        #expect(unknown.status == 2 && unknown.err.contains("no guest of that name"))
        #expect(manifest(roots, inodes: true) == before, "manifest changes nothing")
    }

    @Test(
        "overlay mode: a copied-up file is private, the rest shared by the guests' stubs; an unmounted guest is read through a private mount",
        .enabled(if: isRoot, "overlay mounts need root"))
    func overlayManifest() throws {
        let s = Scratch("manifestov")
        let store = s.sub("store")
        let roots = (0..<2).map { s.sub("guests/g\($0)") }
        for (i, r) in roots.enumerated() { try makeRichGuest(r, index: i) }
        settle()
        #expect(overlay(["convert", "-q"] + roots, store: store).status == 0)
        writeFile("\(roots[0])/usr/lib/lib4.so", pseudoRandom(2000, seed: 4))
        settle()
        let seen = roots.map(guestManifest)
        let r = hashify(["manifest", "--json", "--store", store, roots[0]])
        #expect(r.status == 0, "\(r.err)")
        #expect(jsonReport(r.out)["mode"] as? String == "overlay")
        var e = manifestEntries(r.out)
        #expect(e["/usr/lib/lib4.so"]?["sharing"] as? String == "private")
        #expect(e["/usr/lib/lib4.so"]?["digest"] as? String == sha256("\(roots[0])/usr/lib/lib4.so"))
        #expect(
            e["/usr/lib/lib5.so"]?["sharing"] as? String == "shared" && e["/usr/lib/lib5.so"]?["guests"] as? Int == 2)
        #expect(e["/etc/tiny"]?["sharing"] as? String == "private", "small files stay whole in the metadata image")
        #expect(overlay(["umount"] + roots, store: store).status == 0)
        let unmounted = hashify(["manifest", "--json", "--store", store, roots[1]])
        #expect(unmounted.status == 0, "\(unmounted.err)")
        e = manifestEntries(unmounted.out)
        // g0 copied it up, but its image references the object until its next fold: counted.
        #expect(
            e["/usr/lib/lib4.so"]?["sharing"] as? String == "shared" && e["/usr/lib/lib4.so"]?["guests"] as? Int == 2)
        #expect(e["/usr/lib/lib5.so"]?["guests"] as? Int == 2)
        #expect(!isOverlayMount(roots[1]), "the private mount is gone, the guest stays unmounted")
        #expect(overlay(["mount"] + roots, store: store).status == 0)
        #expect(roots.map(guestManifest) == seen)
        #expect(overlay(["umount"] + roots, store: store).status == 0)
    }
}

@Suite(
    "backup and restore keep the sharing", .serialized,
    .enabled(if: isRoot, "restoring owners and trusted xattrs needs root"))
struct BackupTests {
    /// Guests for a backup: what tar and rsync cannot copy is left out (tar skips sockets; neither
    /// copies paths longer than PATH_MAX, which the README says too). The special files get an
    /// mtime in the past, as a guest's have: rsync leaves the time of a special file it creates
    /// within the same second as the original's mtime.
    func makeBackupGuest(_ root: String, index: Int) throws {
        try makeRichGuest(root, index: index)
        #expect(
            run([
                "/bin/rm", "-rf", "\(root)/usr/share/socket", "\(root)/usr/share/" + String(repeating: "a", count: 100),
            ]).status == 0)
        #expect(
            run(
                ["/usr/bin/touch", "-h", "-d", "@1600000000.25", "\(root)/usr/bin/link", "\(root)/usr/share/fifo"]
                    + (isRoot ? ["\(root)/usr/share/null"] : [])
            ).status == 0)
        settleDirectoryTimes(root)
    }

    /// Paths of the guests' regular files grouped by inode (the sharing), relative to `base`.
    func sharing(_ roots: [String], base: String) -> Set<Set<String>> {
        var byInode: [UInt64: Set<String>] = [:]
        for r in roots {
            // inode and path from find itself: names hold newlines and bytes that are not UTF-8.
            for line in run(["/usr/bin/find", r, "-type", "f", "-printf", "%i %p\\0"]).out.split(separator: "\0") {
                guard let space = line.firstIndex(of: " "), let ino = UInt64(line[..<space]) else { continue }
                byInode[ino, default: []].insert(String(line[line.index(after: space)...].dropFirst(base.count)))
            }
        }
        return Set(byInode.values.filter { $0.count > 1 })
    }

    @Test(
        "hardlink mode: the README's tar and rsync commands restore store and guests elsewhere with the same manifest and the same sharing; verify passes"
    )
    func hardlinkBackup() throws {
        let s = Scratch("backup")
        let host = s.sub("host")
        let roots = (0..<3).map { "\(host)/guests/g\($0)" }
        for (i, r) in roots.enumerated() { try makeBackupGuest(r, index: i) }
        settle()
        let store = "\(host)/store"
        #expect(hashify(["unify", "-q", "--store", store] + roots).status == 0)
        settle()
        let before = roots.map(guestManifest)
        let shared = sharing(roots, base: host)
        #expect(shared.count >= 30)
        let archive = s.sub("backup.tar")
        // The commands the README gives.
        let tar = run([
            "/usr/bin/timeout", "300", "/usr/bin/tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner",
            "-cpf", archive, "-C", host, ".",
        ])
        #expect(tar.status == 0, "\(tar.err)")
        let restores = [s.sub("restored-tar"), s.sub("restored-rsync")]
        mkdirs(restores[0])
        let untar = run([
            "/usr/bin/timeout", "300", "/usr/bin/tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner",
            "-xpf", archive, "-C", restores[0],
        ])
        #expect(untar.status == 0, "\(untar.err)")
        let rsync = run([
            "/usr/bin/timeout", "300", "/usr/bin/rsync", "-aHAX", "--numeric-ids", host + "/", restores[1] + "/",
        ])
        #expect(rsync.status == 0, "\(rsync.err)")
        for restored in restores {
            let rroots = (0..<3).map { "\(restored)/guests/g\($0)" }
            for i in 0..<3 {
                let now = guestManifest(rroots[i])
                let a = Set(now.split(separator: "\n"))
                let b = Set(before[i].split(separator: "\n"))
                #expect(
                    now == before[i],
                    "\(restored): guest \(i): now \(a.subtracting(b).sorted()) before \(b.subtracting(a).sorted())")
            }
            #expect(sharing(rroots, base: restored) == shared, "\(restored): the same paths share one inode")
            let verify = hashify(["verify", "--store", "\(restored)/store"] + rroots)
            #expect(verify.status == 0 && verify.out.contains("every object matches"), "\(verify.out)\(verify.err)")
            let again = hashify(["unify", "--json", "--store", "\(restored)/store"] + rroots)
            #expect(totals(again.out)["pathsLinked"] as? Int == 0, "nothing left to link after the restore")
        }
    }

    @Test(
        "overlay mode: stopped, folded guests and their store restored in place mount and show what they showed",
        .enabled(if: isRoot, "overlay mounts need root"))
    func overlayBackup() throws {
        let s = Scratch("backupov")
        let host = s.sub("host")
        let store = "\(host)/store"
        let roots = (0..<2).map { "\(host)/guests/g\($0)" }
        for (i, r) in roots.enumerated() { try makeBackupGuest(r, index: i) }
        settle()
        #expect(overlay(["convert", "-q"] + roots, store: store).status == 0)
        writeFile("\(roots[0])/usr/lib/lib4.so", pseudoRandom(2000, seed: 4))
        settle()
        let seen = roots.map(guestManifest)
        #expect(overlay(["umount"] + roots, store: store).status == 0)
        // As the README says: fold first, so the layers hold no copy-ups (overlayfs' index of those cannot be restored).
        #expect(hashify(["unify", "-q", "--store", store] + roots).status == 0)
        let archive = s.sub("backup.tar")
        let tar = run([
            "/usr/bin/timeout", "300", "/usr/bin/tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner",
            "-cpf", archive, "-C", host, ".",
        ])
        #expect(tar.status == 0, "\(tar.err)")
        #expect(run(["/bin/rm", "-rf", "--one-file-system", host]).status == 0)
        mkdirs(host)
        let untar = run([
            "/usr/bin/timeout", "300", "/usr/bin/tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner",
            "-xpf", archive, "-C", host,
        ])
        #expect(untar.status == 0, "\(untar.err)")
        let mount = overlay(["mount"] + roots, store: store)
        #expect(mount.status == 0, "\(mount.err)")
        #expect(roots.map(guestManifest) == seen)
        let verify = hashify(["verify", "--store", store])
        #expect(verify.status == 0, "\(verify.out)\(verify.err)")
        #expect(overlay(["umount"] + roots, store: store).status == 0)
    }
}

@Suite("status: what keeps files from staying shared")
struct SharingBreakerTests {
    @Test(
        "prelink in a guest and a file held open for writing across two runs are named; a file open in one run only is not"
    )
    func breakers() throws {
        let s = Scratch("breakers")
        let roots = (0..<2).map { s.sub("guests/g\($0)") }
        for (i, r) in roots.enumerated() { makeGuest(r, index: i) }
        writeFile("\(roots[1])/usr/sbin/prelink", pseudoRandom(2000, seed: 3), mode: 0o755)
        writeFile("\(roots[0])/usr/lib/db.bin", pseudoRandom(3000, seed: 5))
        writeFile("\(roots[1])/usr/lib/db.bin", pseudoRandom(3000, seed: 5))
        writeFile("\(roots[0])/usr/lib/once.bin", pseudoRandom(3000, seed: 6))
        writeFile("\(roots[1])/usr/lib/once.bin", pseudoRandom(3000, seed: 6))
        settle()
        let held = open("\(roots[0])/usr/lib/db.bin", O_WRONLY | O_CLOEXEC)
        defer { close(held) }
        let once = open("\(roots[0])/usr/lib/once.bin", O_WRONLY | O_CLOEXEC)
        let first = hashify(["unify", "--json"] + roots)
        close(once)
        #expect(
            Set((jsonReport(first.out)["skipped"] as? [[String: Any]] ?? []).compactMap { $0["path"] as? String }) == [
                "/usr/lib/db.bin", "/usr/lib/once.bin",
            ])
        let status1 =
            jsonReport(hashify(["status", "--json"] + roots).out)["sharingBreakers"] as? [[String: Any]] ?? []
        #expect(status1.map { $0["kind"] as? String } == ["prelink"], "one run is not yet a pattern: \(status1)")
        _ = hashify(["unify", "-q"] + roots)
        let status = hashify(["status", "--json"] + roots)
        #expect(status.status == 0, "\(status.err)")
        let breakers = jsonReport(status.out)["sharingBreakers"] as? [[String: Any]] ?? []
        let byKind = Dictionary(breakers.map { ($0["kind"] as? String ?? "", $0) }, uniquingKeysWith: { a, _ in a })
        #expect(byKind.count == 2, "\(breakers)")
        #expect(
            byKind["prelink"]?["root"] as? String == roots[1]
                && byKind["prelink"]?["path"] as? String == "/usr/sbin/prelink")
        #expect(byKind["held-open-for-writing"]?["root"] as? String == roots[0])
        #expect(byKind["held-open-for-writing"]?["path"] as? String == "/usr/lib/db.bin")
        let detail = byKind["held-open-for-writing"]?["detail"] as? String ?? ""
        #expect(detail.contains("last 2 runs"))
        #expect(
            hashify(["status"] + roots).out.contains("breaker   \(roots[1])/usr/sbin/prelink: prelink is installed"))
    }
}
