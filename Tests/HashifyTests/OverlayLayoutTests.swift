import Foundation
import HashifySystem
import SystemPackage
import Testing

/// `hashify overlay …` run with `HASHIFY_OVERLAY_LAYOUT` set: "lower" mounts
/// the store's data directory as an ordinary lower layer (the layout of
/// kernels without data-only layers), nil leaves the kernel's best.
@discardableResult
func overlay(_ args: [String], store: String, layout: String?) -> (status: Int32, out: String, err: String) {
    run(
        ["/usr/bin/env"] + (layout.map { ["HASHIFY_OVERLAY_LAYOUT=\($0)"] } ?? []) + [
            hashifyBinary, "overlay", args[0],
        ]
            + ["--store", store] + args.dropFirst())
}

/// The layout `status --json` gives for the guest at `root` (nil: not mounted).
func mountLayout(_ root: String, store: String) -> String? {
    let status = jsonReport(hashify(["status", "--json", "--store", store]).out)
    let rows = (status["overlay"] as? [String: Any])?["guests"] as? [[String: Any]] ?? []
    return rows.first { ($0["root"] as? String).map { root.hasSuffix($0) || $0.hasSuffix(root) } ?? false }?[
        "layout"] as? String
}

@Suite("overlay layouts", .serialized, .enabled(if: isRoot, "overlay mounts need root"))
struct OverlayLayoutTests {
    @Test(
        "the fallback layout (data as an ordinary lower layer): same view, copy-on-write, fold and export; a guest converted in one layout mounts in the other"
    )
    func lowerLayout() throws {
        let s = Scratch("ovlayout")
        let store = s.sub("store")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        try makeRichGuest(a, index: 0)
        try makeRichGuest(b, index: 1)
        // Names the store's data directory has at its top: the guest's own must stay its own.
        writeFile("\(a)/ab/own", pseudoRandom(3000, seed: 71))
        writeFile("\(a)/0f", pseudoRandom(3000, seed: 72))
        settleDirectoryTimes(a)
        settle()
        let before = [a, b].map(guestManifest)
        let rootBefore = try FileManager.default.contentsOfDirectory(atPath: a).sorted()

        let r = overlay(["convert", "-q", a, b], store: store, layout: "lower")
        #expect(r.status == 0, "\(r.err)")
        #expect(mountLayout(a, store: store) == "lower")
        for (i, g) in [a, b].enumerated() { #expect(guestManifest(g) == before[i], "lower layout, guest \(i)") }
        // The root lists the guest's entries alone (the objects' prefix directories stay hidden).
        #expect(try FileManager.default.contentsOfDirectory(atPath: a).sorted() == rootBefore)
        #expect(try FileManager.default.contentsOfDirectory(atPath: "\(a)/ab") == ["own"])

        // Copy-on-write in this layout.
        writeFile("\(a)/usr/lib/lib1.so", pseudoRandom(5000, seed: 4343))
        chmod("\(a)/usr/bin/tool", 0o700)
        settle()
        #expect(guestManifest(b) == before[1], "b after a's writes")
        let changed = guestManifest(a)

        // The same guest mounts in the other layout (a host booting a newer kernel), and back.
        #expect(overlay(["umount", "-q", a, b], store: store, layout: nil).status == 0)
        #expect(overlay(["mount", "-q", a], store: store, layout: nil).status == 0)
        #expect(mountLayout(a, store: store) == "data-only")
        #expect(guestManifest(a) == changed)
        #expect(overlay(["umount", "-q", a], store: store, layout: nil).status == 0)

        // The fold (its private mount in the fallback layout), then mounted that way.
        let fold = run([
            "/usr/bin/env", "HASHIFY_OVERLAY_LAYOUT=lower", hashifyBinary, "unify", "-q", "--store", store, a, b,
        ])
        #expect(fold.status == 0, "\(fold.err)")
        #expect(overlay(["mount", "-q", a, b], store: store, layout: "lower").status == 0)
        #expect(guestManifest(a) == changed, "after the fold")
        #expect(guestManifest(b) == before[1])
        #expect(hashify(["verify", "-q", "--store", store]).status == 0)

        // Export in this layout gives the plain tree back.
        #expect(overlay(["export", "-q", a], store: store, layout: "lower").status == 0)
        #expect(!isOverlayMount(a))
        #expect(guestManifest(a) == changed, "exported")
        #expect(overlay(["umount", "-q", b], store: store, layout: nil).status == 0)
        unmountAll(under: s.path)
    }

    @Test("a guest with its own character device 0/0 (a whiteout to overlayfs) is refused, nothing changed")
    func ownWhiteoutRefused() throws {
        let s = Scratch("ovwhiteout")
        let store = s.sub("store")
        let a = s.sub("guests/a")
        makeGuest(a, index: 0)
        mkdirs("\(a)/zz")  // last in the walk: every file before it has its object by then
        let dir = try Directory.open(path: FilePath("\(a)/zz"))
        try dir.makeNode(FileName("looks-like-a-whiteout"), mode: 0o020644, device: 0)
        settleDirectoryTimes(a)
        settle()
        let before = guestManifest(a)
        let r = overlay(["convert", "-q", a], store: store, layout: nil)
        #expect(r.status != 0)
        #expect(r.err.contains("character device 0/0"), "\(r.err)")
        #expect(r.err.split(separator: "\n").count == 1, "\(r.err)")
        #expect(!isOverlayMount(a))
        #expect(guestManifest(a) == before)  // link counts included: no inode of the guest stays linked
        #expect(run(["/usr/bin/find", "\(store)/data", "-type", "f"]).out.isEmpty)
    }
}
