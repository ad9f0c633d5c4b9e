import HashifySystem
import SystemPackage

/// What lets the store's data directory be an ordinary lower layer under a
/// guest's metadata layer, on kernels without data-only layers
/// (`OverlayMount.Layout.lower`): at the metadata layer's root, a whiteout (a
/// character device 0/0) of each top directory the data directory can have
/// ("00" … "ff"), or, where the guest has a directory of its own by that
/// name, that directory made opaque. The guest's root then lists only its own
/// entries and its own "ab" never merges with the objects' "ab", while a
/// stub's absolute redirect still finds its object (overlayfs looks it up
/// from the lower layer's root, below the whiteout's layer).
///
/// Every generation gets this when it is built, whatever the kernel, so that
/// a guest converted where data-only layers exist still mounts after the host
/// boots an older kernel; generations made before it get it at their next
/// mount in that layout (adding entries to an unmounted layer's root changes
/// no file handle overlayfs recorded). Idempotent.
enum DataLayerHiding {
    static let opaque = "trusted.overlay.opaque"

    static func apply(to meta: Directory) throws {
        for byte in 0...255 {
            let name = FileName(hexString([UInt8(byte)]))
            do {
                let st = try meta.stat(name)
                guard st.isDirectory else { continue }  // a file, symlink or whiteout of this name hides the lower one
                let dir = try meta.openDirectory(name)
                if dir.extendedAttribute(opaque) != [0x79] {
                    try dir.setExtendedAttribute(ExtendedAttribute(name: Array(opaque.utf8), value: [0x79]))
                }
            } catch Errno.noSuchFileOrDirectory {
                try meta.makeNode(name, mode: 0o020000, device: 0)
            }
        }
    }
}
