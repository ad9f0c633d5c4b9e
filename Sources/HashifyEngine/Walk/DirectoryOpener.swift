import HashifySystem
import SystemPackage

/// Re-opens walked directories by their chain of names from the guest root,
/// one `openat(O_NOFOLLOW)` a level, checking that each level is still the
/// inode the walk saw (and on the root's mount). Keeps up to `capacity`
/// directories open, so ancestors are opened once, whatever the order of visits.
final class DirectoryOpener {
    let inventory: Inventory
    let roots: [Directory]
    let capacity: Int
    private var open: [Int32: Directory] = [:]
    private var mountIDs: [UInt16: UInt64] = [:]

    init(inventory: Inventory, roots: [Directory], capacity: Int = DirectoryOpener.capacity(sharedBy: 8)) {
        self.inventory = inventory
        self.roots = roots
        self.capacity = capacity
    }

    /// How many directories one opener may keep open when `n` openers share
    /// the process's descriptor limit (at least 16, at most 2048).
    static func capacity(sharedBy n: Int) -> Int {
        min(2048, max(16, Int(clamping: openFileLimit()) / max(1, n)))
    }

    /// Raised when a directory on the chain is no longer the walked one.
    struct DirectoryChanged: Error {}

    func open(_ id: Int32) throws -> Directory {
        if let d = open[id] { return d }
        let entry = inventory.directories[Int(id)]
        if entry.parent < 0 { return roots[Int(entry.guest)] }
        let parent = try open(entry.parent)
        let child = try parent.openDirectory(inventory.directoryName(id))
        let st = try child.stat()
        guard st.inode == entry.inode, st.mountID == rootMountID(entry.guest) else { throw DirectoryChanged() }
        if open.count >= capacity { open.removeAll(keepingCapacity: true) }
        open[id] = child
        return child
    }

    private func rootMountID(_ guest: UInt16) -> UInt64 {
        if let m = mountIDs[guest] { return m }
        let m = (try? roots[Int(guest)].stat().mountID) ?? 0
        mountIDs[guest] = m
        return m
    }
}
