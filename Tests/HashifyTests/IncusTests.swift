import Foundation
import Testing

/// An Incus instance's `backup.yaml`, in the form Incus 6.0 writes it
/// (abridged from a real instance made on this host).
func incusBackup(privileged: Bool, lastStateIdmap: String = "'[]'") -> String {
    let config = """
            security.privileged: "\(privileged)"
            volatile.idmap.base: "0"
            volatile.idmap.current: '[]'
            volatile.last_state.idmap: \(lastStateIdmap)
            volatile.last_state.power: STOPPED
        """
    return """
        container:
          architecture: x86_64
          config:
        \(config)
          devices: {}
          ephemeral: false
          profiles:
          - default
          expanded_config:
        \(config)
          expanded_devices:
            root:
              path: /
              pool: default
              type: disk
        pool:
          name: default
          driver: dir

        """
}

@Suite("Incus containers and overlay mode", .serialized, .enabled(if: isRoot, "overlay mounts need root"))
struct IncusTests {
    @Test(
        "an unprivileged Incus container (rootfs idmapped at start) is refused in one line, nothing changed; a privileged one or one shifted on disk converts"
    )
    func idmappedRootfs() throws {
        let s = Scratch("incus")
        let store = s.sub("store")
        let unprivileged = s.sub("pool/containers/u1/rootfs")
        let privileged = s.sub("pool/containers/p1/rootfs")
        let shifted = s.sub("pool/containers/s1/rootfs")
        for (i, r) in [unprivileged, privileged, shifted].enumerated() { makeGuest(r, index: i) }
        writeFile(s.sub("pool/containers/u1/backup.yaml"), incusBackup(privileged: false))
        writeFile(s.sub("pool/containers/p1/backup.yaml"), incusBackup(privileged: true))
        writeFile(
            s.sub("pool/containers/s1/backup.yaml"),
            incusBackup(
                privileged: false,
                lastStateIdmap:
                    #"'[{"Isuid":true,"Isgid":false,"Hostid":1000000,"Nsid":0,"Maprange":1000000000}]'"#))
        settle()
        let before = guestManifest(unprivileged)
        let r = overlay(["convert", "-q", unprivileged], store: store)
        #expect(r.status != 0)
        #expect(r.err.contains("an unprivileged Incus container"), "\(r.err)")
        #expect(r.err.contains("INCUS_IDMAPPED_MOUNTS_DISABLE=1"), "the message names the route that works: \(r.err)")
        #expect(r.err.split(separator: "\n").count == 1, "\(r.err)")
        #expect(!isOverlayMount(unprivileged))
        #expect(guestManifest(unprivileged) == before)
        let ok = overlay(["convert", "-q", privileged, shifted], store: store)
        #expect(ok.status == 0, "\(ok.err) \(incusBackup(privileged: true))")
        #expect(isOverlayMount(privileged) && isOverlayMount(shifted))
        #expect(overlay(["umount", "-q", privileged, shifted], store: store).status == 0)
    }

    @Test(
        "an LXC container whose config mounts the rootfs idmapped (idmap=container) is refused in one line, nothing changed"
    )
    func lxcIdmappedRootfs() throws {
        let s = Scratch("lxcidmap")
        let store = s.sub("store")
        let lxcpath = s.sub("lxc")
        makeLXCContainer(
            lxcpath: lxcpath, name: "m1", initScript: "true",
            extraConfig:
                "lxc.idmap = u 0 100000 65536\nlxc.idmap = g 0 100000 65536\nlxc.rootfs.options = idmap=container\n")
        let root = "\(lxcpath)/m1/rootfs"
        settle()
        let before = guestManifest(root)
        let r = overlay(["convert", "-q", root], store: store)
        #expect(r.status != 0)
        #expect(r.err.contains("mounts the rootfs idmapped (lxc.rootfs.options = idmap=container)"), "\(r.err)")
        #expect(r.err.split(separator: "\n").count == 1, "\(r.err)")
        #expect(!isOverlayMount(root))
        #expect(guestManifest(root) == before)
    }
}
