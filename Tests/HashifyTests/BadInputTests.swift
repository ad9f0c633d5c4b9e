import CHashifyShim
import Foundation
import HashifyEngine
import HashifySystem
import Synchronization
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("bad input: a clear error or a reported skip, nothing lost", .serialized)
struct BadInputTests {
    /// Asserts exit 2, a one-line error naming `mention`, and an unchanged tree.
    func expectRejected(_ args: [String], mention: String, tree: [String], scratch: Scratch) {
        let before = manifest(tree)
        let r = hashify(["unify"] + args)
        #expect(r.status == 2, "exit status for \(args): \(r.status) \(r.err)")
        let lines = r.err.split(separator: "\n")
        #expect(lines.count == 1, "one line: \(r.err)")
        #expect(r.err.contains(mention), "\(r.err) names \(mention)")
        #expect(manifest(tree) == before)
        #expect(access(scratch.sub("guests/.hashify"), F_OK) != 0, "no store created")
    }

    @Test func nonexistentRoot() {
        let s = Scratch("bad")
        let a = s.sub("guests/a")
        makeGuest(a, index: 0)
        expectRejected([a, s.sub("guests/missing")], mention: "missing: no such directory", tree: [a], scratch: s)
    }

    @Test func fileAsRoot() {
        let s = Scratch("bad")
        let a = s.sub("guests/a")
        makeGuest(a, index: 0)
        writeFile(s.sub("guests/file"), "x")
        expectRejected([a, s.sub("guests/file")], mention: "not a directory", tree: [a], scratch: s)
    }

    @Test func sameRootTwice() {
        let s = Scratch("bad")
        let a = s.sub("guests/a")
        makeGuest(a, index: 0)
        expectRejected([a, s.sub("guests/./a")], mention: "given twice", tree: [a], scratch: s)
    }

    @Test func nestedRoots() {
        let s = Scratch("bad")
        let a = s.sub("guests/a")
        makeGuest(a, index: 0)
        expectRejected([a, a + "/usr"], mention: "nested", tree: [a], scratch: s)
    }

    @Test func noRootsIsUsageError() {
        let r = hashify(["unify"])
        #expect(r.status == 2)
        #expect(r.err.contains("guest root"))
        let bad = hashify(["unify", "--min-size", "0", "/"])
        #expect(bad.status == 2)
    }

    @Test("refusals of every command create nothing, not even an empty directory in a store")
    func refusalsCreateNothing() throws {
        let s = Scratch("bad")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        makeGuest(a, index: 0)
        makeGuest(b, index: 1)
        mkdirs(s.sub("not-a-store"))
        settle()
        #expect(hashify(["unify", "-q", a, b]).status == 0)
        let store = s.sub("guests/.hashify")
        let before = manifest([s.path])
        for args in [
            ["status", "--store", s.sub("not-a-store")], ["gc", "--store", s.sub("not-a-store"), a],
            ["verify", "--store", s.sub("not-a-store"), a],
            ["split", "--store", s.sub("not-a-store"), "\(a)/usr/bin/tool"],
            ["overlay", "mount", "--store", store, a], ["overlay", "export", "--store", store, a],
            ["overlay", "fold", "--store", s.sub("not-a-store"), a], ["manifest", "--store", s.sub("not-a-store"), a],
            ["clone", "--store", s.sub("not-a-store"), a, s.sub("guests/c")], ["split", "/etc/passwd"],
            ["unify", "--threads", "100000", a, b], ["unify", "--threads", "0", a, b],
            ["status", "--config", "/dev/zero"], ["status", "--config", s.path],
        ] {
            let r = hashify(args)
            #expect(r.status == 2, "\(args): \(r.status) \(r.err)")
            let after = manifest([s.path])
            #expect(after == before, "\(args) changed:\n\(manifestDiff(before, after))")
        }
    }

    @Test(
        "a garbage list of remembered guests is left out, not printed; relative and symlinked roots are remembered once, by their real path"
    )
    func rememberedGuests() throws {
        let s = Scratch("bad")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        makeGuest(a, index: 0)
        makeGuest(b, index: 1)
        symlink(s.sub("guests"), s.sub("via-link"))
        settle()
        let store = s.sub("guests/.hashify")
        // Its own list of stores: the garbage written below into this store's list of guests would
        // otherwise be read by every other test's unify, and refused (which store owns a guest
        // cannot be told while a listed store's list of guests cannot be read).
        let state = s.sub("state")
        // Relative roots, then the same guests through a symlink, then by their real paths.
        var r = run([
            "/bin/sh", "-c", "cd '\(s.path)/guests' && STATE_DIRECTORY='\(state)' '\(hashifyBinary)' unify -q a b",
        ])
        #expect(r.status == 0, "\(r.err)")
        #expect(hashify(state: state, ["unify", "-q", s.sub("via-link/a"), s.sub("via-link/b")]).status == 0)
        #expect(hashify(state: state, ["unify", "-q", a, b]).status == 0)
        let remembered = try Data(contentsOf: URL(fileURLWithPath: store + "/guests")).split(separator: 0)
            .map { String(decoding: $0, as: UTF8.self) }
        let real = [a, b].map { URL(fileURLWithPath: $0).resolvingSymlinksInPath().path }
        #expect(remembered.sorted() == real.sorted(), "\(remembered)")
        // split by a relative path, from inside the guest.
        r = run(["/bin/sh", "-c", "cd '\(a)/usr' && STATE_DIRECTORY='\(state)' '\(hashifyBinary)' split -q bin/tool"])
        #expect(r.status == 0, "\(r.err)")
        #expect(linkCount("\(a)/usr/bin/tool") == 1)
        // Garbage in the list: status prints no raw bytes and works; the next unify writes it anew.
        var garbage = pseudoRandom(3000, seed: 5)
        garbage[10] = 0x0a
        try Data(garbage).write(to: URL(fileURLWithPath: store + "/guests"))
        let st = hashify(state: state, ["status", "--store", store])
        #expect(st.status == 0, "\(st.err)")
        #expect(!(st.out + st.err).unicodeScalars.contains { $0.value < 0x20 && $0 != "\n" }, "raw bytes printed")
        #expect((st.out + st.err).split(separator: "\n").count < 30)
        #expect(hashify(state: state, ["unify", "-q", a, b]).status == 0)
        #expect(hashify(state: state, ["status", "--store", store]).out.contains("/guests/a"))
    }

    @Test("store on another filesystem (tmpfs): exit 2 naming the root, nothing changed")
    func storeOnOtherFilesystem() throws {
        guard isRoot else {
            print("skipped: mounting a tmpfs needs root")
            return
        }
        let s = Scratch("bad")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        makeGuest(a, index: 0)
        makeGuest(b, index: 1)
        let mnt = s.sub("tmpfs")
        guard mountTmpfs(mnt) else {
            print("skipped: this machine cannot mount a tmpfs")
            return
        }
        defer { unmount(mnt) }
        expectRejected(["--store", mnt + "/store", a, b], mention: "guests/a", tree: [a, b], scratch: s)
        #expect(access(mnt + "/store", F_OK) != 0)
        // Roots on different filesystems are refused too.
        makeGuest(mnt + "/c", index: 2)
        expectRejected([a, mnt + "/c"], mention: "another filesystem", tree: [a], scratch: s)
    }

    @Test("store inside a guest root is refused")
    func storeInsideRoot() {
        let s = Scratch("bad")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        makeGuest(a, index: 0)
        makeGuest(b, index: 1)
        let before = manifest([a, b])
        let r = hashify(["unify", "--store", a + "/store", a, b])
        #expect(r.status == 2)
        #expect(r.err.contains("inside the guest root"))
        #expect(manifest([a, b]) == before)
    }

    @Test("names with newlines and invalid UTF-8 are unified and reported escaped")
    func oddNames() throws {
        let s = Scratch("names")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        for r in [a, b] {
            mkdirs(r + "/usr")
            let dir = try Directory.open(path: .init(r + "/usr"))
            let names: [[UInt8]] = [
                Array("new\nline".utf8), [0x66, 0xff, 0xfe, 0x80], Array("sp ace".utf8), Array("tab\tand\\".utf8),
            ]
            for (i, raw) in names.enumerated() {
                let name = FileName(raw)
                let f = try dir.createFile(name, mode: 0o644)
                try f.write(pseudoRandom(300, seed: UInt64(i)))
                try f.setModificationTime(Timestamp(seconds: 1_600_000_000, nanoseconds: 0))
            }
            // A directory with an invalid name too.
            try dir.makeDirectory(FileName([0xc3, 0x28]), mode: 0o755)
            let sub = try dir.openDirectory(FileName([0xc3, 0x28]))
            let f = try sub.createFile(FileName("inner"), mode: 0o644)
            try f.write(pseudoRandom(400, seed: 9))
            try f.setModificationTime(Timestamp(seconds: 1_600_000_000, nanoseconds: 0))
        }
        settle()
        let before = manifest([a, b])
        let r = hashify(["unify", "--json", a, b])
        #expect(r.status == 0, "\(r.err)")
        #expect(totals(r.out)["pathsLinked"] as? Int == 5)
        #expect(manifest([a, b]) == before)
        let dirA = try Directory.open(path: .init(a + "/usr"))
        let dirB = try Directory.open(path: .init(b + "/usr"))
        #expect(
            try dirA.stat(FileName([0x66, 0xff, 0xfe, 0x80])).inode
                == (try dirB.stat(FileName([0x66, 0xff, 0xfe, 0x80])).inode))
        #expect(try dirA.stat(FileName("new\nline")).inode == (try dirB.stat(FileName("new\nline"))).inode)
    }

    @Test("a tree deeper than PATH_MAX is walked and unified")
    func deeperThanPathMax() throws {
        let s = Scratch("deep")
        let roots = [s.sub("guests/a"), s.sub("guests/b")]
        let component = FileName(String(repeating: "d", count: 200))
        var deepest: [Directory] = []
        for r in roots {
            mkdirs(r)
            var dir = try Directory.open(path: .init(r))
            for _ in 0..<30 {  // 30 × 201 bytes > PATH_MAX (4096)
                try dir.makeDirectory(component, mode: 0o755)
                dir = try dir.openDirectory(component)
            }
            let f = try dir.createFile(FileName("bottom"), mode: 0o644)
            try f.write(pseudoRandom(5000, seed: 11))
            try f.setModificationTime(Timestamp(seconds: 1_600_000_000, nanoseconds: 0))
            deepest.append(dir)
        }
        settle()
        let before = manifest(roots)
        let r = hashify(["unify", "--json"] + roots)
        #expect(r.status == 0, "\(r.err)")
        #expect(totals(r.out)["pathsLinked"] as? Int == 1)
        #expect(try deepest[0].stat(FileName("bottom")).inode == (try deepest[1].stat(FileName("bottom"))).inode)
        #expect(manifest(roots) == before)
    }

    @Test(
        "a tree thousands of directories deep is removed on a thread of 128 KiB stack; a file the removal keeps stays with the directories above it, nothing else"
    )
    func deepTreeRemoval() throws {
        // The removal holds a descriptor per level: as deep as this process may open, up to 12,000.
        let depth = min(12_000, Int(hashify_raise_fd_limit()) - 1_000)
        guard depth >= 3_000 else {
            print("skipped: this process may open only \(depth + 1_000) files")
            return
        }
        let s = Scratch("deep-removal")
        let top = try Directory.open(path: .init(s.path))
        /// A chain of `depth` directories "d" below `t`, a file at each level ("keep" at the middle one); its inode.
        func makeChain() throws -> UInt64 {
            try top.makeDirectory(FileName("t"), mode: 0o755)
            var dir = try top.openDirectory(FileName("t"))
            var kept: UInt64 = 0
            for level in 0..<depth {
                try dir.makeDirectory(FileName("d"), mode: 0o755)
                dir = try dir.openDirectory(FileName("d"))
                let name = FileName(level == depth / 2 ? "keep" : "f")
                try dir.createFile(name, mode: 0o644).write([UInt8(level & 0xff)])
                if level == depth / 2 { kept = try dir.stat(name).inode }
            }
            return kept
        }
        /// `removeTree` on a thread whose stack a recursion of a frame or two per level would overflow many times.
        func removeOnSmallStack(keeping keep: @escaping @Sendable (FileStat) -> Bool) throws -> Bool {
            let done = DispatchSemaphore(value: 0)
            nonisolated(unsafe) var result: Result<Bool, any Error> = .success(false)
            let thread = Thread {
                result = Result { try top.removeTree(FileName("t"), keeping: keep) }
                done.signal()
            }
            thread.stackSize = 128 << 10
            thread.start()
            done.wait()
            return try result.get()
        }
        _ = try makeChain()
        #expect(try removeOnSmallStack(keeping: { _ in false }) == false)
        #expect((try? top.stat(FileName("t"))) == nil, "the whole tree is gone")

        let keptInode = try makeChain()
        #expect(try removeOnSmallStack(keeping: { $0.inode == keptInode }) == true)
        var dir = try top.openDirectory(FileName("t"))
        for _ in 0...(depth / 2) {
            #expect(try dir.entryNames().map(\.bytes) == [Array("d".utf8)])
            dir = try dir.openDirectory(FileName("d"))
        }
        #expect(
            try dir.entryNames().map(\.bytes) == [Array("keep".utf8)], "the kept file alone at its level, nothing below"
        )
        #expect(try dir.stat(FileName("keep")).inode == keptInode)
    }

    @Test("two threads listing one directory at once each see every entry (a listing has a position of its own)")
    func concurrentListings() throws {
        let s = Scratch("listings")
        let names = Set((0..<3000).map { "entry-\($0)" })  // more than one getdents64 buffer
        for n in names { writeFile(s.sub("dir/\(n)"), "") }
        let dir = try Directory.open(path: FilePath(s.sub("dir")))
        let short = Mutex(0)
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            for _ in 0..<50 {
                let seen = Set(((try? dir.entryNames()) ?? []).map { String(decoding: $0.bytes, as: UTF8.self) })
                if seen != names { short.withLock { $0 += 1 } }
            }
        }
        #expect(short.withLock { $0 } == 0, "listings that missed entries")
    }

    @Test(
        "an error naming a path thousands of directories deep stays one readable line: its beginning and end, what was left out"
    )
    func longErrorElided() throws {
        let root = "/nonexistent/" + String(repeating: "a/", count: 3_000) + "end"
        let r = hashify(["unify", "--store", Scratch("long-error").sub("store"), root])
        #expect(r.status == 2)
        #expect(r.err.hasPrefix("hashify: /nonexistent/a/a/"))
        #expect(r.err.contains("characters left out)…"))
        #expect(r.err.hasSuffix("/a/end: cannot open: File name too long\n"), "the failure itself is kept")
        #expect(r.err.count < 2_200 && r.err.split(separator: "\n").count == 1, "\(r.err.count) characters")
    }

    @Test("an unreadable file is a reported skip (exit 1); everything else is unified")
    func unreadableFile() throws {
        guard isRoot else {
            print("skipped: needs root to run hashify as another user")
            return
        }
        guard access("/usr/bin/setpriv", X_OK) == 0 else {
            print("skipped: setpriv (util-linux) is not installed")
            return
        }
        let s = Scratch("unreadable")
        chmod(s.path, 0o755)
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        for r in [a, b] {
            writeFile("\(r)/usr/ok", pseudoRandom(700, seed: 1), uid: 65534, gid: 65534)
            writeFile("\(r)/usr/secret", pseudoRandom(700, seed: 2), mode: 0o600)
            chown("\(r)/usr", 65534, 65534)
            chown(r, 65534, 65534)
        }
        chown(s.sub("guests"), 65534, 65534)
        settle()
        let before = manifest([a, b])
        let r = run([
            "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", hashifyBinary, "unify", "--json", a,
            b,
        ])
        #expect(r.status == 1, "\(r.err)")
        #expect(manifest([a, b]) == before)
        #expect(inode("\(a)/usr/ok") == inode("\(b)/usr/ok"))
        #expect(inode("\(a)/usr/secret") != inode("\(b)/usr/secret"))
        let skipped = jsonReport(r.out)["skipped"] as? [[String: Any]] ?? []
        #expect(skipped.contains { ($0["path"] as? String) == "/usr/secret" && ($0["error"] as? Bool) == true })
    }

    @Test("immutable files are left alone")
    func immutable() throws {
        guard isRoot else { return }
        let s = Scratch("immutable")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        for r in [a, b] { writeFile("\(r)/usr/f", pseudoRandom(700, seed: 1)) }
        guard run(["/usr/bin/chattr", "+i", "\(a)/usr/f"]).status == 0 else {
            print("skipped: this filesystem has no immutable flag")
            return
        }
        defer { run(["/usr/bin/chattr", "-i", "\(a)/usr/f"]) }
        settle()
        let r = hashify(["unify", "--json", a, b])
        #expect(r.status == 0)
        #expect(inode("\(a)/usr/f") != inode("\(b)/usr/f"))
    }
}
