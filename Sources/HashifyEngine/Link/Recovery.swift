import HashifySystem
import SystemPackage

/// Cleans up after a run that was killed: temporary names and the mtime of
/// the directory it was changing. A temporary name is removed only when it
/// is provably redundant, and a guest's file found under one is put back at
/// its name; anything else is kept and reported: data is never deleted on a
/// guess.
///
/// The run's journal says what each temporary name can hold: every private
/// copy is noted with its inode when made, every exchange with both inodes
/// before it is made. So a temporary name holds one of:
/// - the inode this run put there (its object link or private copy): the
///   exchange did not happen or was undone, the guest's file stands at its
///   name: the temporary is removed;
/// - the inode the exchange expected at the name (the victim, or the
///   original a split was replacing): the exchange happened and what came
///   out is removed when its content and identity equal a store object's or
///   the file now at the name's (what the run would have done);
/// - a third inode: a guest renamed a file onto the name while the exchange
///   was under way; it is exchanged back to its name when the name still
///   holds this run's inode, and the temporary then removed.
enum Recovery {
    /// The run id and kind letter of `.hashify~RUNID~KN`.
    static func parse(_ name: FileName) -> (String, UInt8)? {
        let rest = name.bytes.dropFirst(Walker.temporaryPrefix.count)
        guard let tilde = rest.firstIndex(of: 0x7e), tilde + 1 < rest.endIndex else { return nil }
        return (String(decoding: rest[rest.startIndex..<tilde], as: UTF8.self), rest[tilde + 1])
    }

    /// What recovery decided for one temporary name.
    enum Decision {
        case remove
        case putBack(name: FileName)
        case keep
    }

    /// Tells what a temporary name holds, from the journal and the store's objects.
    final class Judge {
        let objectInodes: Set<InodeKey>
        let objectIdentities: Set<String>
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)

        init(objects: [Store.Object]) {
            objectInodes = Set(objects.map { InodeKey(device: $0.stat.device, inode: $0.stat.inode) })
            objectIdentities = Set(objects.map { $0.digest.hex + "-" + $0.metadataKey })
        }

        deinit { buffer.deallocate() }

        /// Content and identity of a file in `dir`, as a store object would be keyed.
        func identityKey(_ dir: Directory, _ name: FileName) throws -> String {
            let f = try dir.openFileForReading(name)
            let (digest, identity) = try ContentHasher.digest(of: f, buffer: buffer)
            return digest.hex + "-" + identity.key
        }

        /// What to do with temporary name `t` of kind `kind` (see `Recovery`).
        func decide(_ t: FileName, kind: UInt8, in dir: Directory, journal: RunJournal.Contents) throws -> Decision {
            if journal.kept.contains(t.bytes) { return .keep }
            let st = try dir.stat(t)
            let isObject = objectInodes.contains(InodeKey(device: st.device, inode: st.inode))
            if let x = journal.exchanges[t.bytes] {
                if st.inode == x.ours { return .remove }
                let name = FileName(bytes: x.name)
                if st.inode == x.expected {
                    guard st.isRegular else { return .keep }
                    if isObject { return .remove }
                    let key = try identityKey(dir, t)
                    if objectIdentities.contains(key) { return .remove }
                    let now = try? dir.stat(name)
                    if let now, now.isRegular, (try? identityKey(dir, name)) == key { return .remove }
                    // Changed since it was hashed (a writer that got in): back to its name.
                    if now?.inode == x.ours { return .putBack(name: name) }
                    return .keep
                }
                // A guest's file, renamed onto the name during the exchange.
                if let now = try? dir.stat(name), now.inode == x.ours { return .putBack(name: name) }
                return .keep
            }
            // Never exchanged (the journal notes each exchange before it is made).
            if kind == TemporaryNames.Kind.link.rawValue {
                return isObject || journal.created[t.bytes] == st.inode ? .remove : .keep
            }
            if kind == TemporaryNames.Kind.copy.rawValue, journal.created[t.bytes] == st.inode { return .remove }
            return .keep
        }
    }

    /// Returns the number of temporary names removed.
    static func clean(walk: inout Walker.Result, roots: [GuestRoot], store: Store, skips: inout [Skip]) -> Int {
        let unfinished = Set(store.unfinishedRuns())
        if unfinished.isEmpty { return 0 }
        let objects = (try? store.listObjects()) ?? []
        let inventory = walk.inventory
        let opener = DirectoryOpener(inventory: inventory, roots: roots.map(\.directory))
        let judge = Judge(objects: objects)
        var removed = 0
        var keptFor = Set<String>()
        var journals: [String: RunJournal.Contents] = [:]
        for id in unfinished { journals[id] = RunJournal.contents(store: store, runID: id) }

        for t in walk.temporaries {
            guard let (id, kind) = parse(t.name), unfinished.contains(id), let journal = journals[id] else { continue }
            let path = inventory.directoryPath(t.directory) + [0x2f] + t.name.bytes
            let guest = Int(inventory.directories[Int(t.directory)].guest)
            do {
                let dir = try opener.open(t.directory)
                switch try judge.decide(t.name, kind: kind, in: dir, journal: journal) {
                case .remove:
                    try dir.unlink(t.name)
                    removed += 1
                case .putBack(let name):
                    try dir.rename(t.name, to: dir, as: name, flags: .exchange)
                    try dir.unlink(t.name)  // now this run's own inode
                    removed += 1
                case .keep:
                    skips.append(Skip(guest: guest, path: path, reason: .unknownTemporary))
                    keptFor.insert(id)
                }
            } catch {
                skips.append(Skip(guest: guest, path: path, reason: .failed(OperationError(.cleanUp, error))))
                keptFor.insert(id)
            }
        }
        // The directory each killed run was changing gets its mtime back.
        for id in unfinished {
            if let open = journals[id]?.openDirectory {
                for (d, entry) in inventory.directories.enumerated() where entry.inode == open.inode {
                    guard Array(roots[Int(entry.guest)].path.string.utf8) == open.root,
                        let dir = try? opener.open(Int32(d))
                    else { continue }
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
