import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("the operator's routine: unify alone keeps the store collected", .serialized)
struct RoutineTests {
    @Test(
        "after package updates in every guest and killed runs, unify removes the objects no guest links any more: gc finds nothing left"
    )
    func unifyCollects() throws {
        let s = Scratch("routine")
        let store = s.sub("store")
        let guests = (0..<3).map { s.sub("guests/g\($0)") }
        for (i, g) in guests.enumerated() { makeGuest(g, index: i) }
        settle()
        #expect(hashify(["unify", "-q", "--store", store] + guests).status == 0)
        let before = guests.map { manifest([$0]) }
        // An update in every guest: five libraries replaced the way dpkg does (a new file renamed over the old).
        for g in guests {
            for i in 0..<5 {
                let path = "\(g)/usr/lib/lib\(i).so"
                writeFile(path + ".dpkg-new", pseudoRandom(3000 + i, seed: UInt64(900 + i)))
                rename(path + ".dpkg-new", path)
            }
            settleDirectoryTimes(g)
        }
        settle()
        let updated = hashify(["unify", "--json", "--store", store] + guests)
        #expect(updated.status == 0, "\(updated.err)")
        #expect(totals(updated.out)["objectsRemoved"] as? Int == 5, "\(totals(updated.out))")
        let gc = hashify(["gc", "--json", "--store", store])
        #expect(jsonReport(gc.out)["objectsRemoved"] as? Int == 0, "\(gc.out)")
        #expect(guests.map { manifest([$0]) } != before)
        // Killed runs over a fourth guest's first unify: what they made and linked nothing to goes at the next run.
        let late = s.sub("guests/g3")
        makeGuest(late, index: 3)
        for i in 0..<40 { writeFile("\(late)/opt/new\(i)", pseudoRandom(5000, seed: UInt64(2000 + i))) }
        _ = run(["/bin/cp", "-a", "\(late)/opt", "\(guests[0])/opt"])
        settle()
        var window = 0.05
        for _ in 0..<6 {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: hashifyBinary)
            p.arguments = ["unify", "-q", "--store", store] + guests + [late]
            try p.run()
            _ = killAtRandom(p, window: &window, fraction: 0.1...1.0, grow: 1.2)
            p.waitUntilExit()
        }
        let after = hashify(["unify", "--json", "--store", store] + guests + [late])
        #expect(after.status == 0, "\(after.err)")
        let gcAfter = hashify(["gc", "--json", "--store", store])
        #expect(jsonReport(gcAfter.out)["objectsRemoved"] as? Int == 0, "\(gcAfter.out)")
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
    }
}

extension RoutineTests {
    @Test(
        "unify --mode overlay --dry-run predicts the real run: a running guest would be left as it is, the other converted",
        .enabled(if: isRoot, "overlay mounts need root"))
    func overlayDryRunPredictsRefusals() throws {
        let s = Scratch("routinedry")
        let store = s.sub("store")
        let (idle, busy) = (s.sub("guests/idle"), s.sub("guests/busy"))
        makeGuest(idle, index: 0)
        makeGuest(busy, index: 1)
        settle()
        let p = try sleeper(in: busy)
        defer {
            p.terminate()
            p.waitUntilExit()
        }
        let before = [idle, busy].map { manifest([$0]) }
        let dry = hashify(["unify", "--dry-run", "--mode", "overlay", "--store", store, idle, busy])
        #expect(dry.status == 0, "\(dry.err)")
        #expect(dry.out.contains("\(busy) would be left as it is") && dry.out.contains("in use by"), "\(dry.out)")
        #expect(dry.out.contains("\(idle) would be converted"), "\(dry.out)")
        #expect([idle, busy].map { manifest([$0]) } == before)
        let real = hashify(["unify", "--mode", "overlay", "--store", store, idle, busy])
        #expect(real.out.contains("\(busy) left as it is") && real.out.contains("in use by"), "\(real.out)\(real.err)")
        #expect(isOverlayMount(idle))
        #expect(overlay(["umount", "-q", idle], store: store).status == 0)
    }
}
