import Foundation
import HashifySystem
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Fills a file's xattr space with `user.*` attributes (through whatever
/// mount the path is on): values of falling sizes until none fits. Returns how many it set.
@discardableResult
func fillExtendedAttributes(_ path: String) -> Int {
    let r = run([
        "/bin/sh", "-c",
        """
        i=0; for n in 200 100 50 20 8 1; do v=$(head -c $n /dev/zero | tr '\\0' x)
        while setfattr -n user.p$i -v $v "$1" 2>/dev/null; do i=$((i+1)); done; done; echo $i
        """,
        "fill", path,
    ])
    return Int(r.out.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
}

/// Overwrites the start of a file in place (no truncation, no new inode): what
/// `dd conv=notrunc` does, and what a guest's root may do to any file it can open.
func overwriteInPlace(_ path: String, _ bytes: [UInt8], at offset: off_t = 0) {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    precondition(fd >= 0, "open \(path): \(errno)")
    bytes.withUnsafeBytes { _ = pwrite(fd, $0.baseAddress, $0.count, offset) }
    close(fd)
}

/// The record directory of the overlay guest at `root` in `store`.
func overlayRecord(_ store: String, root: String) -> String? {
    let dir = "\(store)/overlay"
    for id in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
        if let r = try? String(contentsOfFile: "\(dir)/\(id)/root", encoding: .utf8), r == root {
            return "\(dir)/\(id)"
        }
    }
    return nil
}

/// The data objects' files in a store (names below data/XX), temporary names included.
func dataObjectNames(_ store: String) -> [String] {
    run(["/usr/bin/find", "\(store)/data", "-mindepth", "2", "-type", "f"]).out.split(separator: "\n").map(String.init)
        .sorted()
}

/// The flags `lsattr` shows for a path (its first field).
func fileFlags(_ path: String) -> String {
    String(run(["/usr/bin/lsattr", "-d", path]).out.split(separator: " ").first ?? "")
}

/// The first guest report of a --json overlay or unify report.
func firstGuestReport(_ out: String) -> [String: Any] {
    let j = jsonReport(out)
    return ((j["overlayGuests"] ?? j["guests"]) as? [[String: Any]])?.first ?? [:]
}

@Suite(
    "isolation between overlay guests against a guest's root", .serialized,
    .enabled(if: isRoot, "overlay mounts need root"))
struct IsolationTests {
    /// Two converted overlay guests sharing one 20 KB file; A and B as their roots.
    func twoGuests(_ s: Scratch) -> (store: String, a: String, b: String) {
        let (store, a, b) = (s.sub("store"), s.sub("guests/a"), s.sub("guests/b"))
        for (i, g) in [a, b].enumerated() {
            writeFile("\(g)/usr/lib/common", pseudoRandom(20_000, seed: 1))
            writeFile("\(g)/usr/lib/own", pseudoRandom(12_000, seed: UInt64(10 + i)))
            writeFile("\(g)/etc/hostname", "guest\(i)\n")
            settleDirectoryTimes(g)
        }
        settle()
        let r = overlay(["convert", "-q", a, b], store: store)
        precondition(r.status == 0, "convert: \(r.err)")
        return (store, a, b)
    }

    /// Two guests (`twoGuests`), their manifests, then both unmounted; with A's record (nil, recorded as an issue, without one).
    func unmountedPair(_ s: Scratch) -> (store: String, a: String, b: String, recordA: String, before: [String])? {
        let (store, a, b) = twoGuests(s)
        let before = [a, b].map(guestManifest)
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
        guard let record = overlayRecord(store, root: a) else {
            Issue.record("no record of \(a)")
            return nil
        }
        return (store, a, b, record, before)
    }

    @Test(
        "a fold that fails (an injected EIO on fchown) publishes nothing a guest can still write, nor does one of a file with a full xattr space: B never reads what A writes afterwards",
        arguments: ["xattrs", "eio-first-fchown", "eio-every-fchown", "one-unify-run"])
    func failedFoldPublishesNothing(_ variant: String) throws {
        let s = Scratch("isofail")
        let (store, a, b) = twoGuests(s)
        let x = pseudoRandom(9000, seed: 77)
        writeFile("\(a)/usr/lib/X", x)
        if variant == "xattrs" || variant == "one-unify-run" {
            writeFile("\(a)/usr/lib/Y", pseudoRandom(9000, seed: 78))
            #expect(fillExtendedAttributes("\(a)/usr/lib/Y") > 10)
        }
        if variant == "one-unify-run" { writeFile("\(b)/usr/lib/X", x) }
        settle()
        let aBefore = guestManifest(a)
        #expect(overlay(["umount", "-q", a], store: store).status == 0)
        let fold: (status: Int32, out: String, err: String)
        switch variant {
        case "eio-first-fchown", "eio-every-fchown":
            let when = variant == "eio-first-fchown" ? "1" : "1+"
            fold = hashifyFailing(
                "fchown", "error=EIO:when=\(when)", ["overlay", "fold", "--json", "--store", store, a])
        case "one-unify-run":
            #expect(overlay(["umount", "-q", b], store: store).status == 0)
            fold = hashify(["unify", "--json", "--store", store, a, b])
        default:
            fold = overlay(["fold", "--json", a], store: store)
        }
        // A failed fold exits 1, never silently 0. A full xattr space no longer stops a stub: an
        // image holds every xattr of the file beside the stub's own (the fold succeeds, nothing kept whole).
        if variant.hasPrefix("eio") {
            #expect(fold.status == 1, "\(variant): \(fold.out) \(fold.err)")
        } else {
            #expect(fold.status == 0, "\(variant): \(fold.out) \(fold.err)")
            #expect(firstGuestReport(fold.out)["filesKeptWhole"] as? Int ?? 0 == 0, "\(fold.out)")
        }
        #expect(
            ((try? FileManager.default.contentsOfDirectory(atPath: "\(store)/reserved")) ?? []).isEmpty,
            "no reserved object left")
        // A comes back as it was (the LXC hook mounts after a failed fold).
        #expect(overlay(["mount", "-q", a], store: store).status == 0)
        #expect(guestManifest(a) == aBefore, "\(manifestDiff(aBefore, guestManifest(a)))")
        // B writes the same content and folds: whatever object it gets, A cannot reach it.
        if variant != "one-unify-run" {
            writeFile("\(b)/usr/lib/X", x)
            settle()
            #expect(overlay(["umount", "-q", b], store: store).status == 0)
            #expect(overlay(["fold", "-q", b], store: store).status == 0)
        }
        #expect(overlay(["mount", "-q", b], store: store).status == 0)
        let bBefore = guestManifest(b)
        overwriteInPlace("\(a)/usr/lib/X", [UInt8](repeating: 0, count: 100))
        #expect(FileManager.default.contents(atPath: "\(b)/usr/lib/X") == Data(x), "B read what A wrote")
        #expect(guestManifest(b) == bBefore)
        // The next fold of A makes what it could not before, and everything checks.
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
        // (A file kept whole stays so in its layer, now a lower one.)
        let again = overlay(["fold", "-q", a], store: store)
        #expect(again.status == 0, "\(again.out) \(again.err)")
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        #expect(hashify(["gc", "-q", "--store", store]).status == 0)
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        #expect(overlay(["mount", "-q", a, b], store: store).status == 0)
        #expect(FileManager.default.contents(atPath: "\(b)/usr/lib/X") == Data(x))
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
    }

    @Test(
        "a copy of a shared file whose xattr space is full becomes a stub like any other (the image holds its xattrs): the guest mounts, gc runs and later folds still remove objects"
    )
    func fullXattrsAfterSwitch() throws {
        let s = Scratch("isojam")
        let (store, a, b) = twoGuests(s)
        _ = run(["/bin/cp", "-p", "\(a)/usr/lib/common", "\(a)/usr/lib/common-copy"])
        #expect(fillExtendedAttributes("\(a)/usr/lib/common-copy") > 10)
        settle()
        let aBefore = guestManifest(a)
        #expect(overlay(["umount", "-q", a], store: store).status == 0)
        let fold = overlay(["fold", "--json", a], store: store)
        #expect(fold.status == 0, "\(fold.out) \(fold.err)")
        #expect(
            firstGuestReport(fold.out)["filesKeptWhole"] as? Int ?? 0 == 0, "the image holds its xattrs: \(fold.out)")
        #expect(overlay(["mount", "-q", a], store: store).status == 0)
        #expect(guestManifest(a) == aBefore, "\(manifestDiff(aBefore, guestManifest(a)))")
        #expect(hashify(["gc", "-q", "--store", store]).status == 0)
        // B drops its own file: its fold removes the object only it named.
        unlink("\(b)/usr/lib/own")
        #expect(overlay(["umount", "-q", b], store: store).status == 0)
        let foldB = overlay(["fold", "--json", b], store: store)
        #expect(foldB.status == 0, "\(foldB.err)")
        #expect(firstGuestReport(foldB.out)["objectsRemoved"] as? Int == 1, "\(foldB.out)")
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        #expect(overlay(["umount", "-q", a], store: store).status == 0)
    }

    @Test(
        "a guest whose fold fails (its root made a tree deeper than the descriptors the fold may open) keeps its generation; the other guests of the command still fold, and the report names each"
    )
    func oneFailedFoldReportsAll() throws {
        let s = Scratch("isofail")
        let (store, a, b) = twoGuests(s)
        writeFile("\(a)/etc/changed", "a copy-up\n")
        // Made through the mount; no descriptor stays open in it (the unmount below needs none).
        do {
            var deep = try Directory.open(path: FilePath(b))
            for _ in 0..<400 {
                try deep.makeDirectory(FileName("d"), mode: 0o755)
                deep = try deep.openDirectory(FileName("d"))
            }
        }
        settle()
        let (aBefore, bBefore) = (guestManifest(a), guestManifest(b))
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
        // B first: before, its failure ended the command and A was not folded.
        let fold = run([
            "/usr/bin/prlimit", "--nofile=250:250", hashifyBinary, "overlay", "fold", "--json", "--store", store, b, a,
        ])
        #expect(fold.status == 1, "\(fold.out) \(fold.err)")
        let guests = jsonReport(fold.out)["guests"] as? [[String: Any]] ?? []
        #expect(guests.count == 2, "\(fold.out) \(fold.err)")
        #expect(guests.first?["action"] as? String == "left as it was", "\(fold.out)")
        #expect(
            (guests.first?["notes"] as? [String] ?? []).contains { $0.contains("the guest keeps generation 1") },
            "\(fold.out)")
        #expect(guests.last?["action"] as? String == "folded", "\(fold.out)")
        #expect(overlay(["mount", "-q", a, b], store: store).status == 0)
        #expect(guestManifest(a) == aBefore, "\(manifestDiff(aBefore, guestManifest(a)))")
        #expect(guestManifest(b) == bBefore, "\(manifestDiff(bBefore, guestManifest(b)))")
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
    }

    @Test(
        "a guest unmounted lazily while a process keeps a file open for writing is not folded until the process is gone; the other guest never reads its writes"
    )
    func lazyUnmountIsNotFolded() throws {
        let s = Scratch("isolazy")
        let (store, a, b) = twoGuests(s)
        let x = pseudoRandom(9000, seed: 91)
        writeFile("\(a)/usr/lib/X", x)
        settle()
        // A writer that keeps A's file open, then a lazy unmount (what `umount -l` in a hook would do).
        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: "/bin/sh")
        writer.arguments = ["-c", "exec 7>>\"$1\"; read line; printf 'late write' >&7", "writer", "\(a)/usr/lib/X"]
        let input = Pipe()
        writer.standardInput = input
        try writer.run()
        usleep(300_000)
        #expect(run(["/bin/umount", "-l", a]).status == 0)
        let fold = overlay(["fold", "--json", a], store: store)
        #expect(fold.status == 0, "\(fold.err)")
        #expect(firstGuestReport(fold.out)["action"] as? String == "in use elsewhere: fold later", "\(fold.out)")
        // B shares the content meanwhile.
        writeFile("\(b)/usr/lib/X", x)
        settle()
        #expect(overlay(["umount", "-q", b], store: store).status == 0)
        #expect(overlay(["fold", "-q", b], store: store).status == 0)
        #expect(overlay(["mount", "-q", b], store: store).status == 0)
        // The process writes, then exits: A's file has the write, B's does not.
        input.fileHandleForWriting.write(Data("go\n".utf8))
        writer.waitUntilExit()
        #expect(FileManager.default.contents(atPath: "\(b)/usr/lib/X") == Data(x), "B read what A wrote")
        let after = overlay(["fold", "--json", a], store: store)
        #expect(firstGuestReport(after.out)["action"] as? String == "folded", "\(after.out) \(after.err)")
        #expect(overlay(["mount", "-q", a], store: store).status == 0)
        #expect(FileManager.default.contents(atPath: "\(a)/usr/lib/X") == Data(x + Array("late write".utf8)))
        #expect(FileManager.default.contents(atPath: "\(b)/usr/lib/X") == Data(x))
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
    }

    @Test("a guest record the store cannot read keeps every object: gc and folds remove nothing and say why")
    func unreadableRecordKeepsObjects() throws {
        let s = Scratch("isorecord")  // kept: the scratch directory goes when it does
        guard let (store, a, b, record, before) = unmountedPair(s) else { return }
        let aBefore = before[0]
        // One trailing newline: the record no longer names its guest.
        let f = FileHandle(forWritingAtPath: "\(record)/root")!
        f.seekToEndOfFile()
        f.write(Data("\n".utf8))
        f.closeFile()
        let objects = dataObjectNames(store)
        let gc = hashify(["gc", "--store", store])
        #expect(gc.status == 2, "\(gc.out) \(gc.err)")
        #expect(gc.err.contains(record), "\(gc.err)")
        #expect(dataObjectNames(store) == objects)
        // B drops the file both share and its own: its fold removes nothing while A's record is unknown.
        #expect(overlay(["mount", "-q", b], store: store).status == 0)
        unlink("\(b)/usr/lib/common")
        unlink("\(b)/usr/lib/own")
        #expect(overlay(["umount", "-q", b], store: store).status == 0)
        let fold = overlay(["fold", "--json", b], store: store)
        #expect(fold.status == 0, "\(fold.err)")
        #expect(firstGuestReport(fold.out)["objectsRemoved"] as? Int == 0, "\(fold.out)")
        #expect(dataObjectNames(store) == objects)
        // Repaired, A is whole; gc then removes what only B named.
        #expect(run(["/usr/bin/truncate", "-s", "-1", "\(record)/root"]).status == 0)
        #expect(overlay(["mount", "-q", a], store: store).status == 0)
        #expect(guestManifest(a) == aBefore)
        // A record a conversion killed at its very start leaves (no root, no state, no generation) references nothing.
        mkdirs("\(store)/overlay/0123456789abcdef/mnt")
        writeFile("\(store)/overlay/0123456789abcdef/.root.new", "/somewhere")
        #expect(hashify(["gc", "-q", "--store", store]).status == 0)
        #expect(dataObjectNames(store).count == objects.count - 1)
        #expect(guestManifest(a) == aBefore)
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        #expect(overlay(["umount", "-q", a], store: store).status == 0)
    }

    @Test(
        "the lower layout keeps mounting across writes, folds and mounts; a guest's own directory named like an object directory never hides an object"
    )
    func lowerLayoutAcrossFolds() throws {
        let s = Scratch("isolower")
        let (store, a) = (s.sub("store"), s.sub("guests/a"))
        writeFile("\(a)/usr/lib/common", pseudoRandom(20_000, seed: 1))
        settleDirectoryTimes(a)
        settle()
        #expect(overlay(["convert", "-q", a], store: store, layout: "lower").status == 0)
        for round in 0..<3 {
            writeFile("\(a)/usr/lib/w\(round)", pseudoRandom(9000, seed: UInt64(200 + round)))
            settle()
            #expect(overlay(["umount", "-q", a], store: store, layout: "lower").status == 0)
            let fold = overlay(["fold", "-q", a], store: store, layout: "lower")
            #expect(fold.status == 0, "round \(round): \(fold.err)")
            #expect(overlay(["mount", "-q", a], store: store, layout: "lower").status == 0, "round \(round)")
            writeFile("\(a)/usr/lib/v\(round)", pseudoRandom(9000, seed: UInt64(300 + round)))
            settle()
            let current = guestManifest(a)
            #expect(overlay(["umount", "-q", a], store: store, layout: "lower").status == 0)
            let remount = overlay(["mount", "-q", a], store: store, layout: "lower")
            #expect(remount.status == 0, "round \(round): \(remount.err)")
            #expect(guestManifest(a) == current, "round \(round)")
        }
        // A directory of the guest's own named like the objects' directory of a content it then writes.
        let p = pseudoRandom(9000, seed: 400)
        writeFile(s.sub("P"), p)
        let prefix = String(run(["/usr/bin/sha256sum", s.sub("P")]).out.prefix(2))
        writeFile("\(a)/\(prefix)/own", "the guest's own\n")
        writeFile("\(a)/usr/lib/P", p)
        settle()
        let current = guestManifest(a)
        for compact in [false, true] {
            #expect(overlay(["umount", "-q", a], store: store, layout: "lower").status == 0)
            let fold = overlay(["fold", "-q", a] + (compact ? ["--compact"] : []), store: store, layout: "lower")
            #expect(fold.status == 0, "\(fold.err)")
            #expect(overlay(["mount", "-q", a], store: store, layout: "lower").status == 0)
            #expect(guestManifest(a) == current, "\(manifestDiff(current, guestManifest(a)))")
            #expect(try FileManager.default.contentsOfDirectory(atPath: "\(a)/\(prefix)") == ["own"])
        }
        #expect(hashify(["manifest", "--store", store, a]).status == 0)
        let copy = s.sub("exported")
        #expect(overlay(["export", "-q", a, copy], store: store, layout: "lower").status == 0)
        #expect(guestManifest(copy) == current)
        #expect(overlay(["umount", "-q", a], store: store, layout: "lower").status == 0)
    }

    @Test("immutable and append-only flags set through the mount survive folds and compactions")
    func protectedFlagsSurviveFolds() throws {
        let s = Scratch("isoflags")
        let (store, a, _) = twoGuests(s)
        writeFile("\(a)/var/log/old.log", "old\n")
        writeFile("\(a)/usr/lib/new", pseudoRandom(9000, seed: 501))
        writeFile("\(a)/usr/lib/small", "small\n")
        // EROFS has no inode flags (FS_IOC_GETFLAGS): chattr and lsattr work on what the guest has
        // changed (copied up), as on composefs. A chmod copies the shared file's metadata up first.
        #expect(run(["/bin/chmod", "644", "\(a)/usr/lib/common"]).status == 0)
        for (flag, path) in [
            ("+i", "usr/lib/common"), ("+i", "usr/lib/new"), ("+i", "usr/lib/small"), ("+a", "var/log"),
        ] {
            #expect(run(["/usr/bin/chattr", flag, "\(a)/\(path)"]).status == 0)
        }
        settle()
        let flags = ["usr/lib/common", "usr/lib/new", "usr/lib/small", "var/log"].map { fileFlags("\(a)/\($0)") }
        #expect(flags.allSatisfy { $0.contains("i") || $0.contains("a") }, "\(flags)")
        var before = guestManifest(a)
        for compact in [false, false, true] {
            #expect(overlay(["umount", "-q", a], store: store).status == 0)
            let fold = overlay(["fold", "-q", a] + (compact ? ["--compact"] : []), store: store)
            #expect(fold.status == 0, "\(fold.err)")
            #expect(overlay(["mount", "-q", a], store: store).status == 0)
            #expect(guestManifest(a) == before, "\(manifestDiff(before, guestManifest(a)))")
            #expect(
                ["usr/lib/common", "usr/lib/new", "usr/lib/small", "var/log"].map { fileFlags("\(a)/\($0)") } == flags,
                "compact: \(compact)")
            // Still enforced: no append to the immutable file, no removal in the append-only directory.
            #expect(run(["/bin/sh", "-c", "echo x >> \"$1\"", "x", "\(a)/usr/lib/new"]).status != 0)
            #expect(run(["/bin/rm", "-f", "\(a)/var/log/old.log"]).status != 0)
            // Something else changes, so that the next fold has work.
            writeFile("\(a)/usr/lib/round", pseudoRandom(9000, seed: compact ? 601 : 600))
            settle()
            before = guestManifest(a)
        }
        #expect(overlay(["umount", "-q", a], store: store).status == 0)
    }
}

extension IsolationTests {
    @Test(
        "a data object verify finds damaged is never given to a new stub: a guest folding its content gets a sound copy"
    )
    func damagedObjectIsNeverReused() throws {
        let s = Scratch("isodamaged")
        let (store, a, b) = twoGuests(s)
        let common = pseudoRandom(20_000, seed: 1)
        // The object both guests' common file names, damaged in place (a disk fault, a careless admin).
        let objects = dataObjectNames(store).filter {
            FileManager.default.contents(atPath: $0) == Data(common)
        }
        #expect(objects.count == 1)
        overwriteInPlace(objects[0], Array("damaged".utf8))
        let verify = hashify(["verify", "--json", "--store", store])
        #expect(verify.status == 1, "\(verify.out) \(verify.err)")
        let damaged = jsonReport(verify.out)["damagedDataObjects"] as? [[String: Any]] ?? []
        #expect(damaged.count == 1 && damaged.first?["neverReused"] as? Bool == true, "\(damaged)")
        // A writes the content again under a new name and folds: its stub names a sound object.
        writeFile("\(a)/usr/lib/common-again", common)
        settle()
        #expect(overlay(["umount", "-q", a], store: store).status == 0)
        #expect(overlay(["fold", "-q", a], store: store).status == 0)
        #expect(overlay(["mount", "-q", a], store: store).status == 0)
        #expect(FileManager.default.contents(atPath: "\(a)/usr/lib/common-again") == Data(common))
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
    }
}

extension IsolationTests {
    @Test(
        "files with a full xattr space in a guest with a prefix-named directory, folded and compacted: stubs with every xattr, the same view each round"
    )
    func fullXattrsInCompaction() throws {
        let s = Scratch("isocompact")
        let (store, a, b) = twoGuests(s)
        writeFile("\(a)/ab/own", "the guest's own\n")
        _ = run(["/bin/cp", "-p", "\(a)/usr/lib/common", "\(a)/usr/lib/fullcopy"])
        writeFile("\(a)/usr/lib/fullnew", pseudoRandom(9000, seed: 700))
        for f in ["fullcopy", "fullnew"] { #expect(fillExtendedAttributes("\(a)/usr/lib/\(f)") > 2) }
        settle()
        var before = guestManifest(a)
        for round in 0..<3 {
            #expect(overlay(["umount", "-q", a], store: store).status == 0)
            let fold = overlay(["fold", "--json"] + (round == 2 ? ["--compact"] : []) + [a], store: store)
            #expect(fold.status == 0, "round \(round): \(fold.out) \(fold.err)")
            #expect(firstGuestReport(fold.out)["filesKeptWhole"] as? Int ?? 0 == 0, "\(fold.out)")
            #expect(overlay(["mount", "-q", a], store: store).status == 0)
            #expect(guestManifest(a) == before, "round \(round): \(manifestDiff(before, guestManifest(a)))")
            writeFile("\(a)/usr/lib/round\(round)", pseudoRandom(9000, seed: UInt64(710 + round)))
            settle()
            before = guestManifest(a)
        }
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
    }

    @Test(
        "a careless admin's damage to the store removes nothing a guest uses: a truncated or emptied reference list, a stale state, a deleted data index, an immutable object"
    )
    func carelessAdmin() throws {
        let s = Scratch("isoadmin")
        let (store, a, b) = twoGuests(s)
        let shared = pseudoRandom(12_000, seed: 800)
        for g in [a, b] { writeFile("\(g)/etc/z", shared) }
        settle()
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
        #expect(hashify(["unify", "-q", "--store", store, a, b]).status == 0)
        guard let recordB = overlayRecord(store, root: b) else {
            Issue.record("no record of \(b)")
            return
        }
        #expect(overlay(["mount", "-q", a, b], store: store).status == 0)
        let bBefore = guestManifest(b)
        // B's reference lists cut mid-line and emptied: A's fold that drops the shared file keeps its object.
        let lists = run(["/usr/bin/find", recordB, "-name", "*.refs"]).out.split(separator: "\n").map(String.init)
        #expect(!lists.isEmpty)
        for (i, l) in lists.enumerated() {
            #expect(run(["/usr/bin/truncate", "-s", i == 0 ? "8" : "0", l]).status == 0)
        }
        unlink("\(a)/etc/z")
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
        let fold = overlay(["fold", "--json", a], store: store)
        #expect(fold.status == 0, "\(fold.err)")
        #expect(firstGuestReport(fold.out)["objectsRemoved"] as? Int == 0, "\(fold.out)")
        #expect(overlay(["mount", "-q", b], store: store).status == 0)
        #expect(guestManifest(b) == bBefore)
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        // A stale state (one generation behind, as a restored backup would be): refused, nothing removed.
        writeFile("\(b)/etc/new", pseudoRandom(9000, seed: 801))
        settle()
        let bChanged = guestManifest(b)
        #expect(overlay(["umount", "-q", b], store: store).status == 0)
        let oldState = try String(contentsOfFile: "\(recordB)/state", encoding: .utf8)
        #expect(overlay(["fold", "-q", b], store: store).status == 0)
        let newState = try String(contentsOfFile: "\(recordB)/state", encoding: .utf8)
        writeFile("\(recordB)/state", oldState)
        let layersBefore = run(["/usr/bin/find", recordB]).out
        let mount = overlay(["mount", b], store: store)
        #expect(mount.status == 2, "\(mount.out) \(mount.err)")
        #expect(mount.err.contains("damaged overlay record"), "\(mount.err)")
        #expect(run(["/usr/bin/find", recordB]).out == layersBefore, "nothing of the record removed")
        #expect(hashify(["gc", "-q", "--store", store]).status != 0)
        writeFile("\(recordB)/state", newState)
        #expect(overlay(["mount", "-q", b], store: store).status == 0)
        #expect(guestManifest(b) == bChanged)
        // The data index deleted: rebuilt from the objects, so a fold shares instead of copying.
        #expect(unlink("\(store)/data-index") == 0)
        writeFile("\(b)/etc/z-again", shared)
        settle()
        #expect(overlay(["umount", "-q", b], store: store).status == 0)
        let refold = overlay(["fold", "--json", b], store: store)
        #expect(refold.status == 0, "\(refold.err)")
        #expect(firstGuestReport(refold.out)["filesSharingObjects"] as? Int == 1, "\(refold.out)")
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        // An object made immutable, then unused: neither the fold nor gc says it removed it.
        #expect(overlay(["mount", "-q", b], store: store).status == 0)
        let newContent = Data(pseudoRandom(9000, seed: 801))
        guard
            let newObject = dataObjectNames(store).first(where: {
                FileManager.default.contents(atPath: $0) == newContent
            })
        else {
            Issue.record("no object of /etc/new")
            return
        }
        #expect(run(["/usr/bin/chattr", "+i", newObject]).status == 0)
        defer { _ = run(["/usr/bin/chattr", "-i", newObject]) }
        unlink("\(b)/etc/new")
        #expect(overlay(["umount", "-q", b], store: store).status == 0)
        let dropFold = overlay(["fold", "--json", b], store: store)
        #expect(firstGuestReport(dropFold.out)["objectsRemoved"] as? Int == 0, "\(dropFold.out)")
        #expect(
            (firstGuestReport(dropFold.out)["notes"] as? [String] ?? []).contains {
                $0.contains("1 object its fold left unused could not be removed")
            }, "the fold says what it left: \(dropFold.out)")
        let gc = hashify(["gc", "--json", "--store", store])
        #expect(gc.status == 1, "it says what it could not remove: \(gc.out)")
        #expect(jsonReport(gc.out)["dataObjectsRemoved"] as? Int == 0, "\(gc.out)")
        #expect((jsonReport(gc.out)["notRemoved"] as? [String] ?? []).count == 1, "\(gc.out)")
        #expect(FileManager.default.fileExists(atPath: newObject))
    }
}

extension IsolationTests {
    @Test("a data object deleted by hand: status, unify, mount and manifest name the file and its object")
    func missingObjectNamed() throws {
        let s = Scratch("isomissing")
        let (store, a, b) = twoGuests(s)
        let own = Data(pseudoRandom(12_000, seed: 11))  // b's own file
        guard let object = dataObjectNames(store).first(where: { FileManager.default.contents(atPath: $0) == own })
        else {
            Issue.record("no object of b's own file")
            return
        }
        #expect(unlink(object) == 0)
        let status = hashify(["status", "--json", "--store", store])
        let section = jsonReport(status.out)["overlay"] as? [String: Any] ?? [:]
        let rows = section["guests"] as? [[String: Any]] ?? []
        #expect(rows.first { $0["root"] as? String == b }?["missingDataObjects"] as? Int == 1, "\(rows)")
        #expect(rows.first { $0["root"] as? String == a }?["missingDataObjects"] as? Int == 0, "\(rows)")
        let warnings = (section["warnings"] as? [String] ?? []).joined(separator: "\n")
        let named = "\(b): 1 file cannot be read: its data object is missing from the store (/usr/lib/own (data/"
        #expect(warnings.contains(named), "\(warnings)")
        let text = hashify(["status", "--store", store])
        #expect(text.out.contains(named), "\(text.out)")
        // Every command that reads the guest names the file and its object.
        let fold = hashify(["unify", "--json", "--store", store, a, b])
        let rows2 = (jsonReport(fold.out)["overlayGuests"] as? [[String: Any]]) ?? []
        #expect(rows2.first { $0["root"] as? String == b }?["filesWithoutData"] as? Int == 1, "\(fold.out)")
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
        let mount = overlay(["mount", b], store: store)
        #expect(
            mount.status == 0 && mount.out.contains("cannot be read") && mount.out.contains("/usr/lib/own"),
            "\(mount.out)")
        #expect(overlay(["umount", "-q", b], store: store).status == 0)
        let manifest = hashify(["manifest", "--store", store, b])
        #expect(manifest.status == 1, "the listing is not whole")
        #expect(manifest.out.contains("unreadable /usr/lib/own: its data object data/"), "\(manifest.out)")
    }
}

extension IsolationTests {
    @Test(
        "verify --repair puts a missing data object back from another copy of its content, and otherwise lists the files lost"
    )
    func repairRestoresMissingObject() throws {
        let s = Scratch("isorestore")
        let store = s.sub("guests/.hashify")
        let (p1, p2, o) = (s.sub("guests/p1"), s.sub("guests/p2"), s.sub("guests/o"))
        let shared = pseudoRandom(20_000, seed: 61)
        for g in [p1, p2, o] { writeFile("\(g)/usr/lib/shared", shared) }
        writeFile("\(o)/usr/lib/own", pseudoRandom(12_000, seed: 62))
        // A content a plain guest holds alone (not linked: no hardlink object), and one the overlay guest copies.
        let plainOnly = pseudoRandom(9_000, seed: 63)
        let copied = pseudoRandom(7_000, seed: 64)
        for g in [p1, o] { writeFile("\(g)/usr/share/plain-only", plainOnly) }
        writeFile("\(o)/usr/lib/copied", copied)
        for g in [p1, p2, o] { settleDirectoryTimes(g) }
        settle()
        // Two plain guests share the content through a hardlink object; the overlay guest holds it as a data object.
        #expect(hashify(["unify", "-q", "--store", store, p1, p2]).status == 0)
        #expect(overlay(["convert", "-q", o], store: store).status == 0)
        let objects = dataObjectNames(store)
        func object(of content: [UInt8]) -> String? {
            objects.first(where: { FileManager.default.contents(atPath: $0) == Data(content) })
        }
        guard let sharedObject = object(of: shared), let ownObject = object(of: pseudoRandom(12_000, seed: 62)),
            let plainObject = object(of: plainOnly), let copiedObject = object(of: copied)
        else {
            Issue.record("objects not found: \(objects)")
            return
        }
        // The guest copies a file: the copy is a copy-up in its upper layer, the only other copy of that content.
        writeFile("\(o)/usr/lib/copy-of-copied", copied)
        #expect(overlay(["umount", "-q", o], store: store).status == 0)
        for object in [sharedObject, ownObject, plainObject, copiedObject] { #expect(unlink(object) == 0) }
        let repair = hashify(["verify", "--repair", "--json", "--store", store, p1, p2, o])
        let damaged = jsonReport(repair.out)["damagedDataObjects"] as? [[String: Any]] ?? []
        let restored = damaged.filter { $0["restored"] as? Bool == true }
        let from = restored.compactMap { $0["restoredFrom"] as? String }.sorted()
        let lost = damaged.flatMap { $0["filesLost"] as? [String] ?? [] }
        #expect(restored.count == 3, "\(damaged)")
        #expect(from.contains { $0.hasPrefix("objects/") }, "\(from)")
        #expect(from.contains("\(p1): /usr/share/plain-only"), "\(from)")
        #expect(
            from.contains { $0.hasPrefix("\(o) (copy-ups") && $0.hasSuffix(": /usr/lib/copy-of-copied") }, "\(from)")
        #expect(lost == ["\(o): /usr/lib/own"], "\(damaged)")
        let text = hashify(["verify", "--store", store])
        #expect(text.out.contains("missing"), "the lost object is still reported: \(text.out)")
        #expect(overlay(["mount", "-q", o], store: store).status == 0)
        #expect(FileManager.default.contents(atPath: "\(o)/usr/lib/shared") == Data(shared))
        #expect(FileManager.default.contents(atPath: "\(o)/usr/share/plain-only") == Data(plainOnly))
        #expect(FileManager.default.contents(atPath: "\(o)/usr/lib/copied") == Data(copied))
        #expect(FileManager.default.contents(atPath: "\(o)/usr/lib/own") == nil, "that file's only copy is gone")
        #expect(overlay(["umount", "-q", o], store: store).status == 0)
    }
}

extension IsolationTests {
    @Test(
        "an image truncated or edited by hand is refused in one line (never mounted or read); the other guest mounts; verify names it; gc removes nothing; the image put back, all is well"
    )
    func damagedImageRefused() throws {
        let s = Scratch("isoimage")
        guard let (store, a, b, recordA, before) = unmountedPair(s) else { return }
        let bBefore = before[1]
        let image = "\(recordA)/g1/meta.erofs"
        let saved = s.sub("saved.erofs")
        #expect(run(["/bin/cp", "-a", image, saved]).status == 0)
        for damage in ["truncate", "edit"] {
            if damage == "truncate" {
                #expect(run(["/usr/bin/truncate", "-s", "5000", image]).status == 0)
            } else {
                #expect(run(["/bin/cp", saved, image]).status == 0)
                overwriteInPlace(image, Array("/ff/ffffffffffff".utf8), at: 2000)
            }
            let mount = overlay(["mount", a], store: store)
            #expect(mount.status == 2, "\(damage): \(mount.out) \(mount.err)")
            #expect(mount.err.contains("does not match the SHA-256"), "\(mount.err)")
            #expect(mount.err.split(separator: "\n").count == 1, "one line: \(mount.err)")
            #expect(!isOverlayMount(a))
            #expect(overlay(["mount", "-q", b], store: store).status == 0, "the other guest mounts")
            #expect(guestManifest(b) == bBefore)
            #expect(overlay(["umount", "-q", b], store: store).status == 0)
            let verify = hashify(["verify", "--json", "--store", store])
            #expect(verify.status == 1, "\(verify.out)")
            #expect((jsonReport(verify.out)["damagedImages"] as? [String] ?? []).count == 1, "\(verify.out)")
            let objects = dataObjectNames(store).count
            #expect(hashify(["gc", "-q", "--store", store]).status == 2, "gc refuses while a record is unknown")
            #expect(dataObjectNames(store).count == objects)
        }
        #expect(run(["/bin/cp", saved, image]).status == 0)
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        #expect(overlay(["mount", "-q", a, b], store: store).status == 0)
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
    }
}

extension IsolationTests {
    @Test(
        "an xattr read that fails during a fold (EIO injected on each fgetxattr in turn) fails the fold or leaves the guest's view exactly as it was: a renamed directory is never taken for the old one"
    )
    func xattrReadErrorInFold() throws {
        let s = Scratch("isoxattr")
        let (store, a, _) = twoGuests(s)
        for i in 0..<6 {
            writeFile("\(a)/usr/share/d\(i)/file", pseudoRandom(3000, seed: UInt64(900 + i)))
        }
        settle()
        #expect(overlay(["umount", "-q", a], store: store).status == 0)
        #expect(overlay(["fold", "-q", a], store: store).status == 0)
        #expect(overlay(["mount", "-q", a], store: store).status == 0)
        var failed = 0
        for n in 1...24 {
            // Directories swapped by renames (overlayfs records each move with a redirect xattr).
            let (x, y) = ("\(a)/usr/share/d\(n % 6)", "\(a)/usr/share/d\((n + 1) % 6)")
            #expect(rename(x, "\(x)-moving") == 0 && rename(y, x) == 0 && rename("\(x)-moving", y) == 0)
            settle()
            let expected = guestManifest(a)
            #expect(overlay(["umount", "-q", a], store: store).status == 0)
            let fold = hashifyFailing(
                "fgetxattr", "error=EIO:when=\(n)", ["overlay", "fold", "-q", "--store", store, a])
            if fold.status != 0 {
                failed += 1
                #expect(fold.status == 1, "\(n): \(fold.err)")
            }
            #expect(overlay(["mount", "-q", a], store: store).status == 0)
            #expect(guestManifest(a) == expected, "EIO on fgetxattr #\(n): \(manifestDiff(expected, guestManifest(a)))")
        }
        #expect(failed > 0, "some injected read failed a fold")
        #expect(overlay(["umount", "-q", a], store: store).status == 0)
    }
}
