import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("damaged overlay records", .serialized, .enabled(if: isRoot, "overlay mounts need root"))
struct OverlayRecordTests {
    @Test(
        "a state that cannot be read is reported and left alone: no generation is removed on its word",
        arguments: ["garbage", "empty", "missing", "unknown phase", "generation 99", "huge"])
    func damagedState(_ damage: String) throws {
        let s = Scratch("ovrec")
        let store = s.sub("store")
        let g = s.sub("guests/g")
        makeGuest(g, index: 0)
        settleDirectoryTimes(g)
        settle()
        let before = guestManifest(g)
        #expect(overlay(["convert", g], store: store).status == 0)
        #expect(overlay(["umount", g], store: store).status == 0)
        let records = try FileManager.default.contentsOfDirectory(atPath: store + "/overlay")
        #expect(records.count == 1)
        let record = store + "/overlay/" + records[0]
        let stateFile = record + "/state"
        let good = try Data(contentsOf: URL(fileURLWithPath: stateFile))
        switch damage {
        case "garbage":
            try Data((0..<300).map { UInt8(truncatingIfNeeded: $0 &* 37) }).write(to: URL(fileURLWithPath: stateFile))
        case "empty": try Data().write(to: URL(fileURLWithPath: stateFile))
        case "missing": unlink(stateFile)
        case "unknown phase":
            try Data("phase sideways\ngeneration 1\nroot-inode 5\n".utf8).write(to: URL(fileURLWithPath: stateFile))
        case "generation 99":
            try Data("phase active\ngeneration 99\nroot-inode 0\n".utf8).write(to: URL(fileURLWithPath: stateFile))
        default: try Data(repeating: 0x61, count: 1 << 20).write(to: URL(fileURLWithPath: stateFile))
        }
        let damagedRecord = manifest([record])
        for command in [["mount", g], ["fold", g], ["export", g], ["convert", g], ["umount", g]] {
            let r = overlay(command, store: store)
            #expect(r.status == 2, "\(command): \(r.status) \(r.err)")
            #expect(
                r.err.contains("damaged overlay record") && r.err.split(separator: "\n").count == 1,
                "\(command): \(r.err)")
            #expect(manifest([record]) == damagedRecord, "\(command) changed the record")
        }
        let u = hashify(["unify", "--store", store, "--json", g])
        #expect(manifest([record]) == damagedRecord, "unify changed the record")
        #expect(
            u.out.contains("damaged overlay record") || u.err.contains("damaged overlay record"), "\(u.out) \(u.err)")
        let st = hashify(["status", "--store", store])
        #expect(
            st.out.contains("damaged overlay record") || st.err.contains("damaged overlay record"),
            "\(st.out) \(st.err)")
        // Put back, the guest mounts and is whole.
        try good.write(to: URL(fileURLWithPath: stateFile))
        let m = overlay(["mount", g], store: store)
        #expect(m.status == 0, "\(m.err)")
        #expect(guestManifest(g) == before)
        #expect(overlay(["umount", g], store: store).status == 0)
    }
}

@Suite("overlay guests of the previous format", .serialized, .enabled(if: isRoot, "overlay mounts need root"))
struct PreviousFormatTests {
    /// Turns a record's generation 1 into the previous format: its metadata
    /// layer a directory of stubs (`g1/meta`, what earlier versions wrote:
    /// sparse files with `trusted.overlay.metacopy` and the redirect, small
    /// files whole, whiteouts `00`…`ff` and opaque prefix-named directories
    /// at its root), no image and no reference list. The image's own tree,
    /// copied with every xattr, is exactly such a layer.
    func downgrade(_ record: String, scratch: Scratch) -> String? {
        let mnt = scratch.sub("image-\(URL(fileURLWithPath: record).lastPathComponent)")
        mkdirs(mnt)
        let image = "\(record)/g1/meta.erofs"
        let m = run(["/bin/mount", "-t", "erofs", "-o", "ro", image, mnt])
        if m.status != 0, case let l = run(["/bin/mount", "-t", "erofs", "-o", "ro,loop", image, mnt]), l.status != 0 {
            return "mount: \(m.err) \(l.err)"
        }
        defer { unmount(mnt) }
        mkdirs("\(record)/g1/meta")
        let cp = run(["/bin/cp", "-a", "\(mnt)/.", "\(record)/g1/meta/"])
        if cp.status != 0 { return "cp: \(cp.err)" }
        guard unlink(image) == 0, unlink("\(record)/g1/meta.erofs.refs") == 0 else { return "unlink failed" }
        return nil
    }

    @Test(
        "a store written by the previous format (directory layers): guests mount and show what they showed; a fold, or fold --compact, makes each an image; gc keeps every object"
    )
    func directoryLayersBecomeImages() throws {
        let s = Scratch("prevformat")
        let store = s.sub("store")
        let (a, b) = (s.sub("guests/a"), s.sub("guests/b"))
        // (Not the rich guest: cp cannot copy its path deeper than PATH_MAX out of the image.)
        for (i, g) in [a, b].enumerated() {
            makeGuest(g, index: i, files: 30)
            link("\(g)/usr/lib/lib3.so", "\(g)/usr/share/lib3-again")
            writeFile(
                "\(g)/etc/acl", pseudoRandom(900, seed: 11), mode: 0o640, gid: 42, xattrs: [("user.note", [1, 2])])
        }
        writeFile("\(b)/ab/own", "a directory named like the objects' directories\n")
        settle()
        let before = [a, b].map(guestManifest)
        #expect(overlay(["convert", "-q", "--no-mount", a, b], store: store).status == 0)
        for r in [a, b] {
            guard let record = overlayRecord(store, root: r) else {
                Issue.record("no record of \(r)")
                return
            }
            let failure = downgrade(record, scratch: s)
            #expect(failure == nil, "downgrading \(record): \(failure ?? "")")
        }
        let objects = dataObjectNames(store).count
        #expect(objects > 10)
        // They mount as they are, and show what they showed.
        #expect(overlay(["mount", "-q", a, b], store: store).status == 0)
        #expect([a, b].map(guestManifest) == before)
        let status = hashify(["status", "--json", "--store", store])
        #expect(status.status == 0, "\(status.err)")
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        // A change in a, folded by unify: a's next generation is an image; b, with nothing to fold, stays as it is.
        writeFile("\(a)/usr/lib/after-upgrade", pseudoRandom(9000, seed: 900))
        unlink("\(a)/usr/share/lib3-again")
        settle()
        let changed = guestManifest(a)
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
        let unify = hashify(["unify", "--json", "--store", store, a, b])
        #expect(unify.status == 0, "\(unify.out) \(unify.err)")
        let folds = jsonReport(unify.out)["overlayGuests"] as? [[String: Any]] ?? []
        #expect(folds.map { $0["action"] as? String } == ["folded", "nothing to fold"], "\(unify.out)")
        let recordA = overlayRecord(store, root: a) ?? ""
        let recordB = overlayRecord(store, root: b) ?? ""
        #expect(FileManager.default.fileExists(atPath: "\(recordA)/g2/meta.erofs"))
        #expect(!FileManager.default.fileExists(atPath: "\(recordA)/g2/meta"))
        #expect(!FileManager.default.fileExists(atPath: "\(recordA)/g1"), "the old generation went")
        #expect(FileManager.default.fileExists(atPath: "\(recordB)/g1/meta"))
        // b becomes an image when a compaction asks.
        let compact = overlay(["fold", "--json", "--compact", b], store: store)
        #expect(compact.status == 0, "\(compact.out) \(compact.err)")
        #expect(firstGuestReport(compact.out)["action"] as? String == "folded", "\(compact.out)")
        #expect(FileManager.default.fileExists(atPath: "\(recordB)/g2/meta.erofs"))
        #expect(overlay(["mount", "-q", a, b], store: store).status == 0)
        #expect(guestManifest(a) == changed, "\(manifestDiff(changed, guestManifest(a)))")
        #expect(guestManifest(b) == before[1], "\(manifestDiff(before[1], guestManifest(b)))")
        #expect(try FileManager.default.contentsOfDirectory(atPath: "\(b)/ab") == ["own"])
        // Nothing any guest still reads is collected.
        let gc = hashify(["gc", "--json", "--store", store])
        #expect(gc.status == 0, "\(gc.out) \(gc.err)")
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        #expect(guestManifest(a) == changed && guestManifest(b) == before[1])
        #expect(overlay(["umount", "-q", a, b], store: store).status == 0)
    }
}
