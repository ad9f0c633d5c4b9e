import Foundation
import HashifyEngine
import HashifySystem
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A guest with every kind of entry and attribute overlay mode must carry:
/// hard links, symlinks, FIFOs, sockets, device nodes, setuid with a file
/// capability, POSIX ACLs, user xattrs, forged `trusted.overlay.*` xattrs,
/// empty and tiny files, names with a newline and invalid UTF-8, a path
/// deeper than PATH_MAX, directories of other owners and modes.
func makeRichGuest(_ root: String, index: Int) throws {
    makeGuest(root, index: index, files: 30)
    link("\(root)/usr/bin/tool", "\(root)/usr/bin/tool-hard")
    link("\(root)/usr/lib/lib3.so", "\(root)/usr/share/lib3-again")
    // setuid, with a file capability (v2: CAP_NET_RAW permitted, effective).
    let cap: [UInt8] = [0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00] + [UInt8](repeating: 0, count: 12)
    writeFile("\(root)/usr/bin/ping", pseudoRandom(3000, seed: 7), mode: 0o4755, xattrs: [("security.capability", cap)])
    // POSIX ACL: user 1000 may read (mode 0640 with mask r--).
    func acl(_ entries: [(UInt16, UInt16, UInt32)]) -> [UInt8] {
        var out: [UInt8] = [2, 0, 0, 0]
        for (tag, perm, id) in entries {
            withUnsafeBytes(of: tag.littleEndian) { out += $0 }
            withUnsafeBytes(of: perm.littleEndian) { out += $0 }
            withUnsafeBytes(of: id.littleEndian) { out += $0 }
        }
        return out
    }
    writeFile(
        "\(root)/etc/secret", pseudoRandom(900, seed: 11), mode: 0o640, gid: 42,
        xattrs: [
            (
                "system.posix_acl_access",
                acl([
                    (1, 6, UInt32.max), (2, 4, 1000), (4, 4, UInt32.max), (0x10, 4, UInt32.max), (0x20, 0, UInt32.max),
                ])
            )
        ])
    writeFile("\(root)/usr/share/tagged", pseudoRandom(1500, seed: 12), xattrs: [("user.origin", Array("guest".utf8))])
    // What a hostile guest could try: overlay's own xattrs on its files.
    writeFile(
        "\(root)/usr/share/forged", pseudoRandom(800, seed: 13),
        xattrs: [("trusted.overlay.redirect", Array("/00/000000000000".utf8)), ("trusted.overlay.metacopy", [])])
    writeFile("\(root)/etc/empty", [UInt8]())
    writeFile("\(root)/etc/tiny", "64 bytes or less stay whole\n")
    mkdirs("\(root)/home/user", mode: 0o700)
    chown("\(root)/home/user", 1000, 1000)
    writeFile(
        "\(root)/home/user/notes", pseudoRandom(4000, seed: UInt64(500 + index)), mode: 0o600, uid: 1000, gid: 1000)
    mkdirs("\(root)/srv/shared")
    chmod("\(root)/srv/shared", 0o2775)
    let share = try Directory.open(path: FilePath("\(root)/usr/share"))
    try share.makeNode(FileName("socket"), mode: 0o140755)
    for name in [Array("new\nline".utf8), [0x62, 0x61, 0x64, 0xff, 0xfe]] {
        let f = try share.createFile(FileName(name), mode: 0o644)
        try f.write(pseudoRandom(700, seed: 14))
    }
    // Deeper than PATH_MAX: 45 levels of 100-byte names.
    var d = share
    for level in 0..<45 {
        let name = FileName(String(repeating: Character(UnicodeScalar(UInt8(0x61 + level % 26))), count: 100))
        try d.makeDirectory(name, mode: 0o755)
        d = try d.openDirectory(name)
    }
    try d.createFile(FileName("deep"), mode: 0o644).write(pseudoRandom(2000, seed: 15))
    settleDirectoryTimes(root)
}

/// `hashify overlay …` with the test's store.
@discardableResult
func overlay(_ args: [String], store: String) -> (status: Int32, out: String, err: String) {
    hashify(["overlay"] + [args[0], "--store", store] + args.dropFirst())
}

/// The manifest of one guest under a fixed header (so guests at other paths compare).
func guestManifest(_ root: String) -> String {
    manifest([root], links: true).split(separator: "\n", omittingEmptySubsequences: false).dropFirst().joined(
        separator: "\n")
}

/// A process whose working directory is `directory` (the test stops it).
func sleeper(in directory: String) throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/sleep")
    p.arguments = ["30"]
    p.currentDirectoryURL = URL(fileURLWithPath: directory)
    try p.run()
    return p
}

func isOverlayMount(_ path: String) -> Bool {
    run(["/usr/bin/findmnt", "-n", "-o", "FSTYPE", "--mountpoint", path]).out.trimmingCharacters(
        in: .whitespacesAndNewlines) == "overlay"
}

@Suite("overlay mode", .serialized, .enabled(if: isRoot, "overlay mounts need root"))
struct OverlayTests {
    @Test("convert, umount/mount, fold and export: the guest sees exactly its plain tree")
    func roundTrip() throws {
        let s = Scratch("overlay")
        let store = s.sub("store")
        let guests = (1...3).map { s.sub("guests/g\($0)") }
        for (i, g) in guests.enumerated() { try makeRichGuest(g, index: i) }
        settle()
        let before = guests.map(guestManifest)
        let r = overlay(["convert", "--json"] + guests, store: store)
        #expect(r.status == 0, "\(r.err)")
        for (i, g) in guests.enumerated() {
            #expect(isOverlayMount(g))
            #expect(guestManifest(g) == before[i], "through the mount, guest \(i)")
        }
        let report = jsonReport(r.out)["guests"] as? [[String: Any]] ?? []
        #expect(report.count == 3)
        // The second and third guests' common files share the first guest's objects.
        #expect((report.last?["filesSharingObjects"] as? Int ?? 0) >= 30)
        // One object per distinct content; the guests' inodes were linked, not copied.
        #expect((report.first?["bytesLinked"] as? Int ?? 0) > 0)
        #expect((report.first?["bytesLinked"] as? Int ?? 0) > (report.first?["bytesCopied"] as? Int ?? 0))

        #expect(overlay(["umount"] + guests, store: store).status == 0)
        for g in guests { #expect(!isOverlayMount(g)) }
        #expect(overlay(["mount"] + guests, store: store).status == 0)
        for (i, g) in guests.enumerated() { #expect(guestManifest(g) == before[i], "after umount and mount") }

        // Changes, then a fold: the guest still sees its own changes.
        writeFile("\(guests[0])/usr/lib/lib1.so", pseudoRandom(5000, seed: 4242))
        writeFile("\(guests[1])/usr/lib/lib1.so", pseudoRandom(5000, seed: 4242))
        chmod("\(guests[2])/usr/bin/tool", 0o700)
        unlink("\(guests[2])/usr/lib/lib2.so")
        rename("\(guests[1])/srv", "\(guests[1])/srv-renamed")
        // A write to one name of a hard link pair (overlayfs' index keeps the other name in step).
        let f = fopen("\(guests[1])/usr/share/lib3-again", "a")
        fputs("appended through one name\n", f)
        fclose(f)
        // A directory removed and made again: opaque in the upper layer.
        #expect(run(["/bin/rm", "-rf", "\(guests[0])/usr/share"]).status == 0)
        writeFile("\(guests[0])/usr/share/again", pseudoRandom(3000, seed: 31))
        settle()
        let changed = guests.map(guestManifest)
        #expect(overlay(["umount"] + guests, store: store).status == 0)
        let fold = hashify(["unify", "--json", "--store", store] + guests)
        #expect(fold.status == 0, "\(fold.err)\(fold.out)")
        let folds = jsonReport(fold.out)["overlayGuests"] as? [[String: Any]] ?? []
        #expect(folds.map { $0["action"] as? String } == ["folded", "folded", "folded"])
        #expect(overlay(["mount"] + guests, store: store).status == 0)
        for (i, g) in guests.enumerated() { #expect(guestManifest(g) == changed[i], "after the fold, guest \(i)") }
        // Equal new files of two guests became one object; the upper layers are empty.
        let uppers = run(["/usr/bin/find", s.sub("store/overlay"), "-path", "*/upper/*"]).out
        #expect(uppers.isEmpty, "upper layers after the fold: \(uppers)")
        let redirects = stubRedirects(store: store, path: "usr/lib/lib1.so")
        #expect(
            Set(redirects.filter { $0.count > 2 }).count == 2, "two guests' equal new file is one object: \(redirects)")
        // A re-run with nothing changed reads nothing.
        #expect(overlay(["umount"] + guests, store: store).status == 0)
        let again =
            jsonReport(hashify(["unify", "--json", "--store", store] + guests).out)["overlayGuests"] as? [[String: Any]]
            ?? []
        #expect(again.map { $0["action"] as? String } == ["nothing to fold", "nothing to fold", "nothing to fold"])
        #expect(overlay(["mount"] + guests, store: store).status == 0)

        // Export: a copy elsewhere, and one guest back in place.
        let copy = s.sub("exported")
        let e = overlay(["export", guests[0], copy], store: store)
        #expect(e.status == 0, "\(e.err)")
        #expect(guestManifest(copy) == changed[0])
        let back = overlay(["export", guests[1]], store: store)
        #expect(back.status == 0, "\(back.err)")
        #expect(!isOverlayMount(guests[1]))
        #expect(guestManifest(guests[1]) == changed[1], "exported in place")
        #expect(overlay(["mount", guests[1]], store: store).status == 2, "no longer an overlay guest")
        // A plain guest again: unify treats it as one.
        #expect(hashify(["unify", "-q", "--store", store, guests[1]]).status == 0)
    }

    @Test("copy-on-write: write, append, truncate, chmod, chown, setfattr and touch in one guest change nothing else")
    func copyOnWrite() throws {
        let s = Scratch("cow")
        let store = s.sub("store")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        for (i, g) in [a, b].enumerated() { try makeRichGuest(g, index: i) }
        settle()
        let plainB = guestManifest(b)
        #expect(overlay(["convert", "-q", a, b], store: store).status == 0)
        let objects = manifest([s.sub("store/data")])
        let fd = open("\(a)/usr/lib/lib1.so", O_WRONLY | O_CLOEXEC)
        #expect(fd >= 0)
        _ = pwrite(fd, "in place", 8, 10)
        close(fd)
        let app = open("\(a)/usr/lib/lib2.so", O_WRONLY | O_CLOEXEC | O_APPEND)
        _ = write(app, "appended", 8)
        close(app)
        #expect(truncate("\(a)/usr/lib/lib4.so", 10) == 0)
        #expect(chmod("\(a)/usr/lib/lib5.so", 0o600) == 0)
        #expect(chown("\(a)/usr/lib/lib6.so", 123, 456) == 0)
        #expect(run(["/usr/bin/setfattr", "-n", "user.changed", "-v", "yes", "\(a)/usr/lib/lib7.so"]).status == 0)
        #expect(run(["/usr/bin/touch", "-d", "@1234567890", "\(a)/usr/lib/lib8.so"]).status == 0)
        writeFile("\(a)/usr/bin/tool", "replaced\n")
        settle()
        #expect(guestManifest(b) == plainB, "guest b unchanged")
        #expect(manifest([s.sub("store/data")]) == objects, "no object changed")
        let m = guestManifest(a)
        #expect(m.contains("user.changed=796573"))
        #expect(
            run(["/usr/bin/cat", "\(a)/usr/bin/tool-hard"]).out == "replaced\n",
            "a hard link stays one file across copy-up")
        // The fold keeps a's changes private.
        #expect(overlay(["umount", a, b], store: store).status == 0)
        #expect(hashify(["unify", "-q", "--store", store, a, b]).status == 0)
        #expect(overlay(["mount", a, b], store: store).status == 0)
        #expect(guestManifest(a) == m)
        #expect(guestManifest(b) == plainB)
    }

    @Test(
        "refusals: a running guest, a mount point, another filesystem, a plain guest for mount/umount/export; nothing changed"
    )
    func refusals() throws {
        let s = Scratch("ovbad")
        let store = s.sub("store")
        let g = s.sub("guests/g")
        try makeRichGuest(g, index: 0)
        settle()
        let before = manifest([g], links: true)
        // A process whose working directory is inside the guest.
        let p = try sleeper(in: "\(g)/usr")
        let busy = overlay(["convert", g], store: store)
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        #expect(busy.status == 2)
        #expect(busy.err.contains("in use by") && busy.err.contains("\(p.processIdentifier)"), "\(busy.err)")
        // A root that is a mount point.
        let m = s.sub("guests/m")
        #expect(mountTmpfs(m))
        defer { unmount(m) }
        let mp = overlay(["convert", m], store: store)
        #expect(mp.status == 2 && mp.err.contains("mount point"), "\(mp.err)")
        // A store on another filesystem.
        let other = s.sub("other")
        #expect(mountTmpfs(other))
        defer { unmount(other) }
        let fs = overlay(["convert", g], store: other + "/store")
        #expect(fs.status == 2 && fs.err.contains("filesystem"), "\(fs.err)")
        // Plain guests are not overlay guests.
        for verb in ["mount", "umount", "export"] {
            let r = overlay([verb, g], store: store)
            #expect(r.status == 2 && r.err.contains("not an overlay guest"), "\(verb): \(r.err)")
        }
        // A filesystem without trusted xattrs (ramfs) cannot hold overlay layers.
        let rf = s.sub("ramfs")
        mkdirs(rf)
        #expect(run(["/bin/mount", "-t", "ramfs", "hashify-test", rf]).status == 0)
        defer { unmount(rf) }
        try makeRichGuest("\(rf)/g", index: 0)
        let rfBefore = manifest(["\(rf)/g"], links: true)
        let nx = overlay(["convert", "\(rf)/g"], store: "\(rf)/store")
        #expect(nx.status == 2 && nx.err.contains("trusted xattrs"), "\(nx.err)")
        #expect(manifest(["\(rf)/g"], links: true) == rfBefore)
        #expect(manifest([g], links: true) == before)
        #expect(!isOverlayMount(g))
        // Converted, mounted and in use: umount and export refuse and name the process.
        #expect(overlay(["convert", "-q", g], store: store).status == 0)
        let q = try sleeper(in: "\(g)/etc")
        let um = overlay(["umount", g], store: store)
        let ex = overlay(["export", g], store: store)
        kill(q.processIdentifier, SIGKILL)
        q.waitUntilExit()
        #expect(um.status == 2 && um.err.contains("\(q.processIdentifier)"), "\(um.err)")
        #expect(ex.status == 2, "\(ex.err)")
        #expect(isOverlayMount(g))
        // A process outside the guest holding one of its files open (nothing else: its cwd is elsewhere) is named too.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/bin/sh")
        holder.arguments = ["-c", "exec 3<\"$1\"; exec sleep 30", "sh", "\(g)/etc/secret"]
        try holder.run()
        var opened = false
        for _ in 0..<100 where !opened {
            opened =
                run(["/bin/sh", "-c", "ls -l /proc/\(holder.processIdentifier)/fd | grep -q etc/secret"]).status == 0
            if !opened { usleep(50_000) }
        }
        let held = overlay(["umount", g], store: store)
        kill(holder.processIdentifier, SIGKILL)
        holder.waitUntilExit()
        #expect(opened)
        #expect(
            held.status == 2 && held.err.contains("in use by") && held.err.contains("\(holder.processIdentifier)"),
            "\(held.err)")
        #expect(isOverlayMount(g))
        #expect(manifest([g], links: true) == before)
        // Converting again is a no-op.
        let again = overlay(["convert", g], store: store)
        #expect(again.status == 0 && again.out.contains("already mounted"), "\(again.out)")
    }

    @Test(
        "guests are named alike in every command: unify given relative roots, status, mem and manifest say the real path"
    )
    func namesAlike() throws {
        let s = Scratch("ovnames")
        let (a, b) = (s.sub("guests/o1/rootfs"), s.sub("guests/p1/rootfs"))
        try makeRichGuest(a, index: 0)
        try makeRichGuest(b, index: 1)
        settle()
        let store = s.sub("guests/.hashify")
        #expect(overlay(["convert", "-q", a], store: store).status == 0)
        let u = run([
            "/bin/sh", "-c", "cd \(s.sub("guests")) && \(hashifyBinary) unify --json o1/rootfs ./p1/../p1/rootfs",
        ])
        #expect(u.status == 0, "\(u.err)")
        let unify = jsonReport(u.out)
        let unifyRoots = Set(
            ((unify["guests"] as? [[String: Any]] ?? []) + (unify["overlayGuests"] as? [[String: Any]] ?? []))
                .compactMap { $0["root"] as? String })
        #expect(unifyRoots == [a, b], "\(unifyRoots)")
        let status = jsonReport(hashify(["status", "--json", "--store", store]).out)
        let statusRoots = Set(
            ((status["guests"] as? [[String: Any]] ?? [])
                + ((status["overlay"] as? [String: Any])?["guests"] as? [[String: Any]] ?? []))
                .compactMap { $0["root"] as? String })
        #expect(statusRoots == [a, b], "\(statusRoots)")
        let m = run(["/bin/sh", "-c", "cd \(s.sub("guests")) && \(hashifyBinary) manifest --json o1/rootfs"])
        #expect(jsonReport(m.out)["root"] as? String == a)
        let memGuests = Set(
            (memReport(["--store", store, a, b])["guests"] as? [[String: Any]] ?? []).compactMap {
                $0["guest"] as? String
            })
        #expect(memGuests.isSuperset(of: [a, b]), "\(memGuests)")
    }

    @Test(
        "a store of the previous version (text data index, version-1 index) is read and upgraded in place; a damaged data index is rebuilt from the objects"
    )
    func storeUpgrade() throws {
        let s = Scratch("ovupgrade")
        let store = s.sub("store")
        let (a, b, c, d) = (s.sub("guests/a"), s.sub("guests/b"), s.sub("guests/c"), s.sub("guests/d"))
        for (i, r) in [a, b, c, d].enumerated() { try makeRichGuest(r, index: i) }
        writeFile("\(a)/usr/lib/only-a.so", pseudoRandom(9000, seed: 76))
        settle()
        #expect(overlay(["convert", "-q", a, b], store: store).status == 0)
        #expect(hashify(["unify", "-q", "--store", store, c, d]).status == 0)
        func health() -> [String: Any] {
            jsonReport(hashify(["status", "--json", "--store", store, c, d]).out)["storeHealth"] as? [String: Any]
                ?? [:]
        }
        let entries = health()["indexEntries"] as? Int ?? 0
        #expect(entries > 30)
        // Both index files written back as the previous version wrote them.
        let downgrade = """
            import hashlib, struct, sys
            store = sys.argv[1]
            def body(path):
                b = open(path, 'rb').read()
                assert b[:16] == b'HASHIFY-INDEX-2\\n'
                size, _, count = struct.unpack('<IIQ', b[24:40])
                return [b[40 + i * size:40 + (i + 1) * size] for i in range(count)]
            recs = body(store + '/index')
            v1 = b'HASHIFY-INDEX-1\\n' + struct.pack('<Q', len(recs)) + b''.join(recs)
            open(store + '/index', 'wb').write(v1 + hashlib.sha256(v1).digest())
            text = b''.join(r[:32].hex().encode() + b' ' + r[33:33 + r[32]] + b'\\n' for r in body(store + '/data-index'))
            open(store + '/data-index', 'wb').write(text + b'0123abc')  # and a last line torn by a kill
            """
        #expect(run(["/usr/bin/python3", "-c", downgrade, store]).status == 0)
        // The previous version kept no reference lists beside the layers.
        #expect(run(["/bin/sh", "-c", "rm \(store)/overlay/*/g*/*.refs"]).status == 0)
        let before = [a, b, c, d].map(guestManifest)
        #expect(health()["indexEntries"] as? Int == entries, "the version-1 index is read")
        let v = hashify(["verify", "--json", "--store", store])
        #expect(v.status == 0, "every data object still has its record: \(v.out)")
        #expect(jsonReport(v.out)["dataObjectsChecked"] as? Int ?? 0 > 30)

        // The next changing runs write both files in today's format; the fold makes the lists it needs
        // and removes the object of the file it replaced (gc finds nothing left below).
        writeFile("\(a)/usr/lib/new.so", pseudoRandom(9000, seed: 77))
        writeFile("\(a)/usr/lib/only-a.so", pseudoRandom(9000, seed: 78))
        #expect(overlay(["umount", a], store: store).status == 0)
        let fold = overlay(["fold", "--json", a], store: store)
        #expect(fold.status == 0)
        #expect(
            (jsonReport(fold.out)["guests"] as? [[String: Any]])?.first?["objectsRemoved"] as? Int == 1, "\(fold.out)")
        #expect(overlay(["mount", a], store: store).status == 0)
        #expect(run(["/bin/sh", "-c", "ls \(store)/overlay/*/g1/meta.erofs.refs"]).status == 0)
        #expect(hashify(["unify", "-q", "--store", store, c, d]).status == 0)
        for f in ["index", "data-index"] {
            #expect(run(["/usr/bin/head", "-c", "16", "\(store)/\(f)"]).out == "HASHIFY-INDEX-2\n", "\(f) upgraded")
        }
        #expect(health()["indexEntries"] as? Int == entries)
        #expect([b, c, d].map(guestManifest) == Array(before.dropFirst()))
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        #expect(jsonReport(hashify(["gc", "-n", "--json", "--store", store]).out)["dataObjectsRemoved"] as? Int == 0)

        // A damaged data index: reported, rebuilt from the objects, nothing lost.
        let index = s.sub("store/data-index")
        var data = try Data(contentsOf: URL(fileURLWithPath: index))
        data[data.count / 2] ^= 0xff
        try data.write(to: URL(fileURLWithPath: index))
        let status = jsonReport(hashify(["status", "--json", "--store", store]).out)
        let warnings = (status["overlay"] as? [String: Any])?["warnings"] as? [String] ?? []
        #expect(warnings.contains { $0.contains("data index") }, "\(warnings)")
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        let m = guestManifest(a)
        writeFile("\(a)/usr/lib/newer.so", pseudoRandom(9000, seed: 78))
        #expect(overlay(["fold", "-q", a], store: store).status == 0)
        #expect(guestManifest(a).count > m.count)
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        let after = jsonReport(hashify(["status", "--json", "--store", store]).out)
        let warningsAfter: [String] = (after["overlay"] as? [String: Any])?["warnings"] as? [String] ?? []
        #expect(warningsAfter.isEmpty, "rewritten whole")
    }

    @Test(
        "status shows overlay guests and the copy-on-write reserve; gc removes unused data objects; verify finds damaged ones"
    )
    func maintenance() throws {
        let s = Scratch("ovmaint")
        let store = s.sub("store")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        try makeRichGuest(a, index: 0)
        try makeRichGuest(b, index: 1)
        settle()
        #expect(overlay(["convert", "-q", a, b], store: store).status == 0)
        writeFile("\(a)/var/log/big", pseudoRandom(200_000, seed: 5))
        let status = jsonReport(hashify(["status", "--json", "--store", store]).out)
        let ov = status["overlay"] as? [String: Any] ?? [:]
        let rows = ov["guests"] as? [[String: Any]] ?? []
        #expect(rows.count == 2)
        let rowA = rows.first { ($0["root"] as? String)?.hasSuffix("/a") == true } ?? [:]
        #expect(rowA["mounted"] as? Bool == true)
        #expect((rowA["copyUpBytes"] as? Int ?? 0) >= 200_000)
        #expect(rowA["foldPending"] as? Bool == true)
        #expect((rowA["sharedFiles"] as? Int ?? 0) > 30)
        #expect((ov["freeBytes"] as? Int ?? 0) > 0 && (ov["routineUpdateBytes"] as? Int ?? 0) >= 200_000)
        // An overlay-only store's verify names what it checked: data objects, no "0 objects".
        let verify = hashify(["verify", "--store", store])
        #expect(verify.status == 0)
        #expect(
            verify.out.contains(" data objects (overlay mode), ") && !verify.out.contains("checked   0"),
            "\(verify.out)")

        // b leaves overlay mode: the objects only b used are garbage.
        #expect(overlay(["export", "-q", b], store: store).status == 0)
        let plan = jsonReport(hashify(["gc", "-n", "--json", "--store", store]).out)
        #expect((plan["dataObjectsRemoved"] as? Int ?? 0) >= 1, "b's private files: \(plan)")
        let m = guestManifest(a)
        let gc = jsonReport(hashify(["gc", "--json", "--store", store]).out)
        #expect(gc["dataObjectsRemoved"] as? Int == plan["dataObjectsRemoved"] as? Int)
        #expect(guestManifest(a) == m, "gc kept every object a uses")
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)

        // Damage in the store (not reachable by guests): verify reports it.
        let redirect = stubRedirects(store: store, path: "usr/bin/tool").first ?? ""
        #expect(redirect.hasPrefix("/"))
        let fd = open("\(store)/data\(redirect)", O_WRONLY | O_CLOEXEC)
        _ = pwrite(fd, "damage", 6, 0)
        close(fd)
        let v = hashify(["verify", "--json", "--store", store])
        #expect(v.status == 1)
        let damaged = jsonReport(v.out)["damagedDataObjects"] as? [[String: Any]] ?? []
        #expect(damaged.map { $0["object"] as? String } == [redirect])
    }

    @Test(
        "converting a guest unified in hardlink mode: its shared inodes keep serving the plain guests; objects are copies"
    )
    func convertAfterHardlinkMode() throws {
        let s = Scratch("ovhl")
        let store = s.sub("store")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        try makeRichGuest(a, index: 0)
        try makeRichGuest(b, index: 1)
        settle()
        #expect(hashify(["unify", "-q", "--no-default-excludes", "--store", store, a, b]).status == 0)
        #expect(linkCount("\(b)/usr/lib/lib5.so") == 3, "a, b and the store share one inode")
        let plainA = guestManifest(a)
        let plainB = guestManifest(b)
        let r = overlay(["convert", "--json", a], store: store)
        #expect(r.status == 0, "\(r.err)")
        let g = (jsonReport(r.out)["guests"] as? [[String: Any]])?.first ?? [:]
        #expect((g["bytesCopied"] as? Int ?? 0) > 0, "shared inodes are copied into data objects, not linked")
        #expect(guestManifest(a) == plainA)
        #expect(guestManifest(b) == plainB)
        #expect(linkCount("\(b)/usr/lib/lib5.so") == 2, "a's name is gone; b and the store keep the inode")
        writeFile("\(a)/usr/lib/lib5.so", "changed in a\n")
        let fd = open("\(a)/usr/lib/lib6.so", O_WRONLY | O_CLOEXEC)
        _ = pwrite(fd, "in place", 8, 0)
        close(fd)
        #expect(guestManifest(b) == plainB, "b unchanged")
        #expect(hashify(["verify", "-q", "--store", store]).status == 0, "hardlink objects and data objects intact")
    }

    @Test(
        "converting many guests unified in hardlink mode in one command: removing a converted guest's old tree does not disturb the next guest's reading of the inodes they share"
    )
    func convertManyHardlinkGuests() throws {
        let s = Scratch("ovhlmany")
        let store = s.sub("store")
        let roots = (0..<5).map { s.sub("guests/g\($0)") }
        // Many shared files: the old tree of one guest is still being removed
        // while the next guest's copies of the same inodes are read.
        for r in roots {
            for i in 0..<1500 {
                writeFile("\(r)/usr/lib/d\(i % 30)/lib\(i).so", pseudoRandom(5000 + i, seed: UInt64(i)))
            }
        }
        settle()
        #expect(hashify(["unify", "-q", "--store", store] + roots).status == 0)
        let before = roots.map { guestManifest($0) }
        let r = overlay(["convert", "-q"] + roots, store: store)
        #expect(r.status == 0, "\(r.err)")
        #expect(roots.map { guestManifest($0) } == before)
        #expect(run(["/usr/bin/find", store, "-name", "plain"]).out.isEmpty, "the old trees are removed")
    }

    @Test(
        "exporting a running guest that swaps a directory for a symlink to outside: nothing outside is read or changed")
    func exportWhileSwapping() throws {
        let s = Scratch("ovswap")
        let store = s.sub("store")
        let g = s.sub("guests/g")
        let outside = s.sub("outside")
        try makeRichGuest(g, index: 0)
        for i in 0..<50 { writeFile("\(g)/opt/d/f\(i)", pseudoRandom(3000 + i, seed: UInt64(i + 300))) }
        for i in 0..<50 { writeFile("\(outside)/d/secret\(i)", "outside \(i)\n") }
        settle()
        #expect(overlay(["convert", "-q", g], store: store).status == 0)
        let outsideBefore = manifest([outside], inodes: true)
        let swapper = symlinkSwapper("\(g)/opt/d", to: "\(outside)/d", holdMicroseconds: 300)
        for i in 0..<6 {
            let r = overlay(["export", "-q", g, s.sub("copy\(i)")], store: store)
            #expect(r.status == 0 || r.status == 1, "\(r.err)")
        }
        swapper.join()
        #expect(manifest([outside], inodes: true) == outsideBefore, "outside untouched")
        for i in 0..<6 {
            let found = run(["/usr/bin/grep", "-rl", "outside ", s.sub("copy\(i)")]).out
            #expect(found.isEmpty, "no outside content copied: \(found)")
        }
    }

    @Test("a guest forging overlay xattrs through its mount reads nothing it did not have")
    func forgedOverlayAttributes() throws {
        let s = Scratch("ovhostile")
        let store = s.sub("store")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        try makeRichGuest(a, index: 0)
        try makeRichGuest(b, index: 1)
        writeFile("\(b)/root/secret", pseudoRandom(3000, seed: 999))
        settle()
        #expect(overlay(["convert", "-q", a, b], store: store).status == 0)
        // b's private object, by the name hashify gives it.
        let secretRedirect = stubRedirects(store: store, path: "root/secret").joined()
        #expect(secretRedirect.hasPrefix("/"), "b's stub carries a redirect")
        let victim = "\(a)/usr/share/tagged"
        let original = run(["/usr/bin/sha256sum", victim]).out.prefix(64)
        for (n, v) in [
            ("trusted.overlay.redirect", secretRedirect), ("trusted.overlay.metacopy", ""),
            ("trusted.overlay.opaque", "y"),
        ] {
            #expect(run(["/usr/bin/setfattr", "-n", n, "-v", v.isEmpty ? "\"\"" : v, victim]).status == 0, "set \(n)")
        }
        #expect(run(["/usr/bin/setfattr", "-n", "trusted.overlay.opaque", "-v", "y", "\(a)/usr/lib"]).status == 0)
        #expect(run(["/usr/bin/setfattr", "-n", "user.overlay.redirect", "-v", secretRedirect, victim]).status == 0)
        let seen = manifest([a], links: true)
        for step in ["remount", "fold"] {
            #expect(overlay(["umount", a, b], store: store).status == 0)
            if step == "fold" { #expect(hashify(["unify", "-q", "--store", store, a, b]).status == 0) }
            #expect(overlay(["mount", a, b], store: store).status == 0)
            #expect(
                run(["/usr/bin/sha256sum", victim]).out.prefix(64) == original, "after \(step): content is its own")
            #expect(manifest([a], links: true) == seen, "after \(step): xattrs read back as set")
            #expect(
                run(["/usr/bin/ls", "\(a)/usr/lib/lib1.so"]).status == 0,
                "after \(step): opaque xattr is the guest's own")
        }
    }

    @Test("SIGKILL during convert, fold and export: the guest is whole after each kill and the next run completes")
    func killDuringOverlayWork() throws {
        let s = Scratch("ovkill")
        let store = s.sub("store")
        let g = s.sub("guests/g")
        try makeRichGuest(g, index: 0)
        addVarFiles(g)
        settleDirectoryTimes(g)
        settle()
        let plain = guestManifest(g)
        // A time window from one uninterrupted convert and export.
        let t0 = Date()
        #expect(overlay(["convert", "-q", g], store: store).status == 0)
        #expect(overlay(["export", "-q", g], store: store).status == 0)
        var window = max(0.05, Date().timeIntervalSince(t0))
        #expect(guestManifest(g) == plain)
        var kills = 0
        var current = plain
        var runs = 0
        // At least 24 runs, and on until 5 were killed mid-way (a loaded machine makes the window differ).
        for iteration in 0..<72 where iteration < 24 || kills < 5 {
            runs += 1
            let isOverlay = isOverlayMount(g)
            let args: [String]
            switch (iteration % 3, isOverlay) {
            case (_, false): args = ["overlay", "convert", "--store", store, "-q", g]
            case (1, true):
                // A change to fold.
                writeFile("\(g)/var/d\(iteration % 20)/f1", pseudoRandom(3000, seed: UInt64(iteration)))
                settle()
                current = guestManifest(g)
                #expect(overlay(["umount", g], store: store).status == 0)
                args = ["unify", "--store", store, "-q", g]
            default: args = ["overlay", "export", "--store", store, "-q", g]
            }
            let p = Process()
            p.executableURL = URL(fileURLWithPath: hashifyBinary)
            p.arguments = args
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            if killAtRandom(p, window: &window, fraction: 0.02...0.6) { kills += 1 }
            p.waitUntilExit()
            // Whatever state it is in, convert (or mount) makes it whole and mounted again.
            if !isOverlayMount(g) {
                let r = overlay(["convert", "-q", g], store: store)
                #expect(r.status == 0, "after kill \(iteration) of \(args[1]): \(r.err)")
            }
            #expect(guestManifest(g) == current, "after kill \(iteration) of \(args.prefix(2))")
        }
        print("overlay kill test: \(kills) of \(runs) runs killed")
        #expect(kills >= 5)
        #expect(overlay(["export", "-q", g], store: store).status == 0)
        #expect(guestManifest(g) == current)
        #expect(mountPoints(under: s.sub("store")).isEmpty, "no private mount left")
    }
}

/// 800 files of 100 B to 20 KB in 20 directories under var/ (a fold's worth of work).
func addVarFiles(_ root: String) {
    for d in 0..<20 {
        for i in 0..<40 {
            writeFile(
                "\(root)/var/d\(d)/f\(i)", pseudoRandom(100 + (i * 331 + d * 97) % 20_000, seed: UInt64(d * 50 + i)))
        }
    }
}

/// Appends bytes to a file.
func appendFile(_ path: String, _ bytes: [UInt8]) {
    guard let f = FileHandle(forWritingAtPath: path) else { preconditionFailure("cannot open \(path)") }
    f.seekToEndOfFile()
    f.write(Data(bytes))
    f.closeFile()
}

/// A file capability (cap_net_raw+ep), as setfattr takes it.
let capability = "0sAQAAAgAgAAAAAAAAAAAAAAAAAAA="

extension OverlayTests {
    /// Changes to fold: `count` files rewritten (copy-ups, new objects), 40
    /// files of contents the store holds (some with a capability), one
    /// deleted, one renamed, one chmod'ed, a journal appended to.
    func changeGuest(_ g: String, round: Int, count: Int) {
        for i in 0..<count {
            writeFile(
                "\(g)/var/d\((i + round) % 20)/f\(i % 40)",
                pseudoRandom(2000 + (i * 977 + round * 31) % 30_000, seed: UInt64(round * 1000 + i)))
        }
        // Contents the store holds already (a reinstalled package): these files become stubs where they lie.
        for i in 0..<40 {
            let path = "\(g)/var/copies/r\(round)/f\(i)"
            writeFile(path, pseudoRandom(100 + (i * 331 + 3 * 97) % 20_000, seed: UInt64(3 * 50 + i)))
            if i % 10 == 0 { _ = run(["/usr/bin/setfattr", "-n", "security.capability", "-v", capability, path]) }
        }
        appendFile("\(g)/var/log/journal", pseudoRandom(50_000, seed: UInt64(round)))
        try? FileManager.default.removeItem(atPath: "\(g)/var/d\(round % 20)/f39")
        _ = rename("\(g)/var/d\((round + 1) % 20)/f38", "\(g)/var/d\((round + 1) % 20)/f38-\(round)")
        chmod("\(g)/var/d\((round + 2) % 20)/f37", 0o600)
        settle()
    }

    @Test(
        "SIGKILL during stacked folds and compactions: the guest shows what it showed after each kill, a guest sharing its objects is untouched, and what the folds removed no layer needed"
    )
    func killDuringStackedFold() throws {
        let s = Scratch("ovfoldkill")
        let store = s.sub("store")
        let (g, h) = (s.sub("guests/g"), s.sub("guests/h"))
        // The other guest: the same files (so the same objects), made alike.
        for root in [g, h] {
            try makeRichGuest(root, index: 0)
            addVarFiles(root)
            writeFile("\(root)/var/log/journal", pseudoRandom(20_000, seed: 99))
            settleDirectoryTimes(root)
        }
        settle()
        let other = guestManifest(h)
        #expect(overlay(["convert", "-q", g, h], store: store).status == 0)
        // A time window from one uninterrupted fold of the same size.
        changeGuest(g, round: 0, count: 300)
        var current = guestManifest(g)
        #expect(overlay(["umount", g], store: store).status == 0)
        let t0 = Date()
        #expect(overlay(["fold", "-q", g], store: store).status == 0)
        var window = max(0.02, Date().timeIntervalSince(t0))
        let mounted = overlay(["mount", g], store: store)
        #expect(mounted.status == 0, "\(mounted.err)")
        #expect(guestManifest(g) == current)
        var kills = 0
        var runs = 0
        var removed = 0
        // Until a fold ran to its end and removed something: on a loaded machine the first 19 may all be
        // killed (the window grows with each kill).
        for round in 1..<60 where round < 20 || kills < 6 || removed == 0 {
            runs += 1
            changeGuest(g, round: round, count: 300)
            current = guestManifest(g)
            #expect(overlay(["umount", g], store: store).status == 0)
            let p = Process()
            p.executableURL = URL(fileURLWithPath: hashifyBinary)
            // Every fourth a compaction (the generation built whole), the rest stacked.
            p.arguments = ["overlay", "fold", "--store", store, "--json"] + (round % 4 == 3 ? ["--compact"] : []) + [g]
            let out = Pipe()
            p.standardOutput = out
            p.standardError = FileHandle.nullDevice
            try p.run()
            // Some run to the end (their removals are counted), most are killed somewhere inside.
            if killAtRandom(p, window: &window, fraction: 0.02...1.3, grow: 1.1) { kills += 1 }
            let report = out.fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            if p.terminationStatus == 0 {
                removed +=
                    (jsonReport(String(decoding: report, as: UTF8.self))["guests"] as? [[String: Any]])?.first?[
                        "objectsRemoved"] as? Int ?? 0
            }
            // The next fold finishes or redoes what the kill left; the guest mounts and shows what it showed.
            let again = overlay(["fold", "-q", g], store: store)
            #expect(again.status == 0, "after round \(round): \(again.err)")
            let remounted = overlay(["mount", g], store: store)
            #expect(remounted.status == 0, "after round \(round): \(remounted.err)")
            #expect(guestManifest(g) == current, "after round \(round)")
            #expect(guestManifest(h) == other, "the other guest after round \(round)")
        }
        print("stacked fold kill test: \(kills) of \(runs) folds killed, \(removed) objects removed by folds")
        #expect(kills >= 6)
        #expect(removed > 0, "folds removed what they alone made unreferenced")
        // Nothing a stub names is missing, and the folds left gc nothing of theirs but what kills left.
        #expect(hashify(["verify", "--store", store, "-q"]).status == 0)
        #expect(hashify(["gc", "--store", store, "-q"]).status == 0)
        #expect(hashify(["verify", "--store", store, "-q"]).status == 0)
        #expect(overlay(["export", "-q", g], store: store).status == 0)
        #expect(guestManifest(g) == current)
        #expect(guestManifest(h) == other)
        #expect(mountPoints(under: s.sub("store")).isEmpty, "no private mount left")
        #expect(overlay(["umount", h], store: store).status == 0)
    }
}

/// A dpkg database skeleton in a guest (for `dpkg --root`).
func makeDpkgSkeleton(_ root: String) {
    for d in ["info", "updates", "triggers"] { mkdirs("\(root)/var/lib/dpkg/\(d)") }
    for f in ["status", "available"] { writeFile("\(root)/var/lib/dpkg/\(f)", "") }
}

/// Builds a .deb of one package version with dpkg-deb.
func buildPackage(_ dir: String, version: String, library: [UInt8]) -> String {
    let stage = "\(dir)/stage-\(version)"
    writeFile("\(stage)/usr/lib/demo/libdemo.so", library)
    writeFile("\(stage)/usr/share/doc/hashify-demo/README", "hashify demo package \(version)\n")
    writeFile(
        "\(stage)/DEBIAN/control",
        """
        Package: hashify-demo
        Version: \(version)
        Architecture: all
        Maintainer: hashify tests <tests@example.org>
        Description: a package the overlay tests install and upgrade

        """)
    let deb = "\(dir)/hashify-demo_\(version).deb"
    let r = run(["/usr/bin/dpkg-deb", "--root-owner-group", "-b", stage, deb])
    precondition(r.status == 0, "dpkg-deb: \(r.err)")
    return deb
}

/// The shared libraries a host program loads, its ELF interpreter included (from ldd).
func loadedLibraries(_ program: String) -> [String] {
    run(["/usr/bin/ldd", program]).out.split(separator: "\n").compactMap { line -> String? in
        let parts = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
        if let arrow = parts.firstIndex(of: "=>"), arrow + 1 < parts.count, parts[arrow + 1].hasPrefix("/") {
            return String(parts[arrow + 1])
        }
        return parts.first.flatMap { $0.hasPrefix("/") ? String($0) : nil }
    }
}

/// Copies a host program and the libraries it loads into a guest (plain copies: their own inodes).
func installProgram(_ program: String, into root: String) {
    let libs = loadedLibraries(program)
    for f in [program] + libs {
        mkdirs(root + (f as NSString).deletingLastPathComponent)
        _ = run(["/bin/cp", "-L", "--preserve=mode,timestamps", f, root + f])
    }
    mkdirs("\(root)/dev")
    mknod("\(root)/dev/null", S_IFCHR | 0o666, dev_t((1 << 8) | 3))
}

/// Total `Pss_File` (kB) of processes, from /proc/PID/smaps_rollup.
func filePss(_ pids: [Int32]) -> Int {
    pids.reduce(0) { sum, pid in
        let text = run(["/bin/cat", "/proc/\(pid)/smaps_rollup"]).out
        let line = text.split(separator: "\n").first { $0.hasPrefix("Pss_File:") }
        return sum + (line.flatMap { Int($0.split(separator: " ")[1]) } ?? 0)
    }
}

@Suite("overlay mode with real programs", .serialized, .enabled(if: isRoot, "overlay mounts need root"))
struct OverlayProgramTests {
    @Test(
        "dpkg upgrades a package in a mounted guest; after umount and unify the new files are shared and the guest sees the update"
    )
    func packageUpdate() throws {
        let s = Scratch("ovdpkg")
        let store = s.sub("store")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        let v1 = buildPackage(s.path, version: "1.0", library: pseudoRandom(40_000, seed: 1))
        let v2 = buildPackage(s.path, version: "2.0", library: pseudoRandom(40_000, seed: 2))
        for (i, g) in [a, b].enumerated() {
            try makeRichGuest(g, index: i)
            makeDpkgSkeleton(g)
            #expect(run(["/usr/bin/dpkg", "--root=\(g)", "-i", v1]).status == 0)
        }
        settle()
        #expect(overlay(["convert", "-q", a, b], store: store).status == 0)
        // The update, through each guest's mount, the way dpkg does it (new file, rename).
        for g in [a, b] {
            let r = run(["/usr/bin/dpkg", "--root=\(g)", "-i", v2])
            #expect(r.status == 0, "\(r.err)")
            #expect(run(["/usr/bin/dpkg", "--root=\(g)", "--verify"]).status == 0)
        }
        settle()
        let updated = [a, b].map(guestManifest)
        #expect(updated[0].contains(pseudoRandomDigest(40_000, seed: 2)))
        #expect(overlay(["umount", a, b], store: store).status == 0)
        let fold = hashify(["unify", "--json", "--store", store, a, b])
        #expect(fold.status == 0, "\(fold.err)")
        let folds = jsonReport(fold.out)["overlayGuests"] as? [[String: Any]] ?? []
        #expect(folds.map { $0["action"] as? String } == ["folded", "folded"])
        // One new object for the new library, shared by both guests.
        #expect(folds.reduce(0) { $0 + ($1["objectsCreated"] as? Int ?? 0) } >= 1)
        #expect((folds.last?["filesSharingObjects"] as? Int ?? 0) >= 1)
        // The fold wrote each guest's next image: the updated file is a stub there, of one object for both.
        let stubs = stubRedirects(store: store, path: "usr/lib/demo/libdemo.so")
        #expect(stubs.count == 2 && stubs[0].count == 16 && stubs[0] == stubs[1], "one object for both: \(stubs)")
        #expect(overlay(["mount", a, b], store: store).status == 0)
        #expect([a, b].map(guestManifest) == updated)
        for g in [a, b] { #expect(run(["/usr/bin/dpkg", "--root=\(g)", "--verify"]).status == 0) }
    }

    @Test("three overlay guests running perl map one copy of it: total Pss against three plain copies")
    func pageCacheShared() throws {
        let s = Scratch("ovpss")
        let store = s.sub("store")
        let guests = (1...3).map { s.sub("guests/g\($0)") }
        for g in guests { installProgram("/usr/bin/perl", into: g) }
        func runPerl() throws -> Int {
            let procs = try startPerl(in: guests)
            // chroot execs perl: the pids are perl's.
            let pss = filePss(procs.map(\.processIdentifier))
            stop(procs)
            return pss
        }
        let plain = try runPerl()
        #expect(overlay(["convert", "-q"] + guests, store: store).status == 0)
        let shared = try runPerl()
        print("file-backed Pss of three perl processes: plain copies \(plain) kB, overlay guests \(shared) kB")
        #expect(plain > 0 && shared > 0)
        #expect(Double(shared) < 0.6 * Double(plain), "plain \(plain) kB, overlay \(shared) kB")
    }
}

/// The manifest's digest of pseudoRandom(count, seed).
func pseudoRandomDigest(_ count: Int, seed: UInt64) -> String {
    let f = "/var/tmp/hashify-digest-\(getpid())"
    writeFile(f, pseudoRandom(count, seed: seed))
    defer { unlink(f) }
    return String(run(["/usr/bin/sha256sum", f]).out.prefix(64))
}

let lxcStart = "/usr/bin/lxc-start"

/// A privileged LXC container LXCPATH/NAME: a rootfs with sh and sleep whose
/// init runs `initScript` and sleeps, and a config (with `extraConfig` lines).
func makeLXCContainer(
    lxcpath: String, name: String, initScript: String, extraConfig: String = "", backend: String = "dir"
) {
    let root = "\(lxcpath)/\(name)/rootfs"
    installProgram("/bin/sh", into: root)
    installProgram("/bin/sleep", into: root)
    for d in ["proc", "sys", "tmp"] { mkdirs("\(root)/\(d)") }
    writeFile("\(root)/init.sh", "#!/bin/sh\n\(initScript)\nexec /bin/sleep 300\n", mode: 0o755)
    writeFile(
        "\(lxcpath)/\(name)/config",
        """
        lxc.uts.name = \(name)
        lxc.rootfs.path = \(backend):\(root)
        lxc.init.cmd = /init.sh
        lxc.net.0.type = empty
        lxc.apparmor.profile = unconfined
        lxc.environment = PATH=/bin

        """ + extraConfig)
}

/// An LXC tool run on LXCPATH, with this build's hashify for the contrib hook.
@discardableResult
func lxcTool(_ lxcpath: String, _ tool: String, _ args: [String]) -> (status: Int32, out: String, err: String) {
    run(["/usr/bin/env", "HASHIFY=\(hashifyBinary)", "/usr/bin/\(tool)", "-P", lxcpath] + args)
}

/// Starts the containers `names` of LXCPATH (each logged to NAME.log in `logs`), expecting each to start.
func startContainers(_ names: [String], lxcpath: String, logs: Scratch) {
    for n in names {
        let r = lxcTool(lxcpath, "lxc-start", ["-n", n, "-l", "INFO", "-o", logs.sub("\(n).log")])
        #expect(
            r.status == 0,
            "lxc-start \(n): \(r.err) \((try? String(contentsOfFile: logs.sub("\(n).log"), encoding: .utf8)) ?? "")")
    }
}

/// What each root's /usr/lib/shared.so reads, once all read `expected` (or after about 8 s).
func sharedFileContents(_ roots: [String], becoming expected: [String]) -> [String] {
    var seen: [String] = []
    for _ in 0..<80 {
        seen = roots.map { (try? String(contentsOfFile: "\($0)/usr/lib/shared.so", encoding: .utf8)) ?? "" }
        if seen == expected { break }
        usleep(100_000)
    }
    return seen
}

@Suite(
    "overlay guests as real LXC containers", .serialized,
    .enabled(
        if: isRoot && FileManager.default.isExecutableFile(atPath: lxcStart), "needs root and LXC (apt-get install lxc)"
    ))
struct OverlayLXCTests {
    @Test(
        "two privileged LXC containers on overlay guests through the contrib hook: a write stays in its container and survives the fold"
    )
    func containers() throws {
        let s = Scratch("ovlxc")
        let store = s.sub("store")
        let lxcpath = s.sub("lxc")
        let hook = packageRoot.appendingPathComponent("contrib/lxc/hashify-lxc-hook").path
        let names = ["c1", "c2"]
        let roots = names.map { "\(lxcpath)/\($0)/rootfs" }
        for (name, root) in zip(names, roots) {
            writeFile("\(root)/usr/lib/shared.so", pseudoRandom(8000, seed: 77))
            makeLXCContainer(
                lxcpath: lxcpath, name: name, initScript: "echo \"\(name) was here\" > /usr/lib/shared.so",
                extraConfig: "lxc.hook.pre-start = \(hook) \(store)\nlxc.hook.post-stop = \(hook) \(store)\n")
        }
        settle()
        #expect(overlay(["convert", "-q", "--no-mount"] + roots, store: store).status == 0)
        let objects = manifest([s.sub("store/data")])
        defer { for n in names { lxcTool(lxcpath, "lxc-stop", ["-n", n, "-k"]) } }
        startContainers(names, lxcpath: lxcpath, logs: s)
        let seen = sharedFileContents(roots, becoming: ["c1 was here\n", "c2 was here\n"])
        #expect(seen == ["c1 was here\n", "c2 was here\n"], "each container sees its own write")
        for r in roots { #expect(isOverlayMount(r), "the pre-start hook mounted \(r)") }
        #expect(manifest([s.sub("store/data")]) == objects, "no shared object changed")
        // hashify mem finds each container's process in its guest (its own mount namespace), sharing sleep and libc.
        let mem = memReport(["--store", store] + roots)
        for r in roots {
            #expect((guestFigures(mem, r)["processes"] as? Int ?? 0) >= 1, "container processes of \(r): \(mem)")
        }
        #expect(sum(mem, roots, "sharedBytes") > 0)
        #expect(sum(mem, roots, "duplicatedBytes") == 0)
        for n in names { #expect(lxcTool(lxcpath, "lxc-stop", ["-n", n, "-k"]).status == 0) }
        for r in roots { #expect(!isOverlayMount(r), "the post-stop hook unmounted \(r)") }
        let fold = overlay(["fold", "--json"] + roots, store: store)
        #expect(fold.status == 0, "\(fold.err)")
        #expect(overlay(["mount"] + roots, store: store).status == 0)
        let after = roots.map { (try? String(contentsOfFile: "\($0)/usr/lib/shared.so", encoding: .utf8)) ?? "" }
        #expect(after == ["c1 was here\n", "c2 was here\n"], "the fold keeps each write private")
        #expect(overlay(["umount"] + roots, store: store).status == 0)
    }
}
