import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Which store a guest belongs to, against a guest's root and a careless admin: what no guest
/// can write decides it, and what cannot be read is refused, never acted on.
@Suite("one store per guest, against a guest's root and damaged lists", .serialized)
struct StoreOwnershipTests {
    @Test(
        "a plain guest's root that marks itself as an overlay guest of a store inside it is unified as the plain guest it is; no store is made in a guest"
    )
    func forgedMarkIgnored() throws {
        let s = Scratch("ownforged")
        let guests = (1...3).map { s.sub("m/g\($0)/rootfs") }
        for (i, g) in guests.enumerated() { makeGuest(g, index: i) }
        settle()
        // g2's root makes a directory and names it as its store, as a privileged guest's root can.
        mkdirs("\(guests[1])/st")
        #expect(
            run(["/usr/bin/setfattr", "-n", "trusted.hashify.store", "-v", "\(guests[1])/st", guests[1]]).status == 0)
        settle()
        let before = guests.map { manifest([$0]) }
        let r = hashify(["unify", "--json"] + guests)
        #expect(r.status == 0, "\(r.err)")
        #expect(jsonReport(r.out)["store"] as? String == s.sub("m/.hashify"), "\(r.out)")
        #expect(!FileManager.default.fileExists(atPath: "\(guests[1])/st/objects"), "no store inside a guest")
        #expect((jsonReport(r.out)["guests"] as? [[String: Any]] ?? []).count == 3, "g2 is unified as a plain guest")
        #expect(guests.map { manifest([$0]) } == before)
        let status = hashify(["status", "--json"] + guests)
        #expect(status.status == 0, "\(status.err)")
    }

    @Test("two stores that both name a guest: every command refuses in one line naming both")
    func guestOfTwoStores() throws {
        let s = Scratch("owntwo")
        let g = s.sub("lxc/g1/rootfs")
        makeGuest(g, index: 0)
        makeGuest(s.sub("lxc/g2/rootfs"), index: 1)
        settle()
        let (a, b) = (s.sub("lxc/.hashify"), s.sub("other"))
        #expect(hashify(["unify", "-q", "--store", a, g, s.sub("lxc/g2/rootfs")]).status == 0)
        // A second store that names the guest too (a careless edit, or two runs at once).
        #expect(hashify(["unify", "-q", "--store", b, s.sub("lxc/g2/rootfs")]).status == 2)
        try FileManager.default.createDirectory(atPath: b, withIntermediateDirectories: true)
        _ = hashify(["split", "-q", "--store", a, "--root", s.sub("lxc/g2/rootfs")])
        #expect(hashify(["unify", "-q", "--store", b, s.sub("lxc/g2/rootfs")]).status == 0)
        let list = try String(contentsOfFile: "\(b)/guests", encoding: .utf8)
        try (list + g + "\0").write(toFile: "\(b)/guests", atomically: false, encoding: .utf8)
        let before = manifest([g])
        for args in [["unify", g], ["unify", "--store", a, g], ["status", g], ["manifest", g]] {
            let r = hashify(args)
            #expect(r.status == 2, "\(args): \(r.out)")
            #expect(r.err.contains("\(g): a guest of two stores, \(a) and \(b)"), "\(args): \(r.err)")
        }
        #expect(manifest([g]) == before)
    }

    @Test("a damaged list of stores or of a store's guests is reported and left as it is, never rewritten or acted on")
    func damagedListsRefused() throws {
        let s = Scratch("owndamaged")
        let state = s.sub("state")
        let storesList = "\(state)/stores"
        let g = s.sub("srv/g1/rootfs")
        makeGuest(g, index: 0)
        settle()
        let elsewhere = s.sub("stores/one")
        try FileManager.default.createDirectory(atPath: s.sub("stores"), withIntermediateDirectories: true)
        #expect(hashify(state: state, ["unify", "-q", "--store", elsewhere, g]).status == 0)
        // The host's list damaged: the guest's store cannot be told, so no second store is made for it.
        let saved = try Data(contentsOf: URL(fileURLWithPath: storesList))
        let junk = Data(pseudoRandom(5000, seed: 5))
        try junk.write(to: URL(fileURLWithPath: storesList))
        let r = hashify(state: state, ["unify", g])
        #expect(r.status == 2, "\(r.out)")
        #expect(r.err.contains("\(storesList): the host's list of stores cannot be read"), "\(r.err)")
        #expect(!FileManager.default.fileExists(atPath: s.sub("srv/g1/.hashify")), "no second store")
        #expect(try Data(contentsOf: URL(fileURLWithPath: storesList)) == junk, "left as it is")
        try saved.write(to: URL(fileURLWithPath: storesList))
        // The store's own list of guests damaged (a FIFO): the same.
        let guestsFile = "\(elsewhere)/guests"
        let list = try Data(contentsOf: URL(fileURLWithPath: guestsFile))
        unlink(guestsFile)
        mkfifo(guestsFile, 0o600)
        let r2 = hashify(state: state, ["unify", g])
        #expect(r2.status == 2 && r2.err.contains("the store's list of guests cannot be read"), "\(r2.err)")
        #expect(!FileManager.default.fileExists(atPath: s.sub("srv/g1/.hashify")), "no second store")
        unlink(guestsFile)
        try list.write(to: URL(fileURLWithPath: guestsFile))
        let r3 = hashify(state: state, ["unify", "--json", g])
        #expect(r3.status == 0 && jsonReport(r3.out)["store"] as? String == elsewhere, "\(r3.out)\(r3.err)")
    }

    @Test("clone, manifest and mem given another store for a guest refuse in one line, making nothing")
    func otherStoreRefused() throws {
        let s = Scratch("ownclone")
        let guests = (1...2).map { s.sub("lxc/g\($0)/rootfs") }
        for (i, g) in guests.enumerated() { makeGuest(g, index: i) }
        settle()
        #expect(hashify(["unify", "-q"] + guests).status == 0)
        let other = s.sub("other")
        for args in [
            ["clone", "--store", other, guests[0], s.sub("lxc/c1")], ["manifest", "--store", other, guests[0]],
            ["mem", "--store", other, guests[0]],
        ] {
            let r = hashify(args)
            #expect(r.status == 2, "\(args): \(r.out)")
            #expect(r.err.contains("a guest of the store \(s.sub("lxc/.hashify"))"), "\(args): \(r.err)")
        }
        #expect(!FileManager.default.fileExists(atPath: s.sub("lxc/c1")), "no clone made")
    }

    @Test("gc names an unused object it could not remove and exits 1; bad input names the path and exits 2")
    func reportsWhatFailed() throws {
        let s = Scratch("owngc")
        let guests = (1...2).map { s.sub("g\($0)") }
        for (i, g) in guests.enumerated() { makeGuest(g, index: i) }
        settle()
        let store = s.sub(".hashify")
        #expect(hashify(["unify", "-q", "--store", store] + guests).status == 0)
        // A library removed from both guests: its object is unused; the admin made it immutable.
        for g in guests { unlink("\(g)/usr/lib/lib3.so") }
        let objects = run(["/usr/bin/find", "\(store)/objects", "-type", "f", "-links", "1"]).out.split(separator: "\n")
        try #require(objects.count == 1, "\(objects)")
        let object = String(objects[0])
        #expect(run(["/usr/bin/chattr", "+i", object]).status == 0)
        defer { _ = run(["/usr/bin/chattr", "-i", object]) }
        let gc = hashify(["gc", "--json", "--store", store])
        #expect(gc.status == 1, "\(gc.out)")
        #expect(jsonReport(gc.out)["objectsRemoved"] as? Int == 0)
        #expect(
            (jsonReport(gc.out)["notRemoved"] as? [String] ?? []).first?.contains("not permitted") == true, "\(gc.out)")
        #expect(FileManager.default.fileExists(atPath: object))
        let missing = hashify(["status", s.sub("nonexistent")])
        #expect(
            missing.status == 2 && missing.err.contains("\(s.sub("nonexistent")): no such directory"), "\(missing.err)")
        let notDir = hashify(["verify", "--repair", "--store", "/dev/null"])
        #expect(notDir.status == 2 && notDir.err.contains("/dev/null: not a directory"), "\(notDir.err)")
    }
}
