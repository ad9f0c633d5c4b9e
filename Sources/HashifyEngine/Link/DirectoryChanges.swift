import HashifySystem

/// Changes to guest directories, one directory at a time in walk order:
/// journals the directory before its first change and gives it its walked
/// mtime back after the last one, but only while every change to it was
/// hashify's own: the mtime is compared before each change with the one the
/// walk saw or the previous change left, and once more at the end, so a
/// guest's own change to the directory meanwhile keeps the mtime it gave.
final class DirectoryChanges {
    let inventory: Inventory
    let roots: [GuestRoot]
    let journal: RunJournal
    let opener: DirectoryOpener
    private var current: Int32 = -1
    private var currentDirectory: Directory?
    /// The mtime the directory has if nobody but this run changed it.
    private var expected: Timestamp?
    private var restore = false

    init(inventory: Inventory, roots: [GuestRoot], journal: RunJournal) {
        self.inventory = inventory
        self.roots = roots
        self.journal = journal
        self.opener = DirectoryOpener(inventory: inventory, roots: roots.map(\.directory))
    }

    /// The open directory `id`, finishing the previous one first.
    func enter(_ id: Int32) throws -> Directory {
        if id == current, let d = currentDirectory { return d }
        finish()
        let d = try opener.open(id)
        let entry = inventory.directories[Int(id)]
        expected = entry.modificationTime
        restore = false
        journal.beginDirectory(
            root: Array(roots[Int(entry.guest)].path.string.utf8), inode: entry.inode,
            mtime: entry.modificationTime)
        current = id
        currentDirectory = d
        return d
    }

    /// Runs `change` (which changes entries of the current directory),
    /// noting whether the directory was changed by someone else before it.
    func change<T>(_ change: () throws -> T) rethrows -> T {
        guard let d = currentDirectory else { return try change() }
        if let e = expected, (try? d.stat().modificationTime) != e { expected = nil }  // someone else's change
        defer {
            if expected != nil {
                expected = try? d.stat().modificationTime
                restore = true
            }
        }
        return try change()
    }

    /// Gives the current directory its mtime back (when only this run
    /// changed it) and closes the journal entry.
    func finish() {
        guard current >= 0, let d = currentDirectory else { return }
        if restore, let e = expected, (try? d.stat().modificationTime) == e {
            try? d.setModificationTime(inventory.directories[Int(current)].modificationTime)
        }
        journal.endDirectory()
        currentDirectory = nil
        current = -1
    }
}

/// A temporary name of this run: `.hashify~RUNID~KN`, where K says what it
/// holds before its exchange: `l` a link to a store object, `c` a private
/// copy being written (redundant until exchanged: the original is in place).
struct TemporaryNames {
    enum Kind: UInt8 {
        case link = 0x6c
        case copy = 0x63
    }
    let prefix: [UInt8]
    var counter = 0
    init(runID: String) { prefix = Walker.temporaryPrefix + Array("\(runID)~".utf8) }
    mutating func next(_ kind: Kind) -> FileName {
        counter += 1
        return FileName(prefix + [kind.rawValue] + Array(String(counter).utf8))
    }
}

/// Raised when a name no longer refers to the inode hashify checked.
struct NameMoved: Error {}

/// Raised when a writer opened the victim while the exchange was under way
/// (its lease broke): the exchange was undone, the writer's file is at its name.
struct WriterArrived: Error {}

/// Puts `temp` (already in `dir`, holding inode `tempInode`) in place of
/// `name` with one atomic `renameat2(RENAME_EXCHANGE)`, announced in the
/// journal first, then removes what came out — but only if it is
/// `expectedInode`, and only while `lease` (the victim's read lease, when the
/// caller holds one) is unbroken: a writer that opened the victim during the
/// exchange is waiting on that lease, so the exchange is undone and the
/// victim stays at its name, where the writer's data lands (`WriterArrived`).
/// If a guest renamed another file to `name` meanwhile, the exchange is
/// undone and `NameMoved` thrown; the guest's file is never removed. Returns
/// what came out as it was before its temporary name was removed, or nil
/// when the temporary name was left because it no longer held `tempInode`
/// (reported by the caller).
func exchange(
    _ temp: FileName, with name: FileName, in dir: Directory, expectedInode: UInt64, tempInode: UInt64,
    journal: RunJournal, lease: OpenFile? = nil
) throws -> FileStat? {
    journal.exchanging(temp, with: name, ours: tempInode, expected: expectedInode)
    do {
        try dir.rename(temp, to: dir, as: name, flags: .exchange)
    } catch {
        // Not exchanged: the temporary name still holds this run's inode, which goes again.
        if (try? dir.stat(temp))?.inode != tempInode || (try? dir.unlink(temp)) == nil { journal.leaveForRecovery() }
        throw OperationError(.exchange, error)
    }
    let out: FileStat
    do { out = try dir.stat(temp) } catch {
        journal.leaveForRecovery()
        throw OperationError(.stat, error)
    }
    if out.inode == expectedInode && lease?.holdsReadLease != false {
        do { try dir.unlink(temp) } catch {
            journal.leaveForRecovery()  // the replaced file under its temporary name: the next run removes it
            throw OperationError(.removeReplaced, error)
        }
        return out
    }
    do { try dir.rename(temp, to: dir, as: name, flags: .exchange) } catch {
        journal.leaveForRecovery()  // the guest's file under the temporary name: recovery puts it back
        throw OperationError(.exchange, error)
    }
    if (try? dir.stat(temp))?.inode == tempInode {
        try? dir.unlink(temp)
        if out.inode == expectedInode { throw WriterArrived() }
        throw NameMoved()
    }
    return nil
}
