import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("unify --all: guests found from the container managers' configuration")
struct DiscoveryTests {
    @Test(
        "LXC configs in their several forms and nspawn machines: usable guests unified, the rest listed with the reason"
    )
    func findsGuests() throws {
        let s = Scratch("discover")
        let lxc = s.sub("lxc")
        let machines = s.sub("machines")
        let outside = s.sub("outside")
        func container(_ name: String, _ rootfsLine: String, make: Bool = true, index: Int) {
            if make { makeGuest("\(lxc)/\(name)/rootfs", index: index) }
            writeFile("\(lxc)/\(name)/config", "lxc.uts.name = \(name)\n\(rootfsLine)\nlxc.net.0.type = empty\n")
        }
        container("c-dir", "lxc.rootfs.path = dir:\(lxc)/c-dir/rootfs", index: 0)
        container("c-plain", "lxc.rootfs.path=\(lxc)/c-plain/rootfs", index: 1)
        container("c-old", "lxc.rootfs = \(lxc)/c-old/rootfs", index: 2)
        container(
            "c-overlay", "lxc.rootfs.path = overlay:/var/lib/lxc/base/rootfs:\(lxc)/c-overlay/delta", make: false,
            index: 3)
        container("c-lvm", "lxc.rootfs.path = lvm:/dev/vg0/c-lvm", make: false, index: 4)
        container("c-missing", "lxc.rootfs.path = dir:\(lxc)/c-missing/rootfs", make: false, index: 5)
        container("c-relative", "lxc.rootfs.path = dir:relative/rootfs", make: false, index: 6)
        makeGuest(outside, index: 7)
        container("c-symlink", "lxc.rootfs.path = dir:\(lxc)/c-symlink/rootfs", make: false, index: 8)
        mkdirs("\(lxc)/c-symlink")
        symlink(outside, "\(lxc)/c-symlink/rootfs")
        makeGuest("\(machines)/m1", index: 9)
        writeFile("\(machines)/disk.raw", "not a directory")
        settle()
        let outsideBefore = manifest([outside], inodes: true)
        let r = hashify([
            "unify", "--json", "--all", "--lxcpath", lxc, "--machines", machines, "--store", s.sub("store"),
        ])
        #expect(r.status == 0, "\(r.err)")
        let report = jsonReport(r.out)
        let roots = Set((report["guests"] as? [[String: Any]] ?? []).compactMap { $0["root"] as? String })
        #expect(
            roots == Set(["\(lxc)/c-dir/rootfs", "\(lxc)/c-plain/rootfs", "\(lxc)/c-old/rootfs", "\(machines)/m1"]))
        #expect((totals(r.out)["pathsLinked"] as? Int ?? 0) > 0)
        let notes = (report["notes"] as? [String] ?? []).joined(separator: "\n")
        for (name, reason) in [
            ("lxc:c-overlay", "overlay"), ("lxc:c-lvm", "lvm backend"), ("lxc:c-missing", "does not exist"),
            ("lxc:c-relative", "relative"), ("lxc:c-symlink", "symlink"), ("nspawn:disk", "disk image"),
        ] {
            #expect(notes.contains(name) && notes.contains(reason), "\(name): \(reason) in \(notes)")
        }
        #expect(notes.contains("lxc:c-dir is \(lxc)/c-dir/rootfs"))
        #expect(
            manifest([outside], inodes: true) == outsideBefore, "a symlinked rootfs pointing outside is not followed")
    }

    @Test(
        "status, mem and manifest given no guest find them as unify --all does (--lxcpath, the config), and name them"
    )
    func reportsFindGuests() throws {
        let s = Scratch("discoverreport")
        let lxc = s.sub("lxc")
        for (i, name) in ["web1", "web2"].enumerated() {
            makeGuest("\(lxc)/\(name)/rootfs", index: i)
            writeFile(
                "\(lxc)/\(name)/config",
                "lxc.uts.name = \(name)\nlxc.rootfs.path = dir:\(lxc)/\(name)/rootfs\nlxc.net.0.type = empty\n")
        }
        settle()
        #expect(hashify(["unify", "-q", "--all", "--lxcpath", lxc]).status == 0)
        let status = hashify(["status", "--json", "--lxcpath", lxc])
        #expect(status.status == 0, "\(status.err)")
        let guests = (jsonReport(status.out)["guests"] as? [[String: Any]] ?? []).compactMap { $0["guest"] as? String }
        #expect(guests.sorted() == ["lxc:web1", "lxc:web2"], "\(status.out)")
        #expect(status.out.contains("\(lxc)/.hashify"), "the store unify made: \(status.out)")
        let mem = hashify(["mem", "--lxcpath", lxc])
        #expect(mem.status == 0 && mem.out.contains("lxc:web1") && mem.out.contains("lxc:web2"), "\(mem.out)\(mem.err)")
        let manifest = hashify(["manifest", "--lxcpath", lxc, "lxc:web2"])
        #expect(manifest.status == 0 && manifest.out.contains("/usr/share/private-1"), "\(manifest.err)")
        // The config's guests, without --lxcpath.
        let config = s.sub("hashify.toml")
        writeFile(config, "[guests]\nall = true\nlxcpath = [\"\(lxc)\"]\n")
        let byConfig = hashify(["status", "--config", config])
        #expect(byConfig.status == 0 && byConfig.out.contains("lxc:web1"), "\(byConfig.out)\(byConfig.err)")
        // Nothing anywhere: one line, exit 2.
        let none = hashify(["status", "--lxcpath", s.sub("empty")])
        #expect(none.status == 2 && none.err.contains("no guests found"), "\(none.err)")
    }

    @Test("--all with no usable guest: a clear error, nothing changed")
    func nothingUsable() {
        let s = Scratch("discovernone")
        writeFile(s.sub("lxc/c1/config"), "lxc.rootfs.path = zfs:tank/c1\n")
        let r = hashify(["unify", "--all", "--lxcpath", s.sub("lxc"), "--machines", s.sub("none")])
        #expect(r.status == 2 && r.err.contains("no guest") && r.err.contains("zfs backend"), "\(r.err)")
        #expect(hashify(["unify", "--lxcpath", s.sub("lxc"), s.path]).status == 2, "--lxcpath goes with --all")
    }
}

@Suite(
    "contrib: systemd units",
    .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze"), "needs systemd-analyze"))
struct UnitTests {
    @Test("hashify.service and hashify.timer pass systemd-analyze verify; the completions generate")
    func unitsVerify() throws {
        let s = Scratch("units")
        let contrib = packageRoot.appendingPathComponent("contrib/systemd").path
        let service = try String(contentsOfFile: "\(contrib)/hashify.service.in", encoding: .utf8)
        let sbin = (hashifyBinary as NSString).deletingLastPathComponent
        writeFile(s.sub("hashify.service"), service.replacingOccurrences(of: "@SBINDIR@", with: sbin))
        writeFile(s.sub("hashify.timer"), try String(contentsOfFile: "\(contrib)/hashify.timer", encoding: .utf8))
        let r = run([
            "/usr/bin/systemd-analyze", "verify", "--man=no", s.sub("hashify.service"), s.sub("hashify.timer"),
        ])
        #expect(r.status == 0, "\(r.out) \(r.err)")
        #expect(
            service.contains("unify --all --quiet") && service.contains("IOSchedulingClass=idle")
                && service.contains("Nice="))
        for shell in ["bash", "zsh", "fish"] {
            let c = hashify(["--generate-completion-script", shell])
            #expect(c.status == 0 && c.out.contains("overlay") && c.out.contains("clone"), "\(shell) completion")
        }
    }
}
