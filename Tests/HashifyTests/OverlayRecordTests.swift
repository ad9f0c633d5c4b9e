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
