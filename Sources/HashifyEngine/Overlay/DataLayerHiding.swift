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
///
/// A stack of metadata layers (`Overlay.foldStacked`) cannot carry the
/// whiteouts in its bottom layer: a stub's redirect is looked up in the layers
/// below its own, and a whiteout there ends the lookup before the data
/// directory. Mounted in this layout, a stack gets a hiding layer of its own
/// on top (`prepare`), and its bottom layer's whiteouts go.
enum DataLayerHiding {
    static let opaque = "trusted.overlay.opaque"

    /// Where generation `g`'s hiding layer lives (used only when it stacks layers).
    static func hidingPath(_ g: OverlayGuest.Generation) -> FilePath {
        g.upperPath.removingLastComponent().appending("hide")
    }

    static func isOurWhiteout(_ st: FileStat) -> Bool { st.fileType == 0o020000 && st.deviceNumber == 0 }

    /// Makes generation `g` ready for a mount in the lower layout: one layer
    /// hides the data directory's top directories. For a stack, a hiding
    /// layer above every metadata layer holds a whiteout for each name no
    /// layer holds; where the topmost layer holding a name holds a directory,
    /// the lowest directory of that name the lookup reaches is made opaque
    /// (only the data directory is below it); the bottom layer's whiteouts go.
    ///
    /// The hiding layer is made once per generation (beside it under a
    /// temporary name, then renamed): it is the first lower layer, whose
    /// root's file handle `index=on` records in the upper layer, so a layer
    /// made anew at each mount would fail the next mount with ESTALE. Nothing
    /// it depends on changes while the generation is in force: a fold makes
    /// the next one.
    static func prepare(_ g: OverlayGuest.Generation) throws {
        guard let base = g.layers.last?.directory else { return }
        guard g.layers.count > 1 else { return try apply(to: base) }
        let name = FileName("hide")
        if (try? g.directory.stat(name))?.isDirectory == true { return }
        let temp = FileName("hide.new")
        try g.directory.removeTree(temp)
        try g.directory.makeDirectory(temp, mode: 0o755)
        let hide = try g.directory.openDirectory(temp)
        for byte in 0...255 {
            let hex = FileName(hexString([UInt8(byte)]))
            if let st = try? base.stat(hex), isOurWhiteout(st) { try base.unlink(hex) }
            var lowest: Directory?
            var hidden = false
            for layer in g.layers.compactMap(\.directory) {
                guard let st = try? layer.stat(hex) else { continue }
                guard st.isDirectory else {
                    hidden = lowest == nil
                    break
                }
                let dir = try layer.openDirectory(hex)
                lowest = dir
                if (try? Overlay.FoldContext.endsLookup(dir)) != false { break }
            }
            if let lowest {
                if (try? Overlay.FoldContext.endsLookup(lowest)) != true {
                    try lowest.setExtendedAttribute(ExtendedAttribute(name: Array(opaque.utf8), value: [0x79]))
                }
            } else if !hidden {
                try hide.makeNode(hex, mode: 0o020000, device: 0)
            }
        }
        try hide.sync()
        try g.directory.rename(temp, to: g.directory, as: name, flags: .noReplace)
    }

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
