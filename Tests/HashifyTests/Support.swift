import CHashifyShim
import ErofsImage
import Foundation
import HashifyEngine
import HashifySystem
import Synchronization
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The package root (tests find the built binary and bench/manifest.py from it).
let packageRoot: URL = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()

/// The hashify binary built with the tests. The commands the tests run keep
/// the host's list of stores (`STATE_DIRECTORY`) in the build directory, not in /var/lib/hashify.
let hashifyBinary: String = {
    let state = packageRoot.appendingPathComponent(".build/test-state").path
    try? FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true)
    setenv("STATE_DIRECTORY", state, 1)
    let candidates = [
        Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("hashify").path,
        packageRoot.appendingPathComponent(".build/debug/hashify").path,
    ]
    return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[1]
}()

let isRoot = getuid() == 0

/// A scratch directory under /var/tmp, removed (with everything in it) on deinit.
final class Scratch {
    let path: String
    init(_ tag: String = "t") {
        var template = Array("/var/tmp/hashify-test-\(tag).XXXXXX".utf8CString)
        _ = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
    deinit {
        unmountAll(under: path)
        _ = run(["/bin/rm", "-rf", "--one-file-system", path])
    }
    func sub(_ p: String) -> String { path + "/" + p }
}

/// Runs a program; returns (status, stdout, stderr).
@discardableResult
func run(_ argv: [String], input: String? = nil) -> (status: Int32, out: String, err: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: argv[0])
    p.arguments = Array(argv.dropFirst())
    let o = Pipe()
    let e = Pipe()
    p.standardOutput = o
    p.standardError = e
    p.standardInput = FileHandle.nullDevice
    do { try p.run() } catch { return (127, "", "\(error)") }
    // Both pipes drained at once: a program that fills one while the other is read would block forever.
    nonisolated(unsafe) var ed = Data()
    let stderrRead = DispatchGroup()
    DispatchQueue.global().async(group: stderrRead) { ed = e.fileHandleForReading.readDataToEndOfFile() }
    let od = o.fileHandleForReading.readDataToEndOfFile()
    stderrRead.wait()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: od, as: UTF8.self), String(decoding: ed, as: UTF8.self))
}

/// Runs the hashify binary.
@discardableResult
func hashify(_ args: [String]) -> (status: Int32, out: String, err: String) {
    let r = run([hashifyBinary] + args)
    if let i = args.firstIndex(of: "--store"), i + 1 < args.count { checkImages(store: args[i + 1]) }
    return r
}

/// hashify with a list of stores of its own (`STATE_DIRECTORY` in `state`): a test that damages
/// that list, or a list of guests of a store it names, must not damage what the suite's other
/// tests, running at the same time, read (every unify reads the lists of guests of the stores listed).
func hashify(state: String, _ args: [String]) -> (status: Int32, out: String, err: String) {
    run(["/usr/bin/env", "STATE_DIRECTORY=\(state)", hashifyBinary] + args)
}

/// Images fsck.erofs has accepted already (path, inode, size, mtime).
private let checkedImages = Mutex<Set<String>>([])

/// Runs fsck.erofs (erofs-utils) over every overlay image of a store that
/// it has not checked yet: every image the suite makes must be one it
/// accepts. (Skipped where erofs-utils is not installed; CI installs it.)
func checkImages(store: String) {
    guard FileManager.default.isExecutableFile(atPath: "/usr/bin/fsck.erofs") else { return }
    let records = "\(store)/overlay"
    for id in (try? FileManager.default.contentsOfDirectory(atPath: records)) ?? [] {
        for gen in (try? FileManager.default.contentsOfDirectory(atPath: "\(records)/\(id)")) ?? []
        where gen.hasPrefix("g") {
            let image = "\(records)/\(id)/\(gen)/meta.erofs"
            var st = stat()
            guard lstat(image, &st) == 0 else { continue }
            let key = "\(image) \(st.st_ino) \(st.st_size) \(st.st_mtim.tv_sec) \(st.st_mtim.tv_nsec)"
            guard checkedImages.withLock({ $0.insert(key).inserted }) else { continue }
            // An image a test damaged on purpose no longer matches the SHA-256 hashify wrote beside it.
            let digest = (try? String(contentsOfFile: image + ".sha256", encoding: .utf8)) ?? ""
            if !run(["/usr/bin/sha256sum", image]).out.hasPrefix(digest.trimmingCharacters(in: .newlines)) {
                continue
            }
            let r = run(["/usr/bin/fsck.erofs", image])
            // A fold or gc may have removed it meanwhile: only an image still there counts.
            if r.status != 0 && lstat(image, &st) == 0 {
                Issue.record("fsck.erofs refuses \(image): \(r.out) \(r.err)")
            }
        }
    }
}

/// Parses a --json report.
func jsonReport(_ out: String) -> [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [String: Any] ?? [:]
}

func totals(_ out: String) -> [String: Any] { jsonReport(out)["totals"] as? [String: Any] ?? [:] }

/// The full manifest of roots from bench/manifest.py: an oracle independent
/// of the engine (path, type, sha256, mode, uid, gid, mtime ns, xattrs,
/// symlink target, device numbers; directory mtimes included).
func manifest(_ roots: [String], inodes: Bool = false, links: Bool = false) -> String {
    let r = run(
        ["/usr/bin/python3", packageRoot.appendingPathComponent("bench/manifest.py").path]
            + (inodes ? ["--inodes"] : []) + (links ? ["--links"] : []) + roots)
    precondition(r.status == 0, "manifest.py failed: \(r.err)")
    return r.out
}

// MARK: building trees

func mkdirs(_ path: String, mode: mode_t = 0o755) {
    var cur = ""
    for comp in path.split(separator: "/") {
        cur += "/" + comp
        mkdir(cur, mode)
    }
}

/// Writes a file with content and attributes (path-based: test trees only).
func writeFile(
    _ path: String, _ content: [UInt8], mode: mode_t = 0o644, uid: uid_t = 0, gid: gid_t = 0,
    mtime: Int64 = 1_700_000_000, mtimeNsec: Int = 123_456_789, xattrs: [(String, [UInt8])] = []
) {
    mkdirs((path as NSString).deletingLastPathComponent)
    let fd = open(path, O_WRONLY | O_CLOEXEC | O_CREAT | O_TRUNC, 0o600)
    precondition(fd >= 0, "open \(path): \(errno)")
    content.withUnsafeBytes { _ = write(fd, $0.baseAddress, $0.count) }
    if isRoot { fchown(fd, uid, gid) }
    fchmod(fd, mode)
    for (n, v) in xattrs { v.withUnsafeBytes { _ = hashify_fsetxattr(fd, n, $0.baseAddress, $0.count) } }
    var ts = [timespec(tv_sec: 0, tv_nsec: Int(HASHIFY_UTIME_OMIT)), timespec(tv_sec: Int(mtime), tv_nsec: mtimeNsec)]
    futimens(fd, &ts)
    close(fd)
}

func writeFile(
    _ path: String, _ text: String, mode: mode_t = 0o644, uid: uid_t = 0, gid: gid_t = 0,
    mtime: Int64 = 1_700_000_000, xattrs: [(String, [UInt8])] = []
) {
    writeFile(path, Array(text.utf8), mode: mode, uid: uid, gid: gid, mtime: mtime, xattrs: xattrs)
}

/// Deterministic pseudo-random bytes.
func pseudoRandom(_ count: Int, seed: UInt64) -> [UInt8] {
    var x = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        return UInt8(truncatingIfNeeded: x)
    }
}

func inode(_ path: String) -> UInt64 {
    var st = stat()
    precondition(lstat(path, &st) == 0, "lstat \(path)")
    return UInt64(st.st_ino)
}

func linkCount(_ path: String) -> Int {
    var st = stat()
    precondition(lstat(path, &st) == 0, "lstat \(path)")
    return Int(st.st_nlink)
}

/// Sets directory mtimes of a tree to fixed values (so tests see if they change).
func settleDirectoryTimes(_ root: String) {
    _ = run(["/usr/bin/find", root, "-type", "d", "-exec", "touch", "-h", "-d", "@1600000000.5", "{}", "+"])
}

/// Waits past the coarse clock tick so that fresh files count as settled.
func settle() { usleep(30_000) }

/// A sample guest of typical content: shared binaries, a private file, a
/// symlink, a FIFO and (as root) a device node.
func makeGuest(_ root: String, index: Int, files: Int = 40) {
    for i in 0..<files {
        writeFile("\(root)/usr/lib/lib\(i).so", pseudoRandom(1000 + i * 37, seed: UInt64(i)), mode: 0o644)
    }
    writeFile("\(root)/usr/bin/tool", pseudoRandom(5000, seed: 99), mode: 0o755)
    writeFile("\(root)/usr/share/private-\(index)", "guest \(index) only\n")
    symlink("../lib/lib1.so", "\(root)/usr/bin/link")
    mkfifo("\(root)/usr/share/fifo", 0o644)
    if isRoot { mknod("\(root)/usr/share/null", S_IFCHR | 0o666, dev_t((1 << 8) | 3)) }
    writeFile("\(root)/etc/hostname", "guest\(index)\n")
}

/// Mounts a tmpfs at path (root only); returns false when it cannot.
func mountTmpfs(_ path: String) -> Bool {
    mkdirs(path)
    return run(["/bin/mount", "-t", "tmpfs", "-o", "size=64m", "hashify-test", path]).status == 0
}

func unmount(_ path: String) { _ = run(["/bin/umount", path]) }

/// Mount points at or below `path` (from /proc/self/mountinfo, deepest first).
func mountPoints(under path: String) -> [String] {
    // Not String(contentsOfFile:): /proc files report size 0 and would read as empty.
    let info = run(["/bin/cat", "/proc/self/mountinfo"]).out
    var points: [String] = []
    for line in info.split(separator: "\n") {
        let f = line.split(separator: " ")
        guard f.count > 4 else { continue }
        var p = String(f[4])
        for (esc, c) in [("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")] {
            p = p.replacingOccurrences(of: esc, with: c)
        }
        if p == path || p.hasPrefix(path + "/") { points.append(p) }
    }
    return points.sorted { $0.count > $1.count }
}

/// Unmounts (lazily) everything the test mounted below `path`: the test's own mounts only.
func unmountAll(under path: String) {
    for p in mountPoints(under: path) { _ = run(["/bin/umount", "-l", p]) }
}

/// The lines of two manifests that differ (- before, + after), for failure messages.
func manifestDiff(_ before: String, _ after: String) -> String {
    let a = Set(before.split(separator: "\n"))
    let b = Set(after.split(separator: "\n"))
    return (a.subtracting(b).sorted().map { "- \($0)" } + b.subtracting(a).sorted().map { "+ \($0)" }).joined(
        separator: "\n")
}

/// Lets a started process run for a random part of `window` seconds (`fraction` of it), then
/// SIGKILLs it if it still runs; returns whether it was killed. The window shrinks
/// (by `shrink`) when the process finished first, so that the next kill aims earlier,
/// and grows (by `grow`) when it was killed.
func killAtRandom(
    _ p: Process, window: inout Double, fraction: ClosedRange<Double>, shrink: Double = 0.8, grow: Double = 1
) -> Bool {
    usleep(UInt32(Double.random(in: fraction) * window * 1_000_000))
    guard p.isRunning else {
        window *= shrink
        return false
    }
    kill(p.processIdentifier, SIGKILL)
    window *= grow
    return true
}

/// The redirects (data object paths, "/ab/…") of the stub at `path` (no
/// leading slash) in the images of a store's overlay records: of every
/// record's generation in force, or only of the record of guest root `root`.
/// An entry that is no stub gives "".
func stubRedirects(store: String, path: String, root: String? = nil) -> [String] {
    var out: [String] = []
    let recordsPath = "\(store)/overlay"
    for id in (try? FileManager.default.contentsOfDirectory(atPath: recordsPath))?.sorted() ?? [] {
        let record = "\(recordsPath)/\(id)"
        if let root, (try? String(contentsOfFile: "\(record)/root", encoding: .utf8)) != root { continue }
        guard let state = try? String(contentsOfFile: "\(record)/state", encoding: .utf8),
            let line = state.split(separator: "\n").first(where: { $0.hasPrefix("generation ") }),
            let image = try? OpenFile.open(path: Array("\(record)/g\(line.dropFirst(11))/meta.erofs".utf8)),
            let tree = try? ErofsReader.read(from: image), let node = tree.lookup(Array(path.utf8))
        else { continue }
        let r = tree[node].xattrs.first { $0.name == Array("trusted.overlay.redirect".utf8) }?.value ?? []
        out.append(String(decoding: r, as: UTF8.self))
    }
    return out
}
