import Crypto
import Foundation
import HashifySystem
import SystemPackage
import Testing

@testable import ErofsImage

#if canImport(Glibc)
import Glibc
#endif

// MARK: the description every test writes

private func ts(_ s: Int64, _ ns: UInt32 = 0) -> Timestamp { Timestamp(seconds: s, nanoseconds: ns) }
private func b(_ s: String) -> [UInt8] { Array(s.utf8) }
private func xattr(_ name: String, _ value: [UInt8]) -> ExtendedAttribute {
    ExtendedAttribute(name: b(name), value: value)
}

/// A valid POSIX ACL (`system.posix_acl_*` are parsed by the kernel): owner rw, user 1000 rw, group r, mask rw, other r.
private let acl: [UInt8] = {
    var out: [UInt8] = [2, 0, 0, 0]
    for (tag, perm, id) in [
        (1, 6, UInt32.max), (2, 6, 1000), (4, 4, UInt32.max), (0x10, 6, UInt32.max), (0x20, 4, UInt32.max),
    ] {
        out += [UInt8(tag), 0, UInt8(perm), 0]
        out += withUnsafeBytes(of: UInt32(id).littleEndian, Array.init)
    }
    return out
}()

/// A version-2 file capability (cap_net_bind_service, permitted and effective).
private let fileCapability: [UInt8] = [0, 0, 0, 2, 0, 4, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]

/// Every kind of node, hard links, names and sizes at the format's edges,
/// xattrs of every prefix, shared and many on one inode, external files of 1 byte and 5 GiB.
func richErofsTree() -> ErofsTree {
    let base = ts(1_700_000_000, 123_456_789)
    var t = ErofsTree(
        root: .directory(
            permissions: 0o755, modificationTime: base, xattrs: [xattr("trusted.overlay.opaque", b("y"))]))
    let root = ErofsTree.rootID
    func file(_ content: [UInt8], _ perms: UInt16 = 0o644, time: Timestamp = base, xattrs: [ExtendedAttribute] = [])
        -> ErofsNode
    {
        ErofsNode(.file(.inline(content)), permissions: perms, modificationTime: time, xattrs: xattrs)
    }
    let etc = t.add(.directory(modificationTime: ts(1_600_000_000, 5)), as: b("etc"), in: root)
    t.add(file([]), as: b("empty"), in: etc)
    t.add(file(b("x")), as: b("one"), in: etc)
    for size in [64, 2048, 2049, 4095, 4096, 4097, 8191, 102_400] {
        t.add(file(pseudoRandom(size, seed: UInt64(size))), as: b("size-\(size)"), in: etc)
    }
    // Owners and times at the edges.
    t.add(
        ErofsNode(
            .file(.inline(b("big ids\n"))), permissions: 0o4755, uid: 4_000_000_000, gid: 65_536,
            modificationTime: ts(-86_400 * 365, 999_999_999)), as: b("setuid-1969"), in: etc)
    t.add(
        ErofsNode(
            .file(.inline(b("future\n"))), permissions: 0o2640, uid: 65_535, gid: 65_535,
            modificationTime: ts(1 << 33, 1)),
        as: b("setgid-2242"), in: etc)
    t.add(
        ErofsNode(.file(.inline([])), permissions: 0o1000, uid: 0, gid: 0, modificationTime: ts(0)),
        as: b("epoch-zero"),
        in: etc)
    // Hard links: one node, three names in two directories.
    let shared = t.add(file(b("linked content\n"), 0o600), as: b("hard-a"), in: etc)
    t.link(shared, as: b("hard-c"), in: etc)
    let sub = t.add(.directory(permissions: 0o700, uid: 12, gid: 34, modificationTime: base), as: b("sub"), in: etc)
    t.link(shared, as: b("hard-b"), in: sub)
    let emptyLinked = t.add(file([]), as: b("empty-linked-1"), in: sub)
    t.link(emptyLinked, as: b("empty-linked-2"), in: sub)
    // Symlinks: short, inline-long, longest (its own block).
    t.add(ErofsNode(.symlink(b("../etc/one")), permissions: 0o777, modificationTime: base), as: b("link"), in: etc)
    t.add(
        ErofsNode(
            .symlink(Array(repeating: UInt8(ascii: "a"), count: 3000)), permissions: 0o777, modificationTime: base),
        as: b("link-3000"), in: etc)
    t.add(
        ErofsNode(
            .symlink((0..<4095).map { UInt8(ascii: $0 % 64 == 63 ? "/" : "b") }), permissions: 0o777,
            modificationTime: base, xattrs: [xattr("trusted.overlay.redirect", b("/ab/cdef0123456789"))]),
        as: b("link-4095"), in: etc)
    // Special files.
    let dev = t.add(.directory(modificationTime: base), as: b("dev"), in: root)
    t.add(
        ErofsNode(.characterDevice(rdev: (1 << 8) | 3), permissions: 0o666, modificationTime: base), as: b("null"),
        in: dev)
    t.add(
        ErofsNode(.blockDevice(rdev: (8 << 8) | 1), permissions: 0o660, gid: 6, modificationTime: base), as: b("sda1"),
        in: dev)
    // major 300, minor 70000 (glibc makedev).
    let bigDev: UInt64 = ((300 & 0xfff) << 8) | (70000 & 0xff) | ((70000 & ~0xff) << 12)
    t.add(ErofsNode(.characterDevice(rdev: bigDev), permissions: 0o600, modificationTime: base), as: b("big"), in: dev)
    t.add(ErofsNode(.characterDevice(rdev: 0), permissions: 0o000, modificationTime: base), as: b("whiteout"), in: dev)
    t.add(ErofsNode(.fifo, permissions: 0o644, modificationTime: base), as: b("fifo"), in: dev)
    t.add(ErofsNode(.socket, permissions: 0o755, modificationTime: base), as: b("socket"), in: dev)
    // Names: longest, not UTF-8, bytes sorting before and around "." and "..".
    let names = t.add(.directory(modificationTime: base), as: b("names"), in: root)
    for name in [
        Array(repeating: UInt8(ascii: "n"), count: 255), [0xff, 0xfe, 0x80, 0x2e], b("-dash"), b("+plus"), b(" space"),
        b("#hash"), b(".hidden"), b("..."), b(".a"), b("-"), [0x01], b("Z"), b("~"),
    ] {
        t.add(file(name.count < 100 ? name : b("long")), as: name, in: names)
    }
    // A directory of 5,000 entries: dirents over many blocks.
    let many = t.add(.directory(permissions: 0o750, modificationTime: base), as: b("many"), in: root)
    for i in 0..<5000 {
        let name = b("entry-\(String(i * 7919 % 100_003, radix: 36))-" + String(repeating: "x", count: i % 40))
        t.add(
            file(i % 3 == 0 ? [] : b("\(i)\n"), time: i % 2 == 0 ? base : ts(1_650_000_000 + Int64(i))), as: name,
            in: many)
    }
    // Xattrs: every prefix, ACLs, capabilities, many on one inode, shared across inodes, a large value.
    let x = t.add(
        .directory(
            modificationTime: base,
            xattrs: [xattr("system.posix_acl_default", acl), xattr("user.dir", b("d"))]), as: b("xattrs"), in: root)
    t.add(
        file(
            b("#!/bin/sh\n"), 0o755,
            xattrs: [
                xattr("security.capability", fileCapability),
                xattr("security.selinux", b("system_u:object_r:bin_t:s0\0")),
                xattr("system.posix_acl_access", acl), xattr("trusted.overlay.metacopy", []),
                xattr("trusted.overlay.redirect", b("/ab/cdef0123456789")), xattr("user.empty", []),
                xattr("user.big", pseudoRandom(4000, seed: 9)),
            ]), as: b("all-prefixes"), in: x)
    t.add(
        file(b("many\n"), xattrs: (0..<200).map { xattr("user.attr\($0)", b("value \($0)")) }), as: b("many-xattrs"),
        in: x)
    for i in 0..<50 {
        t.add(
            file(
                b("s\(i)"),
                xattrs: [
                    xattr("trusted.overlay.metacopy", []), xattr("user.shared", b("same value for all")),
                    xattr("trusted.overlay.redirect", b("/\(String(format: "%02x", i))/0123456789ab")),
                ]), as: b("shared-\(i)"), in: x)
    }
    // External files: content in a data-only layer, a hole here.
    let ext = t.add(.directory(modificationTime: base), as: b("external"), in: root)
    for (name, size) in [("one-byte", UInt64(1)), ("page", 4096), ("odd", 12345), ("five-gib", 5 << 30), ("empty", 0)] {
        t.add(
            ErofsNode(
                .file(.external(size: size)), permissions: 0o644, uid: 1000, gid: 1000, modificationTime: base,
                xattrs: [xattr("trusted.overlay.metacopy", []), xattr("trusted.overlay.redirect", b("/00/\(name)"))]),
            as: b(name), in: ext)
    }
    return t
}

// MARK: manifests: the description and a mounted tree, in one form

private let sha256Limit: UInt64 = 64 << 20

private func hex(_ bytes: some Sequence<UInt8>) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

private func xattrText(_ xs: [ExtendedAttribute]) -> String {
    xs.sorted { $0.name.lexicographicallyPrecedes($1.name) }.map { escapedPath($0.name) + "=" + hex($0.value) }
        .joined(separator: ",")
}

private func typeLetter(_ mode: UInt32) -> String {
    switch mode & 0o170000 {
    case 0o040000: return "d"
    case 0o100000: return "f"
    case 0o120000: return "l"
    case 0o020000: return "c"
    case 0o060000: return "b"
    case 0o010000: return "p"
    default: return "s"
    }
}

/// The content column: the SHA-256 of up to 64 MiB, else "zeros:SIZE" for a hole read as zeros.
private func contentColumn(size: UInt64, read: () throws -> [UInt8]?) rethrows -> String {
    if size > sha256Limit { return try read() == nil ? "unreadable" : "zeros:\(size)" }
    guard let bytes = try read() else { return "unreadable" }
    return hex(SHA256.hash(data: bytes))
}

/// One line per path of the description: path, type, mode, owner, mtime, nlink, size,
/// content, xattrs, symlink target, rdev, first name of its hard-link group.
func erofsManifest(of tree: ErofsTree) -> [String] {
    var firstName: [ErofsTree.NodeID: [UInt8]] = [:]
    var nlink: [ErofsTree.NodeID: Int] = [:]
    tree.forEachPath { path, id in
        nlink[id, default: 0] += 1
        if firstName[id].map({ path.lexicographicallyPrecedes($0) }) ?? true { firstName[id] = path }
    }
    func line(_ path: [UInt8], _ id: ErofsTree.NodeID) -> String {
        let n = tree[id]
        var links = nlink[id] ?? 1
        var size = "-"
        var content = "-"
        var target = "-"
        var rdev = "-"
        switch n.kind {
        case .directory(let entries):
            links = 2 + entries.filter { tree[$0.node].isDirectory }.count
        case .file(.inline(let bytes)):
            size = "\(bytes.count)"
            content = contentColumn(size: UInt64(bytes.count)) { bytes }
        case .file(.external(let s)):
            size = "\(s)"
            content = s > sha256Limit ? "zeros:\(s)" : contentColumn(size: s) { [UInt8](repeating: 0, count: Int(s)) }
        case .symlink(let t):
            size = "\(t.count)"
            target = hex(t)
        case .characterDevice(let d), .blockDevice(let d):
            rdev = "\(major(d)):\(minor(d))"
        case .fifo, .socket:
            break
        }
        let link = links > 1 && !n.isDirectory ? escapedPath(firstName[id]!) : "-"
        return [
            path.isEmpty ? "/" : escapedPath(path), typeLetter(UInt32(n.mode)), String(n.permissions, radix: 8),
            "\(n.uid)",
            "\(n.gid)", n.modificationTime.description, "\(links)", size, content, xattrText(n.xattrs), target, rdev,
            link,
        ].joined(separator: " ")
    }
    var lines = [line([], ErofsTree.rootID)]
    tree.forEachPath { path, id in lines.append(line(path, id)) }
    return lines.sorted()
}

private func major(_ d: UInt64) -> UInt64 { ((d >> 8) & 0xfff) | ((d >> 32) & ~0xfff) }
private func minor(_ d: UInt64) -> UInt64 { (d & 0xff) | ((d >> 12) & ~0xff) }

/// The same lines for a mounted tree, read through the kernel with HashifySystem's calls.
func erofsManifest(ofMount path: String) throws -> [String] {
    let root = try Directory.open(path: FilePath(path))
    struct Item {
        var path: [UInt8]
        var st: FileStat
        var rest: String
    }
    var items: [Item] = []
    func describe(_ dir: Directory, _ name: FileName?, _ st: FileStat, _ rel: [UInt8]) throws -> Item {
        var size = "-"
        var content = "-"
        var target = "-"
        var rdev = "-"
        let xattrs: [ExtendedAttribute]
        if let name {
            xattrs = try extendedAttributes(in: dir, of: name)
        } else {
            xattrs = try dir.extendedAttributes()
        }
        switch st.fileType {
        case 0o100000:
            size = "\(st.size)"
            let f = try dir.openFileForReading(name!)
            content = try contentColumn(size: st.size) {
                if st.size <= sha256Limit { return try f.readAll() }
                // A hole: the first and last block read as zeros.
                var buf = [UInt8](repeating: 1, count: 4096)
                for offset in [0, st.size - 4096] {
                    let n = try buf.withUnsafeMutableBytes { try f.read(into: $0, at: offset) }
                    if n != 4096 || buf.contains(where: { $0 != 0 }) { return nil }
                }
                return []
            }
        case 0o120000:
            let t = try dir.readLink(name!)
            size = "\(st.size)"
            target = hex(t)
        case 0o020000, 0o060000:
            rdev = "\(major(st.deviceNumber)):\(minor(st.deviceNumber))"
        default:
            break
        }
        let rest = [
            typeLetter(st.mode), String(st.mode & 0o7777, radix: 8), "\(st.uid)", "\(st.gid)",
            st.modificationTime.description, "\(st.linkCount)", size, content, xattrText(xattrs), target, rdev,
        ].joined(separator: " ")
        return Item(path: rel, st: st, rest: rest)
    }
    items.append(try describe(root, nil, try root.stat(), []))
    var pending: [(Directory, [UInt8])] = [(root, [])]
    while let (dir, rel) = pending.popLast() {
        for name in try dir.entryNames().sorted() {
            let st = try dir.stat(name)
            let childPath = rel.isEmpty ? name.bytes : rel + [UInt8(ascii: "/")] + name.bytes
            items.append(try describe(dir, name, st, childPath))
            if st.isDirectory { pending.append((try dir.openDirectory(name), childPath)) }
        }
    }
    var firstName: [UInt64: [UInt8]] = [:]
    for item in items where !item.st.isDirectory {
        if firstName[item.st.inode].map({ item.path.lexicographicallyPrecedes($0) }) ?? true {
            firstName[item.st.inode] = item.path
        }
    }
    return items.map { item in
        let link = item.st.linkCount > 1 && !item.st.isDirectory ? escapedPath(firstName[item.st.inode]!) : "-"
        return (item.path.isEmpty ? "/" : escapedPath(item.path)) + " " + item.rest + " " + link
    }.sorted()
}

// MARK: images, mounts

/// Writes the image of `tree` to `path` through `ErofsWriter.write(_:to:)` (pwrite on a descriptor).
@discardableResult
func writeErofsImage(_ tree: ErofsTree, to path: String, options: ErofsWriter.Options = .init()) throws
    -> ErofsWriter.Summary
{
    let dir = try Directory.open(path: FilePath((path as NSString).deletingLastPathComponent))
    let file = try dir.createFile(FileName((path as NSString).lastPathComponent), mode: 0o644)
    return try ErofsWriter.write(tree, to: file, options: options)
}

/// Reads an image both ways (positioned reads on the file, and whole in
/// memory as the fold reads it) and expects the same outcome of each.
func readErofsImage(_ path: String) throws -> ErofsTree {
    let dir = try Directory.open(path: FilePath((path as NSString).deletingLastPathComponent))
    let name = FileName((path as NSString).lastPathComponent)
    let fromFile = Result { try ErofsReader.read(from: dir.openFileForReading(name)) }
    let inMemory = Result { try ErofsReader.read(image: dir.openFileForReading(name).readAll()) }
    switch (fromFile, inMemory) {
    case (.success(let a), .success(let b)): #expect(a == b, "\(path): read in memory differs")
    case (.failure(let a), .failure(let b)): #expect("\(a)" == "\(b)", "\(path): refused differently in memory")
    default: Issue.record("\(path): read from the file \(fromFile), in memory \(inMemory)")
    }
    return try fromFile.get()
}

let hasFsckErofs = FileManager.default.isExecutableFile(atPath: "/usr/bin/fsck.erofs")

/// Whether the running kernel mounts EROFS (built in or as a module).
let kernelHasErofs: Bool = {
    if run(["/bin/cat", "/proc/filesystems"]).out.contains("erofs") { return true }
    _ = run(["/sbin/modprobe", "erofs"])
    return run(["/bin/cat", "/proc/filesystems"]).out.contains("erofs")
}()

/// A loop device attached read-only to `image`, detached by `detach()`.
struct LoopDevice {
    let path: String
    init?(image: String) {
        let r = run(["/sbin/losetup", "-f", "--show", "-r", image])
        guard r.status == 0 else { return nil }
        path = r.out.trimmingCharacters(in: .whitespacesAndNewlines)
    }
    func detach() { _ = run(["/sbin/losetup", "-d", path]) }
}

// MARK: tests

@Suite("EROFS images: written from a description, read back, checked by fsck.erofs and the kernel", .serialized)
struct ErofsImageTests {
    @Test("reader(writer(tree)) is the tree, the same tree gives the same bytes, the fd and in-memory writers agree")
    func roundTrip() throws {
        let s = Scratch("erofs")
        let tree = richErofsTree()
        let image = try ErofsWriter.image(of: tree)
        #expect(try ErofsWriter.image(of: tree) == image)
        // The same tree built in another order writes the same bytes.
        #expect(try ErofsWriter.image(of: tree.canonicalized()) == image)
        let summary = try writeErofsImage(tree, to: s.sub("rich.img"))
        let written = try Array(Data(contentsOf: URL(fileURLWithPath: s.sub("rich.img"))))
        #expect(written == image)
        #expect(summary.imageBytes == UInt64(image.count))
        #expect(image.count % 4096 == 0)
        let back = try readErofsImage(s.sub("rich.img"))
        #expect(back == tree.canonicalized())
        if back != tree.canonicalized() {
            let d = manifestDiff(
                erofsManifest(of: tree).joined(separator: "\n"), erofsManifest(of: back).joined(separator: "\n"))
            Issue.record("round trip differs:\n\(d.prefix(4000))")
        }
        print(
            "rich tree: \(summary.inodes) inodes (\(summary.compactInodes) compact), \(summary.sharedXattrs) shared xattrs, "
                + "\(summary.metadataBytes) bytes of metadata, \(summary.imageBytes) bytes in all")
    }

    @Test("a path looked up in the image (reading only the inodes on the way) is the tree's node at that path")
    func lookupByPath() throws {
        let s = Scratch("erofslookup")
        let tree = richErofsTree().canonicalized()
        _ = try writeErofsImage(tree, to: s.sub("rich.img"))
        let dir = try Directory.open(path: FilePath(s.path))
        let reader = try ErofsReader(file: try dir.openFileForReading(FileName("rich.img")))
        var paths: [([UInt8], ErofsTree.NodeID)] = []
        tree.forEachPath { path, id in paths.append((path, id)) }
        for (path, id) in paths {
            var expected = tree[id]
            if expected.isDirectory { expected.kind = .directory([]) }
            #expect(try reader.node(atPath: path) == expected, "\(String(decoding: path, as: UTF8.self))")
        }
        #expect(paths.count > 10)
        #expect(try reader.node(atPath: Array("no/such/path".utf8)) == nil)
    }

    @Test("a description the format cannot hold is refused with a reason")
    func invalidTrees() throws {
        var linkedDirectory = ErofsTree(root: .directory())
        let d = linkedDirectory.add(.directory(), as: b("d"), in: ErofsTree.rootID)
        linkedDirectory.link(d, as: b("e"), in: ErofsTree.rootID)
        var badName = ErofsTree(root: .directory())
        badName.add(.directory(), as: b("a/b"), in: ErofsTree.rootID)
        var longName = ErofsTree(root: .directory())
        longName.add(.directory(), as: Array(repeating: 0x61, count: 256), in: ErofsTree.rootID)
        var twice = ErofsTree(root: .directory())
        twice.add(.directory(), as: b("x"), in: ErofsTree.rootID)
        twice.add(ErofsNode(.fifo, permissions: 0o644), as: b("x"), in: ErofsTree.rootID)
        let badXattr = ErofsTree(root: .directory(xattrs: [xattr("system.other", [])]))
        var badLink = ErofsTree(root: .directory())
        badLink.add(ErofsNode(.symlink(Array(repeating: 0x61, count: 4096)), permissions: 0o777), as: b("l"), in: 0)
        for (tree, reason) in [
            (linkedDirectory, "more than one name"), (badName, "not a valid file name"),
            (longName, "not a valid file name"),
            (twice, "two entries"), (badXattr, "no EROFS prefix"), (badLink, "symlink target"),
        ] {
            #expect {
                try ErofsWriter.image(of: tree)
            } throws: { error in
                "\(error)".contains(reason)
            }
        }
    }

    @Test("fsck.erofs accepts the image, with and without the superblock checksum")
    func fsckAccepts() throws {
        guard hasFsckErofs else {
            print("skipped: fsck.erofs is not installed (apt-get install erofs-utils)")
            return
        }
        let s = Scratch("erofs")
        for checksum in [true, false] {
            try writeErofsImage(richErofsTree(), to: s.sub("rich.img"), options: .init(checksum: checksum))
            // fsck.erofs 1.5 exits 0 after some errors (a bad checksum): its "<E>" lines count too.
            let r = run(["/usr/bin/fsck.erofs", "-d3", s.sub("rich.img")])
            #expect(r.status == 0 && !(r.out + r.err).contains("<E>"), "fsck.erofs: \(r.out) \(r.err)")
            #expect((r.out + r.err).contains("No errors found"))
            print(
                "fsck.erofs (checksum \(checksum)): \((r.out + r.err).trimmingCharacters(in: .whitespacesAndNewlines))")
            _ = run(["/bin/rm", "-f", s.sub("rich.img")])
        }
        // A flipped byte in the first block fails the checksum (the kernel and the reader refuse it).
        try writeErofsImage(richErofsTree(), to: s.sub("bad.img"))
        let f = open(s.sub("bad.img"), O_RDWR)
        var byte: UInt8 = 0x5a
        pwrite(f, &byte, 1, 1200)
        close(f)
        #expect(throws: ErofsImageError.self) { try readErofsImage(s.sub("bad.img")) }
        let bad = run(["/usr/bin/fsck.erofs", s.sub("bad.img")])
        #expect((bad.out + bad.err).contains("chksum"), "fsck.erofs: \(bad.out) \(bad.err)")
    }

    @Test(
        "the kernel mounts the image (file-backed and through a loop device) and shows exactly the description",
        .enabled(if: isRoot, "mounting needs root"))
    func kernelShowsTheDescription() throws {
        guard kernelHasErofs else {
            print("skipped: this kernel has no EROFS")
            return
        }
        let s = Scratch("erofs")
        let tree = richErofsTree()
        try writeErofsImage(tree, to: s.sub("rich.img"))
        let expected = erofsManifest(of: tree)
        let mnt = s.sub("mnt")
        mkdirs(mnt)
        let fileBacked = run(["/bin/mount", "-t", "erofs", "-o", "ro", s.sub("rich.img"), mnt])
        if fileBacked.status == 0 {
            defer { unmount(mnt) }
            let seen = try erofsManifest(ofMount: mnt)
            #expect(
                seen == expected,
                "\(manifestDiff(expected.joined(separator: "\n"), seen.joined(separator: "\n")).prefix(6000))")
        } else {
            print("file-backed EROFS mount failed (kernel before 6.12?): \(fileBacked.err)")
        }
        // The kernel checks the superblock checksum: one flipped byte in the first block and it refuses the image.
        let bad = try ErofsWriter.image(of: tree)
        var flipped = bad
        flipped[1200] ^= 0x5a
        try Data(flipped).write(to: URL(fileURLWithPath: s.sub("bad.img")))
        if let loop = LoopDevice(image: s.sub("bad.img")) {
            let r = run(["/bin/mount", "-t", "erofs", "-o", "ro", loop.path, mnt])
            if r.status == 0 { unmount(mnt) }
            loop.detach()
            #expect(r.status != 0, "the kernel mounted an image whose checksum does not match")
        }
        guard let loop = LoopDevice(image: s.sub("rich.img")) else {
            Issue.record("losetup could not attach the image")
            return
        }
        defer { loop.detach() }
        let r = run(["/bin/mount", "-t", "erofs", "-o", "ro", loop.path, mnt])
        #expect(r.status == 0, "mount \(loop.path): \(r.err)")
        guard r.status == 0 else { return }
        defer { unmount(mnt) }
        let seen = try erofsManifest(ofMount: mnt)
        #expect(
            seen == expected,
            "\(manifestDiff(expected.joined(separator: "\n"), seen.joined(separator: "\n")).prefix(6000))")
    }
}

// MARK: a real guest

/// A real root filesystem to describe: the corpus guest g01 when this
/// checkout has the corpus (or HASHIFY_EROFS_GUEST names one), else a small
/// tree copied from this machine's /etc, /usr/bin and /usr/share/doc with a
/// hard link, a FIFO, a device node and an xattr added.
private func realGuest(_ s: Scratch) -> String {
    let candidates = [
        ProcessInfo.processInfo.environment["HASHIFY_EROFS_GUEST"],
        packageRoot.appendingPathComponent("bench/.corpus/guests/g01").path,
    ].compactMap { $0 }
    if let corpus = candidates.first(where: { FileManager.default.fileExists(atPath: $0 + "/etc") }) { return corpus }
    let root = s.sub("guest")
    mkdirs(root + "/usr/share")
    for (from, to) in [("/etc", "/etc"), ("/usr/bin", "/usr/bin"), ("/usr/share/doc", "/usr/share/doc")] {
        _ = run(["/bin/cp", "-a", "--one-file-system", from, root + to])
    }
    writeFile(root + "/usr/lib/linked", "a file with two names\n", xattrs: [("user.origin", Array("test".utf8))])
    link(root + "/usr/lib/linked", root + "/usr/lib/linked-too")
    mkfifo(root + "/usr/lib/fifo", 0o644)
    mknod(root + "/usr/lib/null", S_IFCHR | 0o666, dev_t((1 << 8) | 3))
    return root
}

/// The overlay stub's redirect for content: "/" + 2 hex digits + "/" + the next 12 of its SHA-256.
private func objectRedirect(_ content: [UInt8]) -> String {
    let h = hex(SHA256.hash(data: content))
    return "/" + h.prefix(2) + "/" + h.dropFirst(2).prefix(12)
}

extension ErofsImageTests {
    @Test(
        "a real guest as composefs lays it out: files of at most 64 bytes inline, the rest stubs into a data-only layer; overlayfs over the mounted image (with and without index=on) shows the guest as it is",
        .enabled(if: isRoot, "mounting needs root"))
    func realGuestThroughOverlay() throws {
        guard kernelHasErofs else {
            print("skipped: this kernel has no EROFS")
            return
        }
        let s = Scratch("erofs-guest")
        let guest = realGuest(s)
        let data = s.sub("data")
        mkdirs(data)
        let dataDir = try Directory.open(path: FilePath(data))
        var stubs = 0
        let started = MonotonicInstant.now()
        let tree = try ErofsTree(directory: Directory.open(path: FilePath(guest))) { _, st, file in
            guard st.size > 64 else { return .inline }
            let content = try file.readAll()
            let redirect = objectRedirect(content)
            let parts = redirect.split(separator: "/").map(String.init)
            if (try? dataDir.stat(FileName(parts[0]))) == nil {
                try dataDir.makeDirectory(FileName(parts[0]), mode: 0o755)
            }
            let bucket = try dataDir.openDirectory(FileName(parts[0]))
            if (try? bucket.stat(FileName(parts[1]))) == nil {
                try bucket.createFile(FileName(parts[1]), mode: 0o644).write(content)
            }
            stubs += 1
            return .external(addingXattrs: [
                ExtendedAttribute(name: b("trusted.overlay.metacopy"), value: []),
                ExtendedAttribute(name: b("trusted.overlay.redirect"), value: b(redirect)),
            ])
        }
        let described = started.secondsElapsed
        let image = s.sub("guest.img")
        let writeStarted = MonotonicInstant.now()
        let summary = try writeErofsImage(tree, to: image)
        let written = writeStarted.secondsElapsed
        var paths = 0
        tree.forEachPath { _, _ in paths += 1 }
        print(
            "real guest \(guest): \(paths) paths, \(summary.inodes) inodes (\(summary.compactInodes) compact), \(stubs) stubs, "
                + "\(summary.sharedXattrs) shared xattrs; image \(summary.imageBytes) bytes (\(summary.metadataBytes) metadata, "
                + "\(summary.dataBlocks) data blocks); \(summary.imageBytes / UInt64(max(paths, 1))) bytes per path; "
                + "described in \(String(format: "%.2f", described)) s, written in \(String(format: "%.3f", written)) s"
        )
        #expect(summary.imageBytes <= 2 << 20 || paths > 12_000, "over 2 MiB of metadata for \(paths) paths")

        // The reader gives the description back.
        #expect(try readErofsImage(image) == tree.canonicalized())
        if hasFsckErofs {
            let r = run(["/usr/bin/fsck.erofs", "-d3", image])
            #expect(r.status == 0 && !(r.out + r.err).contains("<E>"), "fsck.erofs: \(r.out) \(r.err)")
            print("fsck.erofs of the guest image: \((r.out + r.err).trimmingCharacters(in: .whitespacesAndNewlines))")
            // What one stub costs, as dump.erofs reads it.
            var stubPath: [UInt8]? = nil
            tree.forEachPath { path, id in
                if stubPath == nil, case .file(.external) = tree[id].kind { stubPath = path }
            }
            if let stubPath, FileManager.default.isExecutableFile(atPath: "/usr/bin/dump.erofs") {
                let d = run(["/usr/bin/dump.erofs", "--path=/" + String(decoding: stubPath, as: UTF8.self), image])
                print("a stub as dump.erofs shows it: \(d.out.split(separator: "\n").joined(separator: " | "))")
            }
        }

        // The image mounted, the data directory as a data-only lower layer below it.
        let meta = s.sub("meta")
        let upper = s.sub("upper")
        let work = s.sub("work")
        let merged = s.sub("merged")
        for d in [meta, upper, work, merged] { mkdirs(d) }
        var loop: LoopDevice? = nil
        defer { loop?.detach() }
        if run(["/bin/mount", "-t", "erofs", "-o", "ro", image, meta]).status != 0 {
            loop = LoopDevice(image: image)
            guard let loop else {
                Issue.record("cannot attach a loop device")
                return
            }
            let r = run(["/bin/mount", "-t", "erofs", "-o", "ro", loop.path, meta])
            guard r.status == 0 else {
                Issue.record("cannot mount the image: \(r.err)")
                return
            }
        }
        defer { unmount(meta) }
        // The merged root's mode, owner and time come from the upper directory: the guest root's.
        let rootStat = try Directory.open(path: FilePath(guest)).stat()
        let upperDir = try Directory.open(path: FilePath(upper))
        try upperDir.changeOwner(uid: rootStat.uid, gid: rootStat.gid)
        try upperDir.changeMode(rootStat.mode)
        try upperDir.setModificationTime(rootStat.modificationTime)
        let options = "lowerdir=\(meta)::\(data),upperdir=\(upper),workdir=\(work),redirect_dir=on,metacopy=on"
        let r = run(["/bin/mount", "-t", "overlay", "overlay", "-o", options, merged])
        guard r.status == 0 else {
            Issue.record("overlay mount with a data-only layer failed: \(r.err)")
            return
        }
        defer { unmount(merged) }
        try upperDir.setModificationTime(rootStat.modificationTime)
        // manifest.py's first line names the root it read.
        func body(_ m: String) -> String {
            m.split(separator: "\n").filter { !$0.hasPrefix("# ") }.joined(separator: "\n")
        }
        let want = body(manifest([guest], links: true))
        let seen = body(manifest([merged], links: true))
        #expect(want == seen, "\(manifestDiff(want, seen).prefix(6000))")
        #expect(want.split(separator: "\n").count == paths + 1)

        // With index=on (hard links stay whole across copy-up), over a fresh upper and work directory.
        unmount(merged)
        let upper2 = s.sub("upper2")
        let work2 = s.sub("work2")
        for d in [upper2, work2] { mkdirs(d) }
        let upper2Dir = try Directory.open(path: FilePath(upper2))
        try upper2Dir.changeOwner(uid: rootStat.uid, gid: rootStat.gid)
        try upper2Dir.changeMode(rootStat.mode)
        let indexed =
            "lowerdir=\(meta)::\(data),upperdir=\(upper2),workdir=\(work2),redirect_dir=on,metacopy=on,index=on"
        let ri = run(["/bin/mount", "-t", "overlay", "overlay", "-o", indexed, merged])
        #expect(
            ri.status == 0, "overlay with index=on over the image: \(ri.err) \(run(["/bin/dmesg"]).out.suffix(600))")
        if ri.status == 0 {
            try upper2Dir.setModificationTime(rootStat.modificationTime)
            let seenIndexed = body(manifest([merged], links: true))
            #expect(want == seenIndexed, "\(manifestDiff(want, seenIndexed).prefix(3000))")
        }
    }

    @Test(
        "the reader reads what mkfs.erofs makes (plain and with -E noinline_data)", .enabled(if: isRoot, "needs root"))
    func readsMkfsImages() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/mkfs.erofs") else {
            print("skipped: mkfs.erofs is not installed (apt-get install erofs-utils)")
            return
        }
        let s = Scratch("erofs-mkfs")
        let source = s.sub("src")
        makeGuest(source, index: 1)
        writeFile(
            source + "/etc/xattrs", "x\n",
            xattrs: [("user.one", [1]), ("trusted.two", [2, 2]), ("security.three", [])])
        writeFile(source + "/usr/share/big", pseudoRandom(3 * 4096 + 100, seed: 3))
        link(source + "/usr/share/big", source + "/usr/share/big-link")
        mkdirs(source + "/many")
        for i in 0..<600 { writeFile(source + "/many/file-\(i)", "\(i)\n", xattrs: [("user.same", Array("v".utf8))]) }
        symlink(String(repeating: "t", count: 4000), source + "/etc/long-link")
        settleDirectoryTimes(source)
        let expected = try ErofsTree(directory: Directory.open(path: FilePath(source))) { _, _, _ in .inline }
        for extra in [[], ["-Enoinline_data"]] {
            let image = s.sub("mkfs.img")
            let r = run(["/usr/bin/mkfs.erofs", "--quiet"] + extra + [image, source])
            #expect(r.status == 0, "mkfs.erofs: \(r.err)")
            var back = try readErofsImage(image)
            // mkfs.erofs keeps the source's mtimes but for the root's (its build time).
            back[ErofsTree.rootID].modificationTime = expected[ErofsTree.rootID].modificationTime
            #expect(back == expected.canonicalized(), "mkfs.erofs \(extra)")
            if back != expected.canonicalized() {
                let d = manifestDiff(
                    erofsManifest(of: expected).joined(separator: "\n"), erofsManifest(of: back).joined(separator: "\n")
                )
                Issue.record("\(extra):\n\(d.prefix(4000))")
            }
            _ = run(["/bin/rm", "-f", image])
        }
    }
}

extension ErofsImageTests {
    @Test("an entry name holding a slash or a NUL is a damaged image, refused as one by the reader")
    func slashOrNulInName() throws {
        let s = Scratch("erofs-names")
        var tree = ErofsTree(root: .directory())
        tree.add(ErofsNode(.file(.inline(b("x"))), permissions: 0o644), as: b("aqz"), in: ErofsTree.rootID)
        let image = try ErofsWriter.image(of: tree, options: .init(checksum: false))
        let at = try #require(image.indices.first { image[$0...].starts(with: b("aqz")) })
        for byte: UInt8 in [0x2f, 0] {
            var damaged = image
            damaged[at + 1] = byte
            try Data(damaged).write(to: URL(fileURLWithPath: s.sub("bad.img")))
            let error = #expect(throws: ErofsImageError.self) { try readErofsImage(s.sub("bad.img")) }
            #expect("\(error.map { "\($0)" } ?? "")".hasSuffix("an entry name holds a slash or a NUL"))
        }
    }

    @Test("a corrupt image is an error, never a crash: 2,000 single-byte flips of the metadata, each read whole")
    func corruptImagesThrow() throws {
        let s = Scratch("erofs-fuzz")
        var small = ErofsTree(root: .directory(xattrs: [xattr("user.root", b("r"))]))
        let d = small.add(.directory(), as: b("dir"), in: ErofsTree.rootID)
        for i in 0..<40 {
            let content: ErofsFileContent =
                i % 2 == 0 ? .inline(pseudoRandom(i * 300, seed: UInt64(i))) : .external(size: 1 << i)
            small.add(
                ErofsNode(
                    .file(content), permissions: 0o644, modificationTime: ts(Int64(i % 3)),
                    xattrs: [xattr("trusted.overlay.metacopy", []), xattr("user.n", b("\(i % 5)"))]), as: b("f\(i)"),
                in: d)
        }
        small.add(ErofsNode(.symlink(b("target")), permissions: 0o777), as: b("l"), in: d)
        let image = try ErofsWriter.image(of: small, options: .init(checksum: false))
        let metadata = try ErofsWriter.summary(of: small, options: .init(checksum: false)).metadataBytes
        try Data(image).write(to: URL(fileURLWithPath: s.sub("bad.img")))
        let fd = open(s.sub("bad.img"), O_WRONLY)
        defer { close(fd) }
        var x: UInt64 = 0x1234_5678
        var failures = 0
        for _ in 0..<2000 {
            x ^= x << 13
            x ^= x >> 7
            x ^= x << 17
            let at = 1024 + Int(x % UInt64(metadata - 1024))
            var byte = image[at] ^ (UInt8(truncatingIfNeeded: x >> 32) | 1)
            pwrite(fd, &byte, 1, off_t(at))
            do { _ = try readErofsImage(s.sub("bad.img")) } catch is ErofsImageError { failures += 1 }
            byte = image[at]
            pwrite(fd, &byte, 1, off_t(at))
        }
        print("2000 corrupt images: \(failures) refused, the rest read as some tree")
        #expect(failures > 0)
    }

    @Test(
        "100,000 paths: written, read back and fsck'ed in seconds; an inode record per stub as small as the format allows"
    )
    func hundredThousandPaths() throws {
        let s = Scratch("erofs-big")
        var tree = ErofsTree(root: .directory(modificationTime: ts(1_700_000_000)))
        for d in 0..<1000 {
            let dir = tree.add(.directory(modificationTime: ts(1_700_000_000)), as: b("dir-\(d)"), in: ErofsTree.rootID)
            for f in 0..<99 {
                let redirect = String(format: "/%02x/%012x", (d * 99 + f) % 256, d * 99 + f)
                tree.add(
                    ErofsNode(
                        .file(.external(size: UInt64(1000 + f))), permissions: 0o644,
                        modificationTime: ts(f % 4 == 0 ? 1_690_000_000 + Int64(f) : 1_700_000_000),
                        xattrs: [xattr("trusted.overlay.metacopy", []), xattr("trusted.overlay.redirect", b(redirect))]),
                    as: b("file-\(f).so"), in: dir)
            }
        }
        let started = MonotonicInstant.now()
        let summary = try writeErofsImage(tree, to: s.sub("big.img"))
        let written = started.secondsElapsed
        let readStarted = MonotonicInstant.now()
        let back = try readErofsImage(s.sub("big.img"))
        let read = readStarted.secondsElapsed
        #expect(back == tree.canonicalized())
        print(
            "100,000 paths: image \(summary.imageBytes) bytes, \(summary.inodes) inodes (\(summary.compactInodes) compact), "
                + "\(summary.imageBytes / 100_000) bytes per path; written in \(String(format: "%.2f", written)) s, "
                + "read back in \(String(format: "%.2f", read)) s")
        // A stub: a 32-byte inode (64 with its own mtime), a 12-byte xattr header, a 4-byte id of the shared
        // metacopy, its redirect (4 + 16 + 16 bytes), a 4-byte chunk map: 88 (120) bytes on 32-byte slots.
        #expect(summary.metadataBytes <= 100_000 * (128 + 12 + 12) + 4096 * 1000)
        if hasFsckErofs {
            let r = run(["/usr/bin/fsck.erofs", "-d3", s.sub("big.img")])
            #expect(r.status == 0 && !(r.out + r.err).contains("<E>"), "fsck.erofs: \(r.out) \(r.err)")
        }
    }
}

@Test("XXH32, the hash of EROFS's xattr name filter, gives libxxhash's values")
func xxh32ReferenceValues() {
    // Reference values from libxxhash 0.8 (XXH32(data, length, seed)).
    for (text, seed, value): (String, UInt32, UInt32) in [
        ("", 0, 0x02CC_5D05), ("a", 0, 0x550D_7456), ("abc", 0, 0x32D1_53FF),
        ("Nobody inspects the spammish repetition", 0, 0xE229_3B2F),
        ("overlay.redirect", 0x25BB_E08F + 4, 0x887E_C271), ("", 0x25BB_E08F + 2, 0x0857_597E),
    ] {
        #expect(XXH32.hash(Array(text.utf8), seed: seed) == value, "\(text)")
    }
}
