import Foundation
import HashifyEngine
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Two LXC containers (written configs) and a chroot that only the config names.
private func makeHost(_ s: Scratch) -> (lxc: String, roots: [String]) {
    let lxc = s.sub("lxc")
    for (i, name) in ["c1", "c2"].enumerated() {
        makeGuest("\(lxc)/\(name)/rootfs", index: i)
        writeFile("\(lxc)/\(name)/config", "lxc.uts.name = \(name)\nlxc.rootfs.path = dir:\(lxc)/\(name)/rootfs\n")
    }
    makeGuest(s.sub("srv/build"), index: 2)
    settle()
    return (lxc, ["\(lxc)/c1/rootfs", "\(lxc)/c2/rootfs", s.sub("srv/build")])
}

@Suite("the config file")
struct ConfigTests {
    @Test(
        "hashify.toml names the store, the guest sources, excludes globally and per guest and the threads; unify without arguments runs it, naming each guest"
    )
    func configuredRun() throws {
        let s = Scratch("config")
        let (lxc, roots) = makeHost(s)
        let config = s.sub("hashify.toml")
        writeFile(
            config,
            """
            # the host's settings
            store = "\(s.sub("store"))"
            threads = 2
            min-size = 1
            exclude = ["/usr/lib/lib3.so"]

            [guests]
            all = true
            lxcpath = ["\(lxc)"]
            machines = "\(s.sub("no-machines"))"
            incus-pools = []

            [guest.c2]
            exclude = ["/usr/lib/lib5.so"]

            [guest.build]
            root = "\(roots[2])"
            include = ["/usr/share/private-*"]
            """)
        let r = hashify(["unify", "--json", "--config", config])
        #expect(r.status == 0, "\(r.err)")
        let guests = jsonReport(r.out)["guests"] as? [[String: Any]] ?? []
        let named = Dictionary(
            uniqueKeysWithValues: guests.compactMap { g in
                (g["guest"] as? String).map { ($0, g["root"] as? String ?? "") }
            })
        #expect(named == ["lxc:c1": roots[0], "lxc:c2": roots[1], "build": roots[2]], "\(guests)")
        // The global exclude holds everywhere, c2's own only in c2.
        for root in roots { #expect(linkCount("\(root)/usr/lib/lib3.so") == 1) }
        #expect(linkCount("\(roots[1])/usr/lib/lib5.so") == 1)
        #expect(inode("\(roots[0])/usr/lib/lib5.so") == inode("\(roots[2])/usr/lib/lib5.so"))
        #expect(inode("\(roots[0])/usr/lib/lib6.so") == inode("\(roots[1])/usr/lib/lib6.so"))
        #expect(FileManager.default.fileExists(atPath: s.sub("store")))

        // People see names, not paths; status reads the same config.
        writeFile("\(roots[0])/usr/lib/extra.so", pseudoRandom(3000, seed: 77))
        writeFile("\(roots[1])/usr/lib/extra.so", pseudoRandom(3000, seed: 77))
        settleDirectoryTimes(roots[0])
        settleDirectoryTimes(roots[1])
        settle()
        let human = hashify(["unify", "--config", config, "--dry-run"])
        #expect(human.status == 0, "\(human.err)")
        for name in ["lxc:c1", "lxc:c2", "build"] { #expect(human.out.contains("\n" + name + " "), "\(human.out)") }
        let status = hashify(["status", "--config", config])
        #expect(
            status.status == 0 && status.out.contains("lxc:c2") && status.out.contains("re-run    would link 2 paths"),
            "\(status.out)\(status.err)")

        // The command line overrides: given roots replace the config's guests, --store its store.
        let one = hashify(["unify", "--json", "--config", config, roots[0], roots[1]])
        #expect(one.status == 0, "\(one.err)")
        #expect((jsonReport(one.out)["guests"] as? [[String: Any]] ?? []).count == 2)
        #expect(inode("\(roots[0])/usr/lib/extra.so") == inode("\(roots[1])/usr/lib/extra.so"))
    }

    @Test("bad config files: the file, the line and what is wrong, exit 2, nothing changed")
    func badConfigs() throws {
        let s = Scratch("badconfig")
        let (_, roots) = makeHost(s)
        let before = manifest(roots, inodes: true)
        let cases: [(String, String)] = [
            ("store = \"\(s.sub("store"))\"\nthreads = \"four\"\n", ":2: threads: must be an integer, not a string"),
            ("store = \"relative/store\"\n", ":1: store: must be an absolute path"),
            ("mode = \"reflink\"\n", ":1: mode: must be \"hardlink\" or \"overlay\""),
            ("threads = 0\n", ":1: threads: must be from 1 to 256"),
            ("min-size = 0\n", ":1: min-size: must be at least 1"),
            ("\n[guests]\nall = true\nlxcpth = [\"/var/lib/lxc\"]\n", ":4: guests.lxcpth: unknown key"),
            (
                "[guest.web1]\nexclude = [1, 2]\n",
                ":2: guest.web1.exclude: must be an array of strings, but holds an integer"
            ),
            ("[guest.web1]\nroot = \"srv/web1\"\n", ":2: guest.web1.root: must be an absolute path"),
            ("exclude = \"/var/cache\"\n", ":1: exclude: must be an array of strings, not a string"),
            ("trust-guest-roots = \"yes\"\n", ":1: trust-guest-roots: must be true or false, not a string"),
            ("[guest.web1]\ntrust-root = 1\n", ":2: guest.web1.trust-root: must be true or false, not an integer"),
            ("[guests]\ntrust-guest-roots = true\n", ":2: guests.trust-guest-roots: unknown key"),
            ("store = \"/unterminated\n", ":1: "),
            ("[guests\nall = true\n", ":1: "),
            ("threads = 2\nthreads = 3\n", ":2: "),
        ]
        for (i, (text, expected)) in cases.enumerated() {
            let file = s.sub("bad\(i).toml")
            writeFile(file, text)
            let r = hashify(["unify", "--config", file, "--store", s.sub("store")] + roots)
            #expect(r.status == 2, "case \(i): \(r.out)")
            #expect(
                r.err.hasPrefix("hashify: \(file)\(expected)") && r.err.split(separator: "\n").count == 1,
                "case \(i): \(r.err)")
        }
        let missing = hashify(["unify", "--config", s.sub("none.toml")] + roots)
        #expect(missing.status == 2 && missing.err.contains("none.toml: No such file"), "\(missing.err)")
        let noGuestsFile = s.sub("noguests.toml")
        writeFile(noGuestsFile, "# guests not configured\nthreads = 2\n")
        let noGuests = hashify(["unify", "--config", noGuestsFile])
        #expect(noGuests.status == 2 && noGuests.err.contains("names no guests"), "\(noGuests.err)")
        // A file that sets nothing is no config at all (the Debian package's /etc/hashify/hashify.toml).
        let empty = s.sub("empty.toml")
        writeFile(empty, "# nothing configured\n#threads = 2\n")
        let asNone = hashify(["unify", "--config", empty])
        #expect(
            asNone.status == 2 && asNone.err == "hashify: give at least one guest root, or --all\n", "\(asNone.err)")
        #expect(!FileManager.default.fileExists(atPath: s.sub("store")))
        #expect(manifest(roots, inodes: true) == before)
    }

    @Test(
        "the parser: every key read, dotted and quoted keys located, names matched bare or with their manager's prefix")
    func parser() throws {
        let c = try HashifyConfig.parse(
            """
            store = "/var/lib/hashify//"
            mode = "overlay"
            default-excludes = false
            ignore-mtime = true
            include = ["/var/cache/apt/archives"]
            trust-guest-roots = true
            [guests]
            roots = ["/srv/a", "/srv/b"]
            [guest."web.1"]
            exclude = ["/srv/www"]
            trust-root = false
            [guest.build]
            root = "/srv/build"
            trust-root = true
            """, file: "t.toml")
        #expect(c.store?.string == "/var/lib/hashify")
        #expect(c.mode == .overlay && c.defaultExcludes == false && c.ignoreModificationTime == true)
        #expect(c.includes == [Array("/var/cache/apt/archives".utf8)])
        #expect(c.roots.map(\.string) == ["/srv/a", "/srv/b"])
        #expect(c.guest(named: "lxc:web.1", root: "/var/lib/lxc/web.1/rootfs")?.excludes == [Array("/srv/www".utf8)])
        #expect(c.guest(named: "lxc:other", root: "/x") == nil)
        #expect(c.trustGuestRoots == true)
        #expect(c.guest(named: "lxc:web.1", root: "/x")?.trustRoot == false)
        let trust = c.rootTrust(names: GuestNames([("lxc:web.1", FilePath("/var/lib/lxc/web.1/rootfs"))]))
        #expect(trust.trustAll && trust.byRoot == ["/var/lib/lxc/web.1/rootfs": false, "/srv/build": true])
        #expect(throws: InputError.self) { try HashifyConfig.parse("[guest.\"a.b\"]\nexlude = []\n", file: "t.toml") }
        do {
            _ = try HashifyConfig.parse("[guest.\"a.b\"]\nexlude = []\n", file: "t.toml")
        } catch let e as InputError {
            #expect(e.description.hasPrefix("t.toml:2: guest.\"a.b\".exlude: unknown key"), "\(e.description)")
        }
    }

    @Test("the example config sets nothing as shipped (no config), and parses with every setting uncommented")
    func example() throws {
        let path = packageRoot.appendingPathComponent("contrib/hashify.toml").path
        // As the Debian package installs it in /etc/hashify: hashify runs as without a config.
        #expect(try HashifyConfig.load(FilePath(path)) == nil)
        // "#key = value" and "#[table]" lines uncommented; the prose ("# ...") stays.
        let text = try String(contentsOfFile: path, encoding: .utf8).split(
            separator: "\n", omittingEmptySubsequences: false
        )
        .map { line in
            line.hasPrefix("#") && line.dropFirst().first.map { $0.isLetter || $0 == "[" } == true
                ? line.dropFirst() : line
        }.joined(separator: "\n")
        let c = try HashifyConfig.parse(text, file: "hashify.toml")
        #expect(c.mode == .hardlink && c.all && c.store == "/var/lib/lxc/.hashify" && c.threads == 4)
        #expect(c.minimumSize == 1 && c.defaultExcludes == true && c.trustGuestRoots == false)
        #expect(
            c.lxcPaths == ["/var/lib/lxc"] && c.machines == "/var/lib/machines" && c.roots == ["/srv/chroots/build"])
        #expect(c.guests["web1"]?.trustRoot == true && c.guests["build"]?.root == "/srv/chroots/build")
    }

    @Test(
        "mode = \"overlay\": a stopped plain guest is converted and shares with the others, a running one is left as it was",
        .enabled(if: isRoot, "overlay mounts need root"))
    func overlayMode() throws {
        let s = Scratch("configoverlay")
        let roots = (0..<3).map { s.sub("guests/g\($0)") }
        for (i, r) in roots.enumerated() { try makeRichGuest(r, index: i) }
        settle()
        let before = roots.map(guestManifest)
        let config = s.sub("hashify.toml")
        writeFile(
            config,
            "store = \"\(s.sub("store"))\"\nmode = \"overlay\"\n[guests]\nroots = [\(roots.map { "\"\($0)\"" }.joined(separator: ", "))]\n"
        )
        let running = try sleeper(in: roots[2] + "/usr")
        defer {
            kill(running.processIdentifier, SIGKILL)
            running.waitUntilExit()
        }
        let r = hashify(["unify", "--json", "--config", config])
        #expect(r.status == 0, "\(r.err)")
        let notes = (jsonReport(r.out)["notes"] as? [String] ?? []).joined(separator: "\n")
        let converted = (jsonReport(r.out)["overlayGuests"] as? [[String: Any]] ?? []).filter {
            ($0["action"] as? String)?.hasPrefix("converted") == true
        }.compactMap { $0["root"] as? String }
        #expect(Set(converted) == [roots[0], roots[1]], "\(r.out)")
        #expect(notes.contains("\(roots[2]) left as it is until a later run"), "\(notes)")
        #expect(isOverlayMount(roots[0]) && isOverlayMount(roots[1]) && !isOverlayMount(roots[2]))
        for (i, root) in roots.enumerated() { #expect(guestManifest(root) == before[i], "guest \(i) sees what it saw") }
        // The running guest was not hard-linked either: in overlay mode its files wait for their conversion.
        #expect(linkCount("\(roots[2])/usr/lib/lib5.so") == 1)
        // Overlay guests write without touching each other.
        writeFile("\(roots[0])/usr/lib/lib5.so", pseudoRandom(100, seed: 1))
        #expect(guestManifest(roots[1]) == before[1])
        kill(running.processIdentifier, SIGKILL)
        running.waitUntilExit()
        let again = hashify(["unify", "--json", "--config", config])
        #expect(again.status == 0, "\(again.err)")
        #expect(isOverlayMount(roots[2]))
        #expect(guestManifest(roots[2]) == before[2])
        #expect(overlay(["umount"] + roots, store: s.sub("store")).status == 0)
    }
}
