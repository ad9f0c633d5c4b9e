import HashifySystem

/// Reads a guest's dpkg configuration-file list from the guest's own tree
/// (`var/lib/dpkg/status` Conffiles fields and `var/lib/dpkg/info/*.conffiles`)
/// without running anything inside the guest and without following symlinks.
public enum DpkgConffiles {
    /// Guest-absolute paths of every conffile the guest's dpkg knows.
    public static func read(guestRoot: Directory) -> Set<[UInt8]> {
        var result = Set<[UInt8]>()
        guard
            let dpkg = try? guestRoot.openDirectory(FileName("var"))
                .openDirectory(FileName("lib")).openDirectory(FileName("dpkg"))
        else { return result }
        if let status = try? readSmallFile(dpkg, FileName("status")) {
            parseStatus(status, into: &result)
        }
        if let info = try? dpkg.openDirectory(FileName("info")), let names = try? info.entryNames() {
            for n in names where n.bytes.count > 10 && n.bytes.suffix(10).elementsEqual(".conffiles".utf8) {
                guard let data = try? readSmallFile(info, n) else { continue }
                for line in data.split(separator: 0x0a) {
                    var l = Array(line)
                    while let last = l.last, last == 0x20 || last == 0x0d { l.removeLast() }
                    // dpkg ≥1.20 may prefix "remove-on-upgrade " etc.
                    if let slash = l.firstIndex(of: 0x2f) { result.insert(Array(l[slash...])) }
                }
            }
        }
        return result
    }

    /// Parses the Conffiles fields of a dpkg status file.
    public static func parseStatus(_ data: [UInt8], into result: inout Set<[UInt8]>) {
        var inConffiles = false
        for lineSlice in data.split(separator: 0x0a, omittingEmptySubsequences: false) {
            if lineSlice.first == 0x20 {
                guard inConffiles else { continue }
                // " /path/to/file md5sum [obsolete|remove-on-upgrade]"
                let fields = lineSlice.split(separator: 0x20)
                if let path = fields.first, path.first == 0x2f { result.insert(Array(path)) }
            } else {
                inConffiles = lineSlice.starts(with: "Conffiles:".utf8)
            }
        }
    }

    static func readSmallFile(_ dir: Directory, _ name: FileName) throws -> [UInt8] {
        let f = try dir.openFileForReading(name)
        guard try f.stat().isRegular else { return [] }
        return try f.readAll()
    }
}
