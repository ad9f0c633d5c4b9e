import HashifySystem
import SystemPackage

/// Gives paths a private copy again (de-unification): the content is copied
/// under a read lease into a temporary name beside the path, with owner,
/// mode, every xattr and mtime, and exchanged with the path atomically.
/// Nothing a guest sees changes; only the inode does.
final class Splitter {
    let inventory: Inventory
    let directories: DirectoryChanges
    var temporaries: TemporaryNames
    var split = 0
    var skips: [Skip] = []

    init(inventory: Inventory, roots: [GuestRoot], journal: RunJournal) {
        self.inventory = inventory
        self.directories = DirectoryChanges(inventory: inventory, roots: roots, journal: journal)
        self.temporaries = TemporaryNames(runID: journal.runID)
    }

    /// Splits every given name (indices into inventory.names), in walk order.
    func run(_ names: [Int32]) {
        let sorted = names.sorted { a, b in
            let da = inventory.names[Int(a)].directory
            let db = inventory.names[Int(b)].directory
            return da != db ? da < db : a < b
        }
        for n in sorted {
            let inode = inventory.inodes[Int(inventory.names[Int(n)].inodeIndex)].inode
            do {
                let dir = try directories.enter(inventory.names[Int(n)].directory)
                try splitOne(dir, inventory.fileName(n), expectedInode: inode)
                split += 1
            } catch {
                let reason: SkipReason
                if error is LeftTemporary {
                    reason = .unknownTemporary
                } else if error is WriterArrived {
                    reason = .openForWriting
                } else if error is NameMoved || error is DirectoryOpener.DirectoryChanged
                    || error is HardlinkLinker.Mismatch
                {
                    reason = .changedDuringRun
                } else {
                    reason = HardlinkLinker.reason(for: error, operation: .split)
                }
                skips.append(
                    Skip(guest: Int(inventory.guest(ofName: n)), path: inventory.path(ofName: n), reason: reason))
            }
        }
        directories.finish()
    }

    func splitOne(_ dir: Directory, _ name: FileName, expectedInode: UInt64) throws {
        let source = try dir.openFileForReading(name)
        try source.takeReadLease()
        defer { source.releaseLease() }
        let st = try source.stat()
        guard st.inode == expectedInode, st.device == inventory.device, st.isRegular else {
            throw HardlinkLinker.Mismatch()
        }
        // The copy is made without a name and gets its temporary name only
        // once complete and noted in the journal: a kill leaves no copy that
        // recovery could not tell from a guest's file.
        let copy = try dir.createUnnamedFile(mode: 0o600)
        try source.copyContent(to: copy, size: st.size)
        try copy.setOwner(uid: st.uid, gid: st.gid)
        try copy.setMode(st.mode)  // after chown, which clears setuid/setgid
        for a in try source.extendedAttributes() { try copy.setExtendedAttribute(a) }
        try copy.setModificationTime(st.modificationTime)
        let check = try source.stat()
        guard check.sameContentState(as: st) else { throw HardlinkLinker.Mismatch() }
        let copyInode = try copy.stat().inode
        let temp = temporaries.next(.copy)
        directories.journal.created(temp, inode: copyInode)
        let replaced = try directories.change {
            try copy.link(into: dir, as: temp)
            return try exchange(
                temp, with: name, in: dir, expectedInode: st.inode, tempInode: copyInode,
                journal: directories.journal, lease: source)
        }
        guard replaced != nil else {
            directories.journal.keep(temp)
            throw LeftTemporary()
        }
    }
}

/// A temporary name was left because it held a file hashify did not put there.
struct LeftTemporary: Error {}
