import Foundation
import Testing

/// A btrfs filesystem on a loop image of `size` in the scratch directory,
/// mounted at `mountPoint` (the scratch directory's removal unmounts it;
/// `-o loop` detaches the loop device then).
func mountBtrfsImage(_ s: Scratch, name: String, size: String) -> String? {
    let image = s.sub("\(name).img")
    let mnt = s.sub(name)
    mkdirs(mnt)
    guard run(["/usr/bin/truncate", "-s", size, image]).status == 0,
        run(["/sbin/mkfs.btrfs", "-q", image]).status == 0,
        run(["/bin/mount", "-o", "loop", image, mnt]).status == 0
    else { return nil }
    return mnt
}

/// Bytes the btrfs filesystem at `mnt` uses for data, after its deleted subvolumes are cleaned.
func btrfsDataUsed(_ mnt: String) -> Int {
    _ = run(["/bin/sync"])
    _ = run(["/usr/bin/btrfs", "subvolume", "sync", mnt])
    _ = run(["/usr/bin/btrfs", "filesystem", "sync", mnt])
    let out = run(["/usr/bin/btrfs", "filesystem", "usage", "-b", mnt]).out
    // "Data,single: Size:N, Used:N (..%)"
    guard let line = out.split(separator: "\n").first(where: { $0.hasPrefix("Data,") }),
        let used = line.range(of: "Used:")
    else { return -1 }
    return Int(line[used.upperBound...].prefix { $0.isNumber }) ?? -1
}

let hasBtrfs = FileManager.default.isExecutableFile(atPath: "/sbin/mkfs.btrfs")

@Suite(
    "overlay guests in btrfs subvolumes", .serialized,
    .enabled(
        if: isRoot && hasBtrfs && FileManager.default.isExecutableFile(atPath: lxcStart),
        "needs root, btrfs-progs and LXC (apt-get install btrfs-progs lxc)"))
struct BtrfsOverlayTests {
    @Test(
        "LXC btrfs-backend guests (a subvolume each) join overlay mode: discovered, objects reflinked, started through the hook, copy-on-write, fold; one copy on disk and in the page cache"
    )
    func subvolumeGuests() throws {
        let s = Scratch("btrfs")
        guard let mnt = mountBtrfsImage(s, name: "fs", size: "1500M") else {
            Issue.record("cannot make a btrfs loop image")
            return
        }
        let lxcpath = "\(mnt)/lxc"
        let store = "\(mnt)/store"
        let hook = packageRoot.appendingPathComponent("contrib/lxc/hashify-lxc-hook").path
        let names = ["c1", "c2", "c3"]
        let roots = names.map { "\(lxcpath)/\($0)/rootfs" }
        for (i, (name, root)) in zip(names, roots).enumerated() {
            mkdirs("\(lxcpath)/\(name)")
            #expect(run(["/usr/bin/btrfs", "subvolume", "create", root]).status == 0)
            try makeRichGuest(root, index: i)
            installProgram("/usr/bin/perl", into: root)
            writeFile("\(root)/usr/lib/shared.so", pseudoRandom(8000, seed: 77))
            makeLXCContainer(
                lxcpath: lxcpath, name: name, initScript: "echo \"\(name) was here\" > /usr/lib/shared.so",
                extraConfig: "lxc.hook.pre-start = \(hook) \(store)\nlxc.hook.post-stop = \(hook) \(store)\n",
                backend: "btrfs")
        }
        settle()
        let before = roots.map(guestManifest)
        let plainUsed = btrfsDataUsed(mnt)
        let plainProcs = try startPerl(in: roots)
        let plainPss = filePss(plainProcs.map(\.processIdentifier))
        stop(plainProcs)

        // Discovery: hardlink mode says why it cannot use them; overlay mode takes them.
        let dry = hashify(["unify", "--all", "--lxcpath", lxcpath, "--store", store, "-n", "--json"])
        #expect(dry.status != 0, "no guest hardlink mode can use")
        #expect(dry.err.contains("a btrfs subvolume: hard links cannot cross subvolumes"), "\(dry.out) \(dry.err)")
        let unify = hashify(["unify", "--all", "--mode", "overlay", "--lxcpath", lxcpath, "--store", store, "--json"])
        #expect(unify.status == 0, "\(unify.err)")
        let converted = (jsonReport(unify.out)["overlayGuests"] as? [[String: Any]] ?? []).compactMap {
            $0["action"] as? String
        }
        #expect(converted.count == 3 && converted.allSatisfy { $0.hasPrefix("converted") }, "\(unify.out)")
        for r in roots where !isOverlayMount(r) { #expect(overlay(["mount", "-q", r], store: store).status == 0) }
        for (i, r) in roots.enumerated() { #expect(guestManifest(r) == before[i], "through the mount: \(r)") }
        // The objects are reflinks: the guests' plain subvolumes are gone, their extents live on once.
        #expect(overlay(["umount", "-q"] + roots, store: store).status == 0)
        let overlayUsed = btrfsDataUsed(mnt)
        print("btrfs data used: 3 plain subvolumes \(plainUsed) bytes, overlay guests \(overlayUsed) bytes")
        #expect(plainUsed > 0 && overlayUsed > 0 && Double(overlayUsed) < 0.5 * Double(plainUsed))

        // Real containers through the hook: each write stays in its container.
        let objects = manifest(["\(store)/data"])
        defer { for n in names { lxcTool(lxcpath, "lxc-stop", ["-n", n, "-k"]) } }
        startContainers(names, lxcpath: lxcpath, logs: s)
        let expected = names.map { "\($0) was here\n" }
        #expect(sharedFileContents(roots, becoming: expected) == expected, "each container sees its own write")
        #expect(manifest(["\(store)/data"]) == objects, "no shared object changed")
        for n in names { #expect(lxcTool(lxcpath, "lxc-stop", ["-n", n, "-k"]).status == 0) }
        for r in roots { #expect(!isOverlayMount(r), "the post-stop hook unmounted \(r)") }

        // The fold keeps the writes; then one perl per guest maps one copy.
        #expect(overlay(["fold", "-q"] + roots, store: store).status == 0)
        #expect(overlay(["mount", "-q"] + roots, store: store).status == 0)
        let after = roots.map { (try? String(contentsOfFile: "\($0)/usr/lib/shared.so", encoding: .utf8)) ?? "" }
        #expect(after == expected, "the fold keeps each write private")
        let procs = try startPerl(in: roots)
        let overlayPss = filePss(procs.map(\.processIdentifier))
        stop(procs)
        print(
            "file-backed Pss of three perl processes: plain subvolumes \(plainPss) kB, overlay guests \(overlayPss) kB")
        #expect(plainPss > 0 && overlayPss > 0 && Double(overlayPss) < 0.6 * Double(plainPss))
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)
        #expect(overlay(["umount", "-q"] + roots, store: store).status == 0)
    }

    @Test("a subvolume guest on another btrfs filesystem than the store is refused in one line, nothing changed")
    func otherFilesystem() throws {
        let s = Scratch("btrfs2")
        guard let one = mountBtrfsImage(s, name: "one", size: "300M"),
            let two = mountBtrfsImage(s, name: "two", size: "300M")
        else {
            Issue.record("cannot make btrfs loop images")
            return
        }
        let guest = "\(two)/rootfs"
        #expect(run(["/usr/bin/btrfs", "subvolume", "create", guest]).status == 0)
        makeGuest(guest, index: 0)
        settle()
        let before = guestManifest(guest)
        let r = overlay(["convert", "-q", guest], store: "\(one)/store")
        #expect(r.status != 0)
        #expect(r.err.contains("on another btrfs filesystem than the store"), "\(r.err)")
        #expect(r.err.split(separator: "\n").count == 1, "\(r.err)")
        #expect(!isOverlayMount(guest))
        #expect(guestManifest(guest) == before)
    }
}
