import Foundation
import Testing

/// qemu's x86-64 system emulator, when it is installed and starts.
let qemuBinary: String? = {
    let path = "/usr/bin/qemu-system-x86_64"
    guard FileManager.default.isExecutableFile(atPath: path), run([path, "--version"]).status == 0 else { return nil }
    return path
}()

/// hashify linked with a static Swift standard library (it runs in a VM
/// without a Swift runtime), built once into `.build-vm`; or the one
/// `HASHIFY_VM_BINARY` names (a release build, say).
let staticHashify: Result<String, VMSetupError> = {
    if let given = ProcessInfo.processInfo.environment["HASHIFY_VM_BINARY"] { return .success(given) }
    let scratch = packageRoot.appendingPathComponent(".build-vm").path
    let r = run([
        "/bin/sh", "-c",
        "cd '\(packageRoot.path)' && swift build --static-swift-stdlib --product hashify --scratch-path '\(scratch)' 2>&1 | tail -20",
    ])
    let binary = scratch + "/debug/hashify"
    guard r.status == 0, FileManager.default.isExecutableFile(atPath: binary) else {
        return .failure(VMSetupError(message: "building hashify with a static Swift standard library failed: \(r.out)"))
    }
    return .success(binary)
}()

struct VMSetupError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

/// A Debian kernel, fetched from Debian's archive by Tests/vm/fetch-kernel
/// (kept under `.build-vm/kernels/SUITE` for later runs).
func debianKernel(_ suite: String) throws -> (vmlinuz: String, modules: String, version: String) {
    let dest = packageRoot.appendingPathComponent(".build-vm/kernels/\(suite)").path
    let r = run([packageRoot.appendingPathComponent("Tests/vm/fetch-kernel").path, suite, dest])
    guard r.status == 0 else { throw VMSetupError(message: "fetching \(suite)'s kernel failed: \(r.err)") }
    let version = (try? String(contentsOfFile: dest + "/version", encoding: .utf8)) ?? "?"
    return (dest + "/vmlinuz", dest + "/modules", version.trimmingCharacters(in: .whitespacesAndNewlines))
}

/// Builds the initramfs: busybox, hashify, getfattr and setfattr with the
/// shared libraries they load, the kernel's modules hashify needs (the
/// directory fetch-kernel fills, with its load order) and Tests/vm/init.
func buildInitramfs(hashify: String, modules: String, into dir: String) throws -> String {
    let stage = dir + "/root"
    let fm = FileManager.default
    for sub in ["bin", "lib", "proc", "sys", "dev", "t"] {
        try fm.createDirectory(atPath: "\(stage)/\(sub)", withIntermediateDirectories: true)
    }
    let programs = [hashify, "/usr/bin/getfattr", "/usr/bin/setfattr"]
    var copies = [("/bin/busybox", "bin/busybox")]
    for name in try fm.contentsOfDirectory(atPath: modules) { copies.append(("\(modules)/\(name)", "modules/\(name)")) }
    copies += programs.map { ($0, "bin/" + URL(fileURLWithPath: $0).lastPathComponent) }
    copies.append((packageRoot.appendingPathComponent("Tests/vm/init").path, "init"))
    // The libraries the dynamic programs load, at the paths the loader looks for them.
    for path in programs.flatMap(loadedLibraries) { copies.append((path, String(path.dropFirst()))) }
    for (from, to) in copies {
        let target = "\(stage)/\(to)"
        try fm.createDirectory(
            atPath: URL(fileURLWithPath: target).deletingLastPathComponent().path, withIntermediateDirectories: true)
        guard run(["/bin/cp", "-L", from, target]).status == 0 else {
            throw VMSetupError(message: "cannot copy \(from) into the initramfs")
        }
    }
    let image = dir + "/initrd"
    let r = run(["/bin/sh", "-c", "cd '\(stage)' && find . | cpio -o -H newc --quiet > '\(image)'"])
    guard r.status == 0 else { throw VMSetupError(message: "cpio failed: \(r.err)") }
    return image
}

/// What Tests/vm/init checks, in order: every one must report "ok".
let vmChecks = [
    "tools", "convert", "metadata-is-image", "image-detached", "layout-lower", "manifest-through-mount-1",
    "manifest-through-mount-2",
    "root-lists-own-entries",
    "files-share-objects", "cow-other-guest-unchanged", "cow-objects-unchanged", "cow-append-seen", "cow-copied-up",
    "forge-refused", "forge-metacopy-refused", "umount", "nothing-attached-after-umount", "fold",
    "upper-empty-after-fold", "mount", "manifest-after-fold-1", "manifest-after-fold-2", "verify", "umount-2",
    "fold-again", "mount-again", "root-lists-own-entries-again", "manifest-again", "umount-again", "remount-again",
    "manifest-remounted",
    "umount-3", "compact", "mount-compacted", "manifest-compacted", "verify-2", "umount-prefix-dir",
    "fold-prefix-dir", "mount-prefix-dir", "manifest-prefix-dir", "export", "export-plain", "export-manifest",
    "own-overlay-xattrs-refused", "own-overlay-xattrs-unchanged", "own-overlay-xattrs-not-mounted",
    "nothing-attached-at-end",
]

/// What Tests/vm/init checks on a kernel before 5.15, whose EROFS cannot hold stubs (no chunk-based
/// files): the conversion is refused in one line and nothing is changed, mounted or attached.
let vmChecksBefore515 = [
    "tools", "old-kernel-refused", "old-kernel-unchanged", "old-kernel-not-mounted", "old-kernel-nothing-attached",
]

@Suite(
    "overlay mode on the kernels users run (Debian's, booted in qemu)", .serialized,
    .enabled(if: qemuBinary != nil, "qemu cannot start here (apt-get install qemu-system-x86 busybox-static cpio)"))
struct KernelVMTests {
    @Test(
        "convert, copy-on-write, fold, export and forged xattrs on Debian's own kernel, in the fallback layout; before 5.15 a clear refusal",
        arguments: [("bookworm", "6.1"), ("bullseye", "5.10")])
    func debianKernel(suite: String, series: String) throws {
        let hashify = try staticHashify.get()
        let kernel = try HashifyTests.debianKernel(suite)
        #expect(kernel.version.hasPrefix(series), "\(suite) ships \(kernel.version)")
        let s = Scratch("vm-\(suite)")
        let initrd = try buildInitramfs(hashify: hashify, modules: kernel.modules, into: s.path)
        // TCG: /dev/kvm is not used (it may exist and hang). The machine powers itself off.
        let r = run([
            "/usr/bin/timeout", "1200", qemuBinary!, "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "1",
            "-nographic", "-no-reboot", "-kernel", kernel.vmlinuz, "-initrd", initrd,
            "-append", "console=ttyS0 panic=-1 quiet rdinit=/init",
        ])
        // The serial console ends lines with "\r\n" (one Character in Swift).
        let lines = r.out.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
        let booted = lines.first { $0.contains("VMKERNEL ") }.map {
            String($0[$0.range(of: "VMKERNEL ")!.upperBound...])
        }
        #expect(booted == kernel.version, "\(r.out.suffix(3000))")
        var results: [String: String] = [:]
        for l in lines where l.hasPrefix("VMCHECK ") {
            let parts = l.split(separator: " ", maxSplits: 2).map(String.init)
            results[parts[1]] = parts.count > 2 ? parts[2] : ""
        }
        let checks = series == "5.10" ? vmChecksBefore515 : vmChecks
        for name in checks {
            #expect(results[name] == "ok", "\(kernel.version): \(name): \(results[name] ?? "not run")")
        }
        #expect(lines.contains("VMDONE"), "\(r.out.suffix(3000))")
        #expect(results.count == checks.count, "checks reported: \(results.keys.sorted())")
    }
}
