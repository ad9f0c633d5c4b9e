import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The shell lines of the README's fenced blocks in the section that starts
/// with `heading` (up to the next heading of its level or above), comments cut.
func readmeBlocks(under heading: String) -> [[String]] {
    let text = (try? String(contentsOf: packageRoot.appendingPathComponent("README.md"), encoding: .utf8)) ?? ""
    let lines = text.components(separatedBy: "\n")
    guard let start = lines.firstIndex(of: heading) else { return [] }
    let level = heading.prefix { $0 == "#" }.count
    var blocks: [[String]] = []
    var current: [String]?
    for line in lines[(start + 1)...] {
        if current == nil, line.hasPrefix("#"), line.prefix(while: { $0 == "#" }).count <= level { break }
        if line.hasPrefix("```") {
            if let c = current {
                blocks.append(c)
                current = nil
            } else {
                current = []
            }
            continue
        }
        guard current != nil else { continue }
        // A comment is " #" and what follows; a line that is only a comment is dropped.
        var command = line
        if let r = command.range(of: #"(^|\s+)#(\s.*)?$"#, options: .regularExpression) { command.removeSubrange(r) }
        command = command.trimmingCharacters(in: .whitespaces)
        if !command.isEmpty { current!.append(command) }
    }
    return blocks
}

/// The README's LXC walk-through ("Using it on LXC guests", then overlay
/// mode's convert and hook) run as written on three containers started by
/// LXC, with the test's lxcpath for `/var/lib/lxc`: every line runs and
/// does what the README says of it, and a line the test does not know fails
/// it, so the README and the tool cannot drift apart.
@Suite(
    "the README's LXC walk-through on real containers", .serialized,
    .enabled(
        if: isRoot && FileManager.default.isExecutableFile(atPath: lxcStart), "needs root and LXC (apt-get install lxc)"
    ))
struct ReadmeWalkthroughTests {
    /// Lines that install onto the host (`.ci/run` runs install.sh into a prefix and checks the units): here
    /// only what they name is checked to exist where the README's other lines expect it.
    static let hostInstallLines: [String: [String]] = [
        "./install.sh": ["install.sh"],
        "systemctl enable --now hashify.timer": [
            "contrib/systemd/hashify.timer", "contrib/systemd/hashify.service.in",
        ],
        "install -D contrib/lxc/hashify-lxc-hook /usr/local/share/hashify/hashify-lxc-hook": [
            "contrib/lxc/hashify-lxc-hook"
        ],
    ]

    @Test("every command of the README's LXC walk-through runs on LXC containers and does what the README says")
    func walkthrough() throws {
        let s = Scratch("readme")
        let lxcpath = s.sub("lxc")
        let names = ["web1", "web2", "web3"]
        let roots = names.map { "\(lxcpath)/\($0)/rootfs" }
        let hook = packageRoot.appendingPathComponent("contrib/lxc/hashify-lxc-hook").path
        for (i, (name, root)) in zip(names, roots).enumerated() {
            writeFile("\(root)/usr/lib/libshared.so", pseudoRandom(40_000, seed: 90))
            writeFile("\(root)/usr/share/doc/common", pseudoRandom(9_000, seed: 91))
            writeFile("\(root)/usr/lib/own-\(name)", pseudoRandom(5_000, seed: 92 + UInt64(i)))
            // lxc-stop (without -k, as the README has it) halts the init, a shell, with SIGKILL at once.
            makeLXCContainer(
                lxcpath: lxcpath, name: name, initScript: "echo started > /tmp/started",
                extraConfig: "lxc.signal.halt = SIGKILL\n")
            settleDirectoryTimes(root)
        }
        settle()
        defer { for n in names { lxcTool(lxcpath, "lxc-stop", ["-n", n, "-k"]) } }
        // Live guests, as the README's users run it.
        startContainers(names, lxcpath: lxcpath, logs: s)
        let guestTrees = { roots.map { manifest([$0]) } }
        let before = guestTrees()

        // "Using it on LXC guests": one block.
        let using = readmeBlocks(under: "## Using it on LXC guests")
        try #require(!using.isEmpty, "the README has the section and its commands")
        let binDir = URL(fileURLWithPath: hashifyBinary).deletingLastPathComponent().path
        func translate(_ line: String) -> String {
            var out = line.replacingOccurrences(of: "/var/lib/lxc", with: lxcpath)
            // Commands that find the guests themselves look in the test's lxcpath (given, it replaces the defaults).
            if out.hasPrefix("hashify "), !out.contains(lxcpath) { out += " --lxcpath \(lxcpath)" }
            if out.hasPrefix("lxc-") { out = out.replacingOccurrences(of: " -n ", with: " -P \(lxcpath) -n ") }
            return out
        }
        func sh(_ line: String) -> (status: Int32, out: String, err: String) {
            run([
                "/usr/bin/env", "PATH=\(binDir):/usr/sbin:/usr/bin:/sbin:/bin", "HASHIFY=\(hashifyBinary)", "/bin/sh",
                "-c", line,
            ])
        }
        var ran: [String] = []
        for line in using[0] {
            if let files = Self.hostInstallLines[line] {
                for f in files {
                    #expect(
                        FileManager.default.fileExists(atPath: packageRoot.appendingPathComponent(f).path),
                        "\(line): \(f) is in the repository")
                }
                continue
            }
            guard line.hasPrefix("hashify ") else {
                Issue.record("a README line the walk-through test does not know how to run: \(line)")
                continue
            }
            let r = sh(translate(line))
            #expect(r.status == 0, "\(line) → \(translate(line)): exit \(r.status)\n\(r.out)\n\(r.err)")
            ran.append(line)
            let words = line.split(separator: " ").map(String.init)
            switch words[1] {
            case "unify" where words.contains("--dry-run"):
                #expect(guestTrees() == before, "\(line): changes nothing")
                #expect(!FileManager.default.fileExists(atPath: "\(lxcpath)/.hashify"), "\(line): makes no store")
                #expect(r.out.contains("would link"), "\(line): says what would be linked: \(r.out)")
            case "unify":
                #expect(guestTrees() == before, "\(line): the guests read what they read")
                #expect(
                    FileManager.default.fileExists(atPath: "\(lxcpath)/.hashify/objects"),
                    "\(line): the store is where the README says (/var/lib/lxc/.hashify)")
            case "status":
                for n in names { #expect(r.out.contains("lxc:\(n)"), "\(line): names lxc:\(n): \(r.out)") }
            case "manifest":
                #expect(r.out.contains("shared") && r.out.contains("/usr/lib/libshared.so"), "\(line): \(r.out)")
            default:
                break
            }
        }
        #expect(ran.contains { $0.hasPrefix("hashify unify ") && $0.contains("--all") }, "the README shows unify --all")
        let linked = sh("stat -c %h \(roots[0])/usr/lib/libshared.so").out.trimmingCharacters(
            in: .whitespacesAndNewlines)
        #expect(linked == "4", "three guests and the store share one inode: \(linked)")

        // Overlay mode: convert one container, and its config gets the hook lines the README gives.
        let overlayBlocks = readmeBlocks(under: "## Overlay mode: copy-on-write guests")
        try #require(overlayBlocks.count >= 2, "the overlay section has its commands and its config lines")
        let webRoot = roots[0]
        for line in overlayBlocks[0] {
            if let files = Self.hostInstallLines[line] {
                for f in files {
                    #expect(FileManager.default.fileExists(atPath: packageRoot.appendingPathComponent(f).path))
                }
                continue
            }
            guard line.hasPrefix("hashify ") || line.hasPrefix("lxc-stop ") else {
                Issue.record("a README line the walk-through test does not know how to run: \(line)")
                continue
            }
            let r = sh(translate(line))
            #expect(r.status == 0, "\(line) → \(translate(line)): exit \(r.status)\n\(r.out)\n\(r.err)")
        }
        #expect(isOverlayMount(webRoot), "convert mounted web1's overlay")
        #expect(manifest([webRoot]) == before[0], "web1 reads what it read")
        #expect(sh("hashify overlay umount -q --store \(lxcpath)/.hashify \(webRoot)").status == 0)
        let hookLines = overlayBlocks[1].filter { $0.hasPrefix("lxc.hook.") }
        #expect(hookLines.count == 2, "pre-start and post-stop: \(overlayBlocks[1])")
        let config = hookLines.map {
            $0.replacingOccurrences(of: "/usr/local/share/hashify/hashify-lxc-hook", with: hook)
                .replacingOccurrences(of: "/var/lib/lxc", with: lxcpath)
        }
        #expect(
            config.allSatisfy { $0.contains(hook) }, "the hook's path is the one the install line gives: \(hookLines)")
        let configPath = "\(lxcpath)/web1/config"
        let old = (try? String(contentsOfFile: configPath, encoding: .utf8)) ?? ""
        try (old + config.joined(separator: "\n") + "\n").write(toFile: configPath, atomically: true, encoding: .utf8)
        // LXC mounts the guest before it starts and unmounts it after it stops.
        startContainers(["web1"], lxcpath: lxcpath, logs: s)
        #expect(isOverlayMount(webRoot), "the pre-start hook mounted web1")
        #expect(sh("echo private > \(webRoot)/usr/lib/libshared.so").status == 0)
        #expect(FileManager.default.contents(atPath: "\(webRoot)/usr/lib/libshared.so") == Data("private\n".utf8))
        #expect(
            FileManager.default.contents(atPath: "\(roots[1])/usr/lib/libshared.so")
                == Data(pseudoRandom(40_000, seed: 90)),
            "a write in the overlay guest reaches no other guest")
        #expect(lxcTool(lxcpath, "lxc-stop", ["-n", "web1"]).status == 0)
        #expect(!isOverlayMount(webRoot), "the post-stop hook unmounted web1")
        // The README's status names the overlay guest with its store, and the routine folds it.
        let status = sh(translate("hashify status"))
        #expect(status.status == 0 && status.out.contains("lxc:web1"), "\(status.out)\(status.err)")
        let unify = sh(translate("hashify unify --all"))
        #expect(unify.status == 0 && unify.out.contains("folded"), "\(unify.out)\(unify.err)")
        for (i, r) in roots.enumerated().dropFirst() { #expect(manifest([r]) == before[i], "\(r) unchanged") }
    }
}
