import HashifySystem
import SystemPackage

/// Cleans up after a run that was killed: temporary names and the mtime of
/// the directory it was changing. A temporary name is removed only when it
/// is provably redundant: it is a store object, or a file whose content and
/// identity equal a store object's (the original a killed exchange left).
/// Anything else is kept and reported: data is never deleted on a guess.
enum Recovery {
    /// The run id and kind letter of `.hashify~RUNID~KN`.
    static func parse(_ name: FileName) -> (String, UInt8)? {
        let rest = name.bytes.dropFirst(Walker.temporaryPrefix.count)
        guard let tilde = rest.firstIndex(of: 0x7e), tilde + 1 < rest.endIndex else { return nil }
        return (String(decoding: rest[rest.startIndex..<tilde], as: UTF8.self), rest[tilde + 1])
    }

    /// Returns the number of temporary names removed.
    static func clean(walk: inout Walker.Result, roots: [GuestRoot], store: Store, skips: inout [Skip]) -> Int {
        let unfinished = Set(store.unfinishedRuns())
        if unfinished.isEmpty { return 0 }
        let objects = (try? store.listObjects()) ?? []
        let inventory = walk.inventory
        let opener = DirectoryOpener(inventory: inventory, roots: roots.map(\.directory))
        let objectInodes = Set(objects.map { InodeKey(device: $0.stat.device, inode: $0.stat.inode) })
        let objectIdentities = Set(objects.map { $0.digest.hex + "-" + $0.metadataKey })
        var removed = 0
        var keptFor = Set<String>()
        var kept: [String: Set<[UInt8]>] = [:]
        for id in unfinished { kept[id] = RunJournal.keptNames(store: store, runID: id) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        for t in walk.temporaries {
            guard let (id, kind) = parse(t.name), unfinished.contains(id) else { continue }
            let path = inventory.directoryPath(t.directory) + [0x2f] + t.name.bytes
            let guest = Int(inventory.directories[Int(t.directory)].guest)
            do {
                let dir = try opener.open(t.directory)
                let st = try dir.stat(t.name)
                let isObject = objectInodes.contains(InodeKey(device: st.device, inode: st.inode))
                // An unexchanged private copy: the original still stands at its name.
                var redundant = isObject || (kind == TemporaryNames.Kind.copy.rawValue && st.linkCount == 1)
                if kept[id]?.contains(t.name.bytes) == true { redundant = false }
                else if !redundant && st.isRegular {
                    let f = try dir.openFileForReading(t.name)
                    let (digest, identity) = try ContentHasher.digest(of: f, buffer: buffer)
                    redundant = objectIdentities.contains(digest.hex + "-" + identity.key)
                }
                if redundant {
                    try dir.unlink(t.name)
                    removed += 1
                } else {
                    skips.append(Skip(guest: guest, path: path, reason: .unknownTemporary))
                    keptFor.insert(id)
                }
            } catch {
                skips.append(Skip(guest: guest, path: path, reason: .failed(operation: "clean up", errno: errnoCode(error))))
                keptFor.insert(id)
            }
        }
        // The directory each killed run was changing gets its mtime back.
        for id in unfinished {
            if let open = RunJournal.openDirectory(store: store, runID: id) {
                for (d, entry) in inventory.directories.enumerated() where entry.inode == open.inode {
                    guard Array(roots[Int(entry.guest)].path.string.utf8) == open.root,
                          let dir = try? opener.open(Int32(d)) else { continue }
                    if (try? dir.setModificationTime(open.mtime)) != nil {
                        // This run must restore the original, not what the killed run left.
                        walk.inventory.directories[d].modificationTime = open.mtime
                    }
                }
            }
            if !keptFor.contains(id) { store.endRun(id) }
        }
        return removed
    }
}
