import Foundation
import Testing

/// Adds `root:START:65536` lines to /etc/subuid and /etc/subgid for the
/// duration of `body` (LXC 5 maps a root-owned unprivileged container's ids
/// through newuidmap even when root starts it), then puts both files back
/// as they were (or removes them when there were none).
func withSubordinateIDs<T>(_ starts: [Int], _ body: () throws -> T) rethrows -> T {
    let files = ["/etc/subuid", "/etc/subgid"]
    let saved = files.map { try? Data(contentsOf: URL(fileURLWithPath: $0)) }
    defer {
        for (f, d) in zip(files, saved) {
            if let d { try? d.write(to: URL(fileURLWithPath: f)) } else { unlink(f) }
        }
    }
    for (f, d) in zip(files, saved) {
        var text = d.map { String(decoding: $0, as: UTF8.self) } ?? ""
        if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
        for s in starts { text += "root:\(s):65536\n" }
        try? Data(text.utf8).write(to: URL(fileURLWithPath: f))
    }
    return try body()
}

/// Shifts every owner in the tree at `root` by `base` (the on-disk form of an
/// unprivileged guest), keeping modes (chown clears setuid and setgid).
func shiftOwners(_ root: String, by base: Int) {
    let script = """
        import os, stat, sys
        root, base = sys.argv[1], int(sys.argv[2])
        for d, dirs, files in os.walk(root):
            # Each directory once, when walked; symlinks to directories with the files.
            links = [n for n in dirs if os.path.islink(os.path.join(d, n))]
            for p in [d] + [os.path.join(d, n) for n in files + links]:
                st = os.lstat(p)
                os.lchown(p, st.st_uid + base, st.st_gid + base)
                if not stat.S_ISLNK(st.st_mode):
                    os.chmod(p, stat.S_IMODE(st.st_mode))
        """
    let r = run(["/usr/bin/python3", "-c", script, root, String(base)])
    precondition(r.status == 0, "shifting owners: \(r.err)")
}

/// The owner of `path` on disk (through the mount when mounted).
func owner(_ path: String) -> UInt32 {
    var st = stat()
    return lstat(path, &st) == 0 ? st.st_uid : UInt32.max
}

@Suite(
    "unprivileged LXC containers as overlay guests", .serialized,
    .enabled(
        if: isRoot && FileManager.default.isExecutableFile(atPath: lxcStart)
            && FileManager.default.isExecutableFile(atPath: "/usr/bin/newuidmap"),
        "needs root, LXC and newuidmap (apt-get install lxc uidmap)"))
struct UnprivilegedTests {
    @Test(
        "three root-owned unprivileged containers (two id ranges, files shifted on disk) run on overlay guests through the hook: private writes, data objects shared across ranges, mem attributes them, the fold keeps owners"
    )
    func unprivilegedContainers() throws {
        let s = Scratch("ovuserns")
        let store = s.sub("store")
        let lxcpath = s.sub("lxc")
        let hook = packageRoot.appendingPathComponent("contrib/lxc/hashify-lxc-hook").path
        let names = ["u1", "u2", "u3"]
        let bases = [100_000, 100_000, 200_000]
        let roots = names.map { "\(lxcpath)/\($0)/rootfs" }
        // The container's root must reach its rootfs: the path down to it is world-searchable.
        chmod(s.path, 0o755)
        for (i, name) in names.enumerated() {
            writeFile("\(roots[i])/usr/lib/shared.so", pseudoRandom(8000, seed: 77))
            makeLXCContainer(
                lxcpath: lxcpath, name: name,
                initScript: "echo \(name) > /tmp/mine; echo \"\(name) was here\" > /usr/lib/shared.so",
                extraConfig: """
                    lxc.idmap = u 0 \(bases[i]) 65536
                    lxc.idmap = g 0 \(bases[i]) 65536
                    lxc.hook.pre-start = \(hook) \(store)
                    lxc.hook.post-stop = \(hook) \(store)

                    """)
            shiftOwners(roots[i], by: bases[i])
        }
        settle()
        let before = roots.map(guestManifest)
        #expect(overlay(["convert", "-q", "--no-mount"] + roots, store: store).status == 0)
        // The same content in two id ranges is one data object.
        let redirects = roots.map { r in stubRedirects(store: store, path: "bin/sh", root: r).joined() }
        #expect(
            redirects[0].count >= 16 && Set(redirects).count == 1, "one object for /bin/sh in both ranges: \(redirects)"
        )

        withSubordinateIDs([100_000, 200_000]) {
            defer { for n in names { lxcTool(lxcpath, "lxc-stop", ["-n", n, "-k"]) } }
            startContainers(names, lxcpath: lxcpath, logs: s)
            let expected = names.map { "\($0) was here\n" }
            #expect(sharedFileContents(roots, becoming: expected) == expected, "each container sees its own write")
            // What the container's root wrote is owned by its range's root on disk.
            for (i, r) in roots.enumerated() { #expect(owner("\(r)/tmp/mine") == UInt32(bases[i])) }
            // hashify mem finds each container's processes in its guest.
            let mem = memReport(["--store", store] + roots)
            for r in roots {
                #expect((guestFigures(mem, r)["processes"] as? Int ?? 0) >= 1, "container processes of \(r): \(mem)")
            }
            #expect(sum(mem, roots, "sharedBytes") > 0)
            for n in names { #expect(lxcTool(lxcpath, "lxc-stop", ["-n", n, "-k"]).status == 0) }
        }
        for r in roots { #expect(!isOverlayMount(r), "the post-stop hook unmounted \(r)") }
        #expect(overlay(["fold", "-q"] + roots, store: store).status == 0)
        #expect(overlay(["mount", "-q"] + roots, store: store).status == 0)
        for (i, r) in roots.enumerated() {
            #expect(owner("\(r)/bin/sh") == UInt32(bases[i]), "the fold keeps the shifted owners")
            #expect(owner("\(r)/tmp/mine") == UInt32(bases[i]))
            #expect(
                (try? String(contentsOfFile: "\(r)/usr/lib/shared.so", encoding: .utf8)) == "\(names[i]) was here\n")
        }
        // Everything the containers did not write is as it was.
        #expect(overlay(["export", "-q", roots[2]], store: store).status == 0)
        let written: (Substring) -> Bool = { $0.hasPrefix("usr/lib/shared.so ") || $0.hasPrefix("tmp") }
        let exported = guestManifest(roots[2]).split(separator: "\n").filter { !written($0) }
        let plain = before[2].split(separator: "\n").filter { !written($0) }
        #expect(exported == plain, "\(manifestDiff(plain.joined(separator: "\n"), exported.joined(separator: "\n")))")
        #expect(overlay(["umount", "-q", roots[0], roots[1]], store: store).status == 0)
    }
}
