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
            kill(p.processIdentifier, SIGKILL)
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

extension RoutineTests {
    @Test(
        "the LXC hook says what it did and what failed, with the container's name: an unmount a shell inside prevents, the unfolded start it causes",
        .enabled(if: isRoot, "overlay mounts need root"))
    func hookSaysWhatFailed() throws {
        let s = Scratch("routinehook")
        let store = s.sub("store")
        let root = s.sub("lxc/web9/rootfs")
        makeGuest(root, index: 0)
        settle()
        #expect(overlay(["convert", "-q", root], store: store).status == 0)
        writeFile(s.sub("lxc/web9/config"), "lxc.uts.name = web9\nlxc.rootfs.path = dir:\(root)\n")
        let hook = packageRoot.appendingPathComponent("contrib/lxc/hashify-lxc-hook").path
        func runHook(_ type: String) -> (status: Int32, out: String, err: String) {
            run([
                "/usr/bin/env", "HASHIFY=\(hashifyBinary)", "LXC_ROOTFS_PATH=dir:\(root)", "LXC_NAME=web9",
                "LXC_HOOK_TYPE=\(type)", hook, store, "web9", "lxc", type,
            ])
        }
        writeFile("\(root)/usr/lib/new", pseudoRandom(9000, seed: 1200))
        // A shell left inside the rootfs: post-stop cannot unmount, and says so.
        let p = try sleeper(in: "\(root)/usr")
        let stop = runHook("post-stop")
        #expect(stop.status == 1, "\(stop.err)")
        #expect(stop.err.contains("lxc:web9: could not unmount") && stop.err.contains("in use by"), "\(stop.err)")
        #expect(isOverlayMount(root))
        // The next start runs on the mounted generation, unfolded, and says that too.
        let start = runHook("pre-start")
        #expect(start.status == 0, "\(start.err)")
        #expect(start.err.contains("lxc:web9: mounted: fold at next start"), "\(start.err)")
        // Stopped (no process has its root there; the shell's cwd still holds it), still mounted,
        // copy-ups to fold: status says so.
        let status = hashify(["status", "--store", store, root])
        #expect(
            status.out.contains("\(root): its container is stopped but its overlay is still mounted"), "\(status.out)")
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        #expect(runHook("post-stop").status == 0)
        let again = runHook("pre-start")
        #expect(again.status == 0 && again.err.contains("lxc:web9: folded"), "\(again.err)")
        #expect(FileManager.default.contents(atPath: "\(root)/usr/lib/new") == Data(pseudoRandom(9000, seed: 1200)))
        #expect(runHook("post-stop").status == 0)
        #expect(!isOverlayMount(root))
    }
}

extension RoutineTests {
    @Test(
        "an overlay guest carries its store: every command finds it from the guest, and one given another store refuses in one line",
        .enabled(if: isRoot, "overlay mounts need root"))
    func overlayGuestCarriesItsStore() throws {
        let s = Scratch("routinestore")
        let (plain, ov) = (s.sub("lxc/a/rootfs"), s.sub("lxc/b/rootfs"))
        makeGuest(plain, index: 0)
        makeGuest(ov, index: 1)
        settle()
        // The two stores the README once named: hardlink guests' (above them), overlay guests' (elsewhere).
        let hardlinkStore = s.sub("lxc/.hashify")
        let overlayStore = s.sub("var-lib-hashify")
        #expect(hashify(["unify", "-q", "--store", hardlinkStore, plain]).status == 0)
        #expect(overlay(["convert", "-q", ov], store: overlayStore).status == 0)
        let before = [plain, ov].map(guestManifest)
        // Without --store: the plain guest unified with its store, the overlay guest folded in its own.
        let both = hashify(["unify", "--json", plain, ov])
        #expect(both.status == 0, "\(both.out) \(both.err)")
        #expect(jsonReport(both.out)["store"] as? String == hardlinkStore, "\(both.out)")
        #expect(firstGuestReport(both.out)["action"] as? String == "mounted: fold at next start", "\(both.out)")
        #expect(hashify(["status", ov]).status == 0)
        let manifest = hashify(["manifest", ov])
        #expect(manifest.status == 0 && manifest.out.contains("overlay"), "\(manifest.out.prefix(300)) \(manifest.err)")
        // Given the other store: one line naming the guest and its store, nothing changed.
        for args in [
            ["unify", "--store", hardlinkStore, plain, ov], ["status", "--store", hardlinkStore, ov],
            ["manifest", "--store", hardlinkStore, ov], ["overlay", "fold", "--store", hardlinkStore, ov],
        ] {
            let r = hashify(args)
            #expect(r.status == 2, "\(args): \(r.out) \(r.err)")
            #expect(r.err.contains("\(ov): an overlay guest of the store \(overlayStore)"), "\(args): \(r.err)")
        }
        #expect([plain, ov].map(guestManifest) == before)
        // Unmounted, a guest converted by an earlier version learns its store at its next mount.
        #expect(overlay(["umount", "-q", ov], store: overlayStore).status == 0)
        _ = run(["/usr/bin/setfattr", "-x", "trusted.hashify.store", ov])
        #expect(overlay(["mount", "-q", ov], store: overlayStore).status == 0)
        #expect(overlay(["umount", "-q", ov], store: overlayStore).status == 0)
        let fold = hashify(["overlay", "fold", "--json", ov])
        #expect(fold.status == 0, "found from the mark alone: \(fold.err)")
        #expect(overlay(["mount", "-q", ov], store: overlayStore).status == 0)
        #expect(guestManifest(ov) == before[1])
        #expect(overlay(["umount", "-q", ov], store: overlayStore).status == 0)
    }
}

extension RoutineTests {
    @Test(
        "a conversion that fails on the system (no space) names the guest and says it is left as it was; it leaves no object",
        .enabled(if: isRoot, "overlay mounts need root"))
    func failedConversionNamesGuest() throws {
        let s = Scratch("routinenospace")
        let store = s.sub("store")
        let g = s.sub("guests/g")
        makeGuest(g, index: 0)
        settle()
        let before = guestManifest(g)
        let r = hashifyFailing("linkat", "error=ENOSPC:when=3", ["overlay", "convert", "--store", store, g])
        #expect(r.status != 0, "\(r.out)")
        #expect(r.err.contains("\(g): conversion failed (the guest is left as it was"), "\(r.err)")
        #expect(r.err.contains("No space left on device"), "\(r.err)")
        #expect(!isOverlayMount(g))
        #expect(guestManifest(g) == before)
        #expect(dataObjectNames(store).isEmpty, "\(dataObjectNames(store))")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: "\(store)/reserved")) ?? []).isEmpty)
    }
}

extension RoutineTests {
    @Test(
        "plain guests unified with one store refuse a second --store in one line; split whole out of it, they may move")
    func plainGuestsKeepTheirStore() throws {
        let s = Scratch("routinetwostores")
        let guests = (0..<2).map { s.sub("lxc/g\($0)/rootfs") }
        for (i, g) in guests.enumerated() { makeGuest(g, index: i) }
        settle()
        let first = s.sub("lxc/.hashify")
        let second = s.sub("other-store")
        #expect(hashify(["unify", "-q", "--store", first] + guests).status == 0)
        let before = guests.map { manifest([$0], inodes: true) }
        let again = hashify(["unify", "--store", second] + guests)
        #expect(again.status == 2, "\(again.out) \(again.err)")
        #expect(again.err.contains("\(guests[0]): a guest of the store \(first)"), "\(again.err)")
        #expect(guests.map { manifest([$0], inodes: true) } == before, "nothing changed")
        #expect(!FileManager.default.fileExists(atPath: second), "no store made")
        // Split whole out of the first store, a guest may go to another.
        for g in guests { #expect(hashify(["split", "-q", "--store", first, "--root", g]).status == 0) }
        let moved = hashify(["unify", "--json", "--store", second] + guests)
        #expect(moved.status == 0, "\(moved.err)")
        #expect((totals(moved.out)["pathsLinked"] as? Int ?? 0) > 0)
        // A store that is not above them is found too (the host's list of stores, checked against the store's
        // own list of guests): a third store is refused, and status finds theirs without --store.
        let third = s.sub("third-store")
        let refused = hashify(["unify", "--store", third] + guests)
        #expect(refused.status == 2, "\(refused.out) \(refused.err)")
        #expect(refused.err.contains("\(guests[0]): a guest of the store \(second)"), "\(refused.err)")
        let status = hashify(["status", "--json"] + guests)
        #expect(status.status == 0, "\(status.err)")
        #expect(jsonReport(status.out)["store"] as? String == second, "\(status.out)")
    }
}

extension RoutineTests {
    @Test(
        "a reinstall in every guest (identical copies) keeps one object of that identity: no second generation piles up"
    )
    func reinstallKeepsOneObject() throws {
        let s = Scratch("routinereinstall")
        let store = s.sub("store")
        let guests = (0..<3).map { s.sub("guests/g\($0)") }
        for (i, g) in guests.enumerated() { makeGuest(g, index: i) }
        settle()
        #expect(hashify(["unify", "-q", "--store", store] + guests).status == 0)
        func objectNames() -> [String] {
            run(["/usr/bin/find", "\(store)/objects", "-type", "f", "-printf", "%f\\n"]).out.split(separator: "\n").map(
                String.init
            ).sorted()
        }
        let names = objectNames()
        for round in 0..<3 {
            // Every guest reinstalls its package: each file an identical new copy, renamed over the old.
            for g in guests {
                for f in ["usr/bin/tool", "usr/lib/lib5.so"] {
                    _ = run(["/bin/cp", "-p", "\(g)/\(f)", "\(g)/\(f).dpkg-new"])
                    rename("\(g)/\(f).dpkg-new", "\(g)/\(f)")
                }
                settleDirectoryTimes(g)
            }
            settle()
            let r = hashify(["unify", "--json", "--store", store] + guests)
            #expect(r.status == 0, "\(r.err)")
            #expect(objectNames() == names, "round \(round): \(objectNames().filter { !names.contains($0) })")
        }
        #expect(jsonReport(hashify(["gc", "--json", "--store", store]).out)["objectsRemoved"] as? Int == 0)
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
    }
}

extension RoutineTests {
    @Test(
        "an overlay guest exported in place leaves no record behind: the next fold still removes the objects only it named",
        .enabled(if: isRoot, "overlay mounts need root"))
    func exportLeavesNoRecord() throws {
        let s = Scratch("routineexport")
        let store = s.sub("store")
        let (a, b) = (s.sub("guests/a"), s.sub("guests/b"))
        for (i, g) in [a, b].enumerated() { makeGuest(g, index: i) }
        writeFile("\(a)/opt/only-a", pseudoRandom(30_000, seed: 1300))
        settle()
        #expect(overlay(["convert", "-q", a, b], store: store).status == 0)
        #expect(overlay(["export", "-q", b], store: store).status == 0)
        let records = (try? FileManager.default.contentsOfDirectory(atPath: "\(store)/overlay")) ?? []
        #expect(records.count == 1, "b's record went with its export: \(records)")
        unlink("\(a)/opt/only-a")
        #expect(overlay(["umount", "-q", a], store: store).status == 0)
        let fold = overlay(["fold", "--json", a], store: store)
        #expect(firstGuestReport(fold.out)["objectsRemoved"] as? Int == 1, "\(fold.out)")
        #expect(hashify(["gc", "--json", "--store", store]).out.contains("\"dataObjectsRemoved\" : 0"))
    }
}
