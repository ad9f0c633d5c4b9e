import Foundation
import HashifyEngine
import HashifySystem
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The hardlink-mode line for a guest whose root is not the host's root, as the brief of issue 25 words it.
/// A rootfs its manager mounts idmapped (Incus's default) cannot be an overlay guest: the line says so.
func notLinkedLine(_ label: String, _ reason: String, overlayCanTakeIt: Bool = true) -> String {
    "\(label): not linked: its root is not the host's root (\(reason)); a shared file would be writable by it — "
        + (overlayCanTakeIt
            ? "use overlay mode (hashify overlay convert) or set trust-root in the config"
            : "set trust-root in the config if you trust it (overlay mode cannot take a rootfs mounted idmapped)")
}

/// The `notLinked` entries of a `--json` report, by root.
func notLinked(_ out: String) -> [String: [String: Any]] {
    var byRoot: [String: [String: Any]] = [:]
    for e in jsonReport(out)["notLinked"] as? [[String: Any]] ?? [] { byRoot[e["root"] as? String ?? ""] = e }
    return byRoot
}

@Suite(
    "hardlink mode and guest roots: unprivileged containers are linked only when trusted", .serialized,
    .enabled(if: isRoot, "owners and shifted roots need root"))
struct GuestRootTrustTests {
    /// One host with a guest of each form whose root is not the host's root, and
    /// trusted guests beside them, all found by `--all` through a config.
    struct Host {
        let store: String
        let config: String
        /// Untrusted guests: root → (name, reason).
        let untrusted: [String: (name: String, reason: String)]
        /// Guests whose root is the host's root.
        let trusted: [String]
        let base: String

        var all: [String] { trusted + untrusted.keys.sorted() }

        /// Writes the config, with `extra` appended.
        func writeConfig(_ extra: String = "") {
            writeFile(
                config,
                """
                store = "\(store)"
                \(extra)
                [guests]
                all = true
                lxcpath = ["\(base)/lxc"]
                machines = "\(base)/machines"
                incus-pools = ["\(base)/pools"]
                roots = ["\(base)/chroots/s1", "\(base)/chroots/s2"]

                """)
        }
    }

    func makeHost(_ s: Scratch) -> Host {
        let b = s.path
        // LXC: web1 unprivileged (lxc.idmap, files unshifted as with idmap=container), web2 privileged.
        for (i, name) in ["web1", "web2"].enumerated() {
            makeGuest("\(b)/lxc/\(name)/rootfs", index: i)
            writeFile(
                "\(b)/lxc/\(name)/config",
                "lxc.uts.name = \(name)\nlxc.rootfs.path = dir:\(b)/lxc/\(name)/rootfs\n"
                    + (name == "web1" ? "lxc.idmap = u 0 100000 65536\nlxc.idmap = g 0 100000 65536\n" : ""))
        }
        // Incus: u1 of the default kind (not privileged, unshifted), p1 privileged.
        for (i, name) in ["u1", "p1"].enumerated() {
            makeGuest("\(b)/pools/default/containers/\(name)/rootfs", index: 2 + i)
            writeFile("\(b)/pools/default/containers/\(name)/backup.yaml", incusBackup(privileged: name == "p1"))
        }
        // nspawn: m1 with a user namespace (its settings beside the machine), m2 without.
        for (i, name) in ["m1", "m2"].enumerated() {
            makeGuest("\(b)/machines/\(name)", index: 4 + i)
        }
        writeFile("\(b)/machines/m1.nspawn", "# a user namespace\n[Exec]\nBoot=yes\nPrivateUsers=pick\n")
        writeFile("\(b)/machines/m2.nspawn", "[Exec]\nPrivateUsers=no\n[Files]\nPrivateUsersOwnership=off\n")
        // Two guests of one shifted id range (files owned by 100000 and up on disk): they would share with each other.
        for (i, name) in ["s1", "s2"].enumerated() {
            let r = "\(b)/chroots/\(name)"
            makeGuest(r, index: 6 + i)
            #expect(run(["/usr/bin/chown", "-R", "-h", "100000:100000", r]).status == 0)
        }
        let host = Host(
            store: s.sub("lxc/.hashify"), config: s.sub("hashify.toml"),
            untrusted: [
                "\(b)/lxc/web1/rootfs": ("lxc:web1", "lxc.idmap"),
                "\(b)/pools/default/containers/u1/rootfs": (
                    "incus:default/u1", "an unprivileged Incus container: security.privileged is not true"
                ),
                "\(b)/machines/m1": ("nspawn:m1", "PrivateUsers=pick in \(b)/machines/m1.nspawn"),
                "\(b)/chroots/s1": (
                    "\(b)/chroots/s1", "its root directory is owned by uid 100000: files shifted into an id range"
                ),
                "\(b)/chroots/s2": (
                    "\(b)/chroots/s2", "its root directory is owned by uid 100000: files shifted into an id range"
                ),
            ],
            trusted: [
                "\(b)/lxc/web2/rootfs", "\(b)/pools/default/containers/p1/rootfs", "\(b)/machines/m2",
            ], base: b)
        host.writeConfig()
        settle()
        return host
    }

    @Test(
        "each form of a root that is not the host's (lxc.idmap, Incus not privileged, nspawn PrivateUsers, a shifted root) is left unlinked with one line, nothing of it changed; linked once the config trusts it"
    )
    func untrustedLeftUnlinked() throws {
        let s = Scratch("trust")
        let h = makeHost(s)
        let untrustedRoots = h.untrusted.keys.sorted()
        let untrustedBefore = manifest(untrustedRoots, inodes: true)
        let rest = untrustedRoots.filter { !$0.hasSuffix("/web1/rootfs") }
        let restBefore = manifest(rest, inodes: true)
        let before = h.all.map(guestManifest)

        // A dry run says it in text, one line a guest.
        let dry = hashify(["unify", "--dry-run", "--config", h.config])
        #expect(dry.status == 0, "\(dry.err)")
        for (_, g) in h.untrusted {
            let line = notLinkedLine(g.name, g.reason, overlayCanTakeIt: !g.name.hasPrefix("incus:"))
            #expect(dry.out.components(separatedBy: line).count == 2, "once: \(line)\n\(dry.out)")
        }

        let r = hashify(["unify", "--json", "--config", h.config])
        #expect(r.status == 0, "a policy, not an error: \(r.err)")
        let listed = notLinked(r.out)
        #expect(Set(listed.keys) == Set(untrustedRoots), "\(listed)")
        for (root, g) in h.untrusted {
            #expect(listed[root]?["reason"] as? String == g.reason, "\(listed[root] ?? [:])")
            #expect(listed[root]?["pathsShared"] as? Int == 0)
        }
        #expect(listed["\(h.base)/pools/default/containers/u1/rootfs"]?["overlayCanTakeIt"] as? Bool == false)
        #expect(listed["\(h.base)/lxc/web1/rootfs"]?["overlayCanTakeIt"] as? Bool == true)
        // Nothing of the untrusted guests changed, not even an inode; the trusted ones share.
        #expect(manifest(untrustedRoots, inodes: true) == untrustedBefore)
        for t in h.trusted.dropFirst() {
            #expect(inode("\(h.trusted[0])/usr/lib/lib5.so") == inode("\(t)/usr/lib/lib5.so"), "\(t)")
        }
        for (i, root) in h.all.enumerated() { #expect(guestManifest(root) == before[i], "\(root) sees what it saw") }

        // status says the same for them; mem does not advise unify for them.
        let status = hashify(["status", "--config", h.config])
        #expect(status.status == 0, "\(status.err)")
        #expect(status.out.contains(notLinkedLine("lxc:web1", "lxc.idmap")), "\(status.out)")
        #expect(!status.out.contains("warning"), "none shares files yet: \(status.out)")
        let mem = jsonReport(hashify(["mem", "--json", "--config", h.config] + h.all).out)
        let memNotes = (mem["notes"] as? [String] ?? []).joined(separator: "\n")
        #expect(
            memNotes.contains(
                "\(h.base)/lxc/web1/rootfs: unify leaves it unlinked (its root is not the host's root: lxc.idmap)"),
            "\(memNotes)")

        // One guest trusted by name: linked, the others still not.
        h.writeConfig("[guest.web1]\ntrust-root = true\n")
        let one = hashify(["unify", "--json", "--config", h.config])
        #expect(one.status == 0, "\(one.err)")
        #expect(Set(notLinked(one.out).keys) == Set(untrustedRoots).subtracting(["\(h.base)/lxc/web1/rootfs"]))
        #expect(inode("\(h.base)/lxc/web1/rootfs/usr/lib/lib5.so") == inode("\(h.trusted[0])/usr/lib/lib5.so"))
        #expect(manifest(rest, inodes: true) == restBefore)
        for root in rest { #expect(linkCount("\(root)/usr/lib/lib5.so") == 1, "\(root)") }

        // Every guest root trusted: all linked (the two shifted guests with each other).
        h.writeConfig("trust-guest-roots = true\n")
        let all = hashify(["unify", "--json", "--config", h.config])
        #expect(all.status == 0, "\(all.err)")
        #expect(notLinked(all.out).isEmpty, "\(all.out)")
        for root in ["\(h.base)/pools/default/containers/u1/rootfs", "\(h.base)/machines/m1"] {
            #expect(inode("\(root)/usr/lib/lib5.so") == inode("\(h.trusted[0])/usr/lib/lib5.so"), "\(root)")
        }
        #expect(inode("\(h.base)/chroots/s1/usr/lib/lib5.so") == inode("\(h.base)/chroots/s2/usr/lib/lib5.so"))
        for (i, root) in h.all.enumerated() { #expect(guestManifest(root) == before[i], "\(root) sees what it saw") }

        // trust-root = false wins over trust-guest-roots, even for a guest whose root is the host's.
        h.writeConfig("trust-guest-roots = true\n[guest.web2]\ntrust-root = false\n")
        let distrusted = hashify(["unify", "--config", h.config])
        #expect(distrusted.status == 0, "\(distrusted.err)")
        #expect(
            distrusted.out.contains(
                "lxc:web2: not linked: its root is not trusted (trust-root = false in the config)"),
            "\(distrusted.out)")
    }

    @Test(
        "status names a guest linked before its root was untrusted, with the command that undoes it; unify links nothing more to it, split undoes it"
    )
    func alreadyLinked() throws {
        let s = Scratch("trustlinked")
        let roots = ["a", "b", "c", "d"].map { s.sub("guests/\($0)") }
        for (i, r) in roots.enumerated() { makeGuest(r, index: i) }
        let store = s.sub("store")
        settle()
        let before = roots.map(guestManifest)
        // An earlier version linked a and b.
        #expect(hashify(["unify", "-q", "--store", store, roots[0], roots[1]]).status == 0)
        #expect(inode("\(roots[0])/usr/lib/lib5.so") == inode("\(roots[1])/usr/lib/lib5.so"))
        // b's root is now a shifted range's: its root can write what it shares.
        #expect(chown(roots[1], 100000, 100000) == 0)
        let reason = "its root directory is owned by uid 100000: files shifted into an id range"
        let shared = 41  // makeGuest's 40 libraries and its tool

        let status = hashify(["status", "--store", store, roots[0], roots[1]])
        #expect(status.status == 0, "\(status.err)")
        let warning = status.out.split(separator: "\n").filter { $0.hasPrefix("warning") }
        #expect(warning.count == 1, "\(status.out)")
        #expect(
            warning.first?.contains(
                "\(roots[1]): its root is not the host's root (\(reason)), yet \(shared) of its files already share store objects"
            ) == true, "\(status.out)")
        #expect(
            warning.first?.contains(
                "hashify split --root \(roots[1]) gives them their own copies (or hashify overlay convert \(roots[1]))")
                == true)
        let json = notLinked(hashify(["status", "--json", "--store", store, roots[0], roots[1]]).out)
        #expect(json[roots[1]]?["pathsShared"] as? Int == shared, "\(json)")

        // unify: b is not linked further, and no other guest is linked to an object b holds.
        let bBefore = manifest([roots[1]], inodes: true)
        let r = hashify(["unify", "--json", "--store", store] + roots)
        #expect(r.status == 0, "\(r.err)")
        #expect(notLinked(r.out)[roots[1]]?["pathsShared"] as? Int == shared)
        #expect(manifest([roots[1]], inodes: true) == bBefore)
        #expect(inode("\(roots[2])/usr/lib/lib5.so") == inode("\(roots[3])/usr/lib/lib5.so"))
        #expect(inode("\(roots[2])/usr/lib/lib5.so") != inode("\(roots[1])/usr/lib/lib5.so"))

        // split --root undoes it: b keeps what it sees, shares nothing, and status has no warning left.
        #expect(hashify(["split", "-q", "--store", store, "--root", roots[1]]).status == 0)
        #expect(linkCount("\(roots[1])/usr/lib/lib5.so") == 1)
        let after = hashify(["status", "--store", store] + roots)
        #expect(!after.out.contains("warning"), "\(after.out)")
        #expect(after.out.contains(notLinkedLine(roots[1], reason)), "\(after.out)")
        #expect(chown(roots[1], 0, 0) == 0)
        for (i, root) in roots.enumerated() { #expect(guestManifest(root) == before[i], "\(root) sees what it saw") }
    }

    @Test(
        "the detector: nspawn settings in the trusted directories first (the first file found is the one read), false booleans, other sections; a shifted root; the config's per-guest setting over trusting all"
    )
    func detector() throws {
        let s = Scratch("trustdetect")
        let etc = s.sub("etc-nspawn")
        let machines = s.sub("machines")
        mkdirs(etc)
        var places = GuestRootTrust.Places()
        places.nspawnDirectories = [FilePath(etc)]
        func why(_ name: String) throws -> String? {
            let root = FilePath("\(machines)/\(name)")
            return GuestRootTrust.whyNotHostRoot(root, directory: try Directory.open(path: root), places: places)
        }
        for n in ["a", "b", "c", "d", "e"] { mkdirs("\(machines)/\(n)") }
        writeFile("\(etc)/a.nspawn", "[Exec]\nPrivateUsers=yes\n")
        writeFile("\(etc)/b.nspawn", "[Exec]\nPrivateUsers = off\n")
        writeFile("\(machines)/b.nspawn", "[Exec]\nPrivateUsers=pick\n")  // not read: /etc's file wins
        writeFile("\(machines)/c.nspawn", "[Files]\nPrivateUsers=pick\n[Exec]\n# PrivateUsers=pick\nBoot=yes\n")
        writeFile("\(machines)/d.nspawn", "[Exec]\nPrivateUsers=identity\nPrivateUsers=0\n")
        #expect(try why("a") == "PrivateUsers=yes in \(etc)/a.nspawn")
        #expect(try why("b") == nil)
        #expect(try why("c") == nil)
        #expect(try why("d") == nil, "the last setting counts")
        #expect(chown("\(machines)/e", 100000, 100000) == 0)
        #expect(try why("e") == "its root directory is owned by uid 100000: files shifted into an id range")
        // A policy: the config's per-guest setting wins over the detector and over trusting all.
        var policy = RootTrustPolicy()
        policy.places = places
        let a = FilePath("\(machines)/a")
        #expect(policy.untrustedReason(a, directory: try Directory.open(path: a)) != nil)
        policy.byRoot[a] = true
        #expect(policy.untrustedReason(a, directory: try Directory.open(path: a)) == nil)
        policy.trustAll = true
        policy.byRoot = [FilePath("\(machines)/b"): false]
        #expect(policy.untrustedReason(a, directory: try Directory.open(path: a)) == nil)
        let b = FilePath("\(machines)/b")
        #expect(policy.untrustedReason(b, directory: try Directory.open(path: b)) == RootTrustPolicy.distrustedByConfig)
    }
}
