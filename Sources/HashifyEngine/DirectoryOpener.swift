import HashifySystem
import SystemPackage

/// Re-opens walked directories by their chain of names from the guest root,
/// one `openat(O_NOFOLLOW)` a level, checking that each level is still the
/// inode the walk saw. Keeps the current chain open, so visiting directories
/// in walk (preorder) order opens each one once.
final class DirectoryOpener {
    let inventory: Inventory
    let roots: [Directory]
    private var stack: [(id: Int32, dir: Directory)] = []

    init(inventory: Inventory, roots: [Directory]) {
        self.inventory = inventory
        self.roots = roots
    }

    /// Raised when a directory on the chain is no longer the walked one.
    struct DirectoryChanged: Error {}

    func open(_ id: Int32) throws -> Directory {
        if let top = stack.last, top.id == id { return top.dir }
        let chain = inventory.chain(id)
        // Keep the common prefix of the open stack and the wanted chain.
        var keep = 0
        while keep < stack.count && keep < chain.count && stack[keep].id == chain[keep] { keep += 1 }
        stack.removeLast(stack.count - keep)
        if stack.isEmpty {
            let rootID = chain[0]
            stack.append((rootID, roots[Int(inventory.directories[Int(rootID)].guest)]))
            keep = 1
        }
        for level in keep..<chain.count {
            let d = chain[level]
            let entry = inventory.directories[Int(d)]
            let child = try stack[stack.count - 1].dir.openDirectory(inventory.directoryName(d))
            let st = try child.stat()
            guard st.inode == entry.inode, st.mountID == rootMountID(entry.guest) else { throw DirectoryChanged() }
            stack.append((d, child))
        }
        return stack[stack.count - 1].dir
    }

    private var mountIDs: [UInt16: UInt64] = [:]
    private func rootMountID(_ guest: UInt16) -> UInt64 {
        if let m = mountIDs[guest] { return m }
        let m = (try? roots[Int(guest)].stat().mountID) ?? 0
        mountIDs[guest] = m
        return m
    }

    func reset() { stack.removeAll() }
}
