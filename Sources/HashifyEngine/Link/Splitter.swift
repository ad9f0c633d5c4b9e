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
    /// An inode in one guest.
    struct InodeInGuest: Hashable {
        var inode: Int32
        var guest: UInt16
    }

    /// By inode and guest, while more of its names in that guest are to come:
    /// the private copy its first name got, which its other names in the
    /// guest then link (guest-local hard links stay one inode; each guest gets
    /// its own copy), the state of the original after the last exchange, and
    /// how many names are left.
    var copies: [InodeInGuest: (file: OpenFile, inode: UInt64, original: FileStat, left: Int)] = [:]

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
            let index = inventory.names[Int(n)].inodeIndex
            let inode = inventory.inodes[Int(index)].inode
            let key = InodeInGuest(inode: index, guest: inventory.guest(ofName: n))
            do {
                let dir = try directories.enter(inventory.names[Int(n)].directory)
                if let copy = copies[key] {
                    copies[key] = copy.left > 1 ? copy : nil
                    let original = try linkToCopy(dir, inventory.fileName(n), expectedInode: inode, copy: copy)
                    if copy.left > 1 {
                        copies[key]!.original = original
                        copies[key]!.left -= 1
                    }
                } else {
                    let copy = try splitOne(dir, inventory.fileName(n), expectedInode: inode)
                    let names = inventory.names(of: index).filter { inventory.guest(ofName: $0) == key.guest }.count
                    if names > 1 { copies[key] = (copy.file, copy.inode, copy.original, names - 1) }
                }
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

    /// Gives `name` a private copy of its inode; returns the copy (open), its inode and the original's state.
    func splitOne(_ dir: Directory, _ name: FileName, expectedInode: UInt64) throws -> (
        file: OpenFile, inode: UInt64, original: FileStat
    ) {
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
        // The original as it is now (our own exchange moved its ctime), still under lease.
        return (copy, copyInode, try source.stat())
    }

    /// Makes another name of an inode already split in this guest a name of
    /// its copy (one atomic exchange, under a lease on the original, which must
    /// be as it was when copied): guest-local hard links stay hard links.
    func linkToCopy(
        _ dir: Directory, _ name: FileName, expectedInode: UInt64,
        copy: (file: OpenFile, inode: UInt64, original: FileStat, left: Int)
    ) throws -> FileStat {
        let source = try dir.openFileForReading(name)
        try source.takeReadLease()
        defer { source.releaseLease() }
        let st = try source.stat()
        guard st.inode == expectedInode, st.sameContentState(as: copy.original) else { throw HardlinkLinker.Mismatch() }
        let temp = temporaries.next(.link)
        directories.journal.created(temp, inode: copy.inode)
        let replaced = try directories.change {
            try copy.file.link(into: dir, as: temp)
            return try exchange(
                temp, with: name, in: dir, expectedInode: st.inode, tempInode: copy.inode,
                journal: directories.journal, lease: source)
        }
        guard replaced != nil else {
            directories.journal.keep(temp)
            throw LeftTemporary()
        }
        return try source.stat()
    }
}

/// A temporary name was left because it held a file hashify did not put there.
struct LeftTemporary: Error {}
