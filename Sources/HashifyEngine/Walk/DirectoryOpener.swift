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

    init(inventory: Inventory, roots: [Directory], capacity: Int = DescriptorBudget().linkerCacheCapacity) {
        self.inventory = inventory
        self.roots = roots
        self.capacity = capacity
    }

    /// Raised when a directory on the chain is no longer the walked one.
    struct DirectoryChanged: Error {}

    func open(_ id: Int32) throws -> Directory {
        if let d = open[id] { return d }
        let entry = inventory.directories[Int(id)]
        if entry.parent < 0 { return roots[Int(entry.guest)] }
        let parent = try open(entry.parent)
        let child = try retryingWhenOutOfDescriptors { try parent.openDirectory(inventory.directoryName(id)) }
        let st = try child.stat()
        guard st.inode == entry.inode, st.mountID == rootMountID(entry.guest) else { throw DirectoryChanged() }
        if open.count >= capacity { open.removeAll(keepingCapacity: true) }
        open[id] = child
        return child
    }

    /// Runs `body`; if the process is out of descriptors (`EMFILE`, which
    /// the budget should prevent), closes this cache's directories and runs
    /// it once more, so that the limit never costs a file.
    func retryingWhenOutOfDescriptors<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch Errno.tooManyOpenFiles {
            open.removeAll(keepingCapacity: true)
            return try body()
        } catch {
            throw error
        }
    }

    private func rootMountID(_ guest: UInt16) -> UInt64 {
        if let m = mountIDs[guest] { return m }
        let m = (try? roots[Int(guest)].stat().mountID) ?? 0
        mountIDs[guest] = m
        return m
    }
}
