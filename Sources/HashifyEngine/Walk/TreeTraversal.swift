import HashifySystem
import SystemPackage

/// Where a tree ends: the filesystem and mount of its root. An entry on
/// another device or mount is a mount point inside the tree, never entered.
/// Every traversal in hashify (the inventory walk, `TreeTraversal`) uses it.
struct TreeBoundary {
    let device: UInt64
    let mountID: UInt64

    init(root: FileStat) {
        device = root.device
        mountID = root.mountID
    }

    func contains(_ st: FileStat) -> Bool { st.device == device && st.mountID == mountID }
}

/// The traversal of a tree read whole, entry by entry (a metadata layer
/// built from a guest, a guest listed for its manifest, a layer scanned for
/// its stubs): depth first in name order, every entry stat'ed relative to
/// its directory's descriptor (`statx`, `AT_SYMLINK_NOFOLLOW`), a
/// subdirectory opened with `O_NOFOLLOW` and checked to be the inode its
/// parent listed, never a symlink followed, never another mount entered
/// (`TreeBoundary`). The stack is explicit, so a tree of any depth is read.
/// The inventory walk (`Walker`) keeps the same rules but asks `statx` only
/// what `d_type` cannot tell, for speed on whole guests.
struct TreeTraversal<Context> {
    /// One entry of the tree.
    struct Entry {
        var directory: Directory
        var name: FileName
        var stat: FileStat
        /// Below the root, without a leading slash.
        var path: [UInt8]
        /// Another mount (given to the visitor only with `MountPoints.visit`).
        var isMountPoint: Bool
    }

    /// What to do after visiting an entry.
    enum Step {
        case next
        /// Enter this directory entry, with the context its entries are visited in.
        case enter(Context)
    }

    /// What is done with a directory that is another mount.
    enum MountPoints {
        /// Left out: not listed, not entered.
        case skip
        /// The traversal fails (`MountInside`): the tree was to be one filesystem.
        case fail
        /// Given to the visitor (which must not enter it).
        case visit
    }

    /// An error while reading or visiting one entry, with the entry's path below the root.
    struct EntryFailed: Error, CustomStringConvertible {
        var path: [UInt8]
        var error: any Error
        var description: String { "/\(escapedPath(path)): \(error)" }
    }

    /// A directory inside the tree that is a mount point.
    struct MountInside: Error, CustomStringConvertible {
        var path: [UInt8]
        var description: String {
            "\(escapedPath(path)) is a mount point (stop the guest and unmount what is mounted in it)"
        }
    }

    var mountPoints = MountPoints.fail
    /// Entries that vanish while being read are left out (a live tree), instead of failing the traversal.
    var skipVanished = false
    /// Called with an entry that vanished (in its parent's context).
    var onVanished: ((FileName, Context) -> Void)?
    /// Asked first with each name (in its directory's context): true when the
    /// caller knows the entry without reading it (it is then not stat'ed,
    /// visited or entered). Through an overlay mount a stat is a lookup in
    /// every layer, most of a fold's reading.
    var takeUnread: ((FileName, Context) throws -> Bool)?
    private(set) var vanished = 0

    private struct Frame {
        var directory: Directory
        var context: Context
        var names: [FileName]
        var next = 0
        var path: [UInt8]
    }

    static func sortedNames(_ dir: Directory) throws -> [FileName] {
        try dir.entryNames().sorted { $0.bytes.lexicographicallyPrecedes($1.bytes) }
    }

    /// Visits every entry below `root`; `leave` is called with each directory
    /// (the root last) once all its entries are visited.
    mutating func run(
        _ root: Directory, context: Context, visit: (Entry, Context) throws -> Step,
        leave: (Directory, Context) throws -> Void = { _, _ in }
    ) throws {
        let boundary = TreeBoundary(root: try root.stat())
        var stack = [Frame(directory: root, context: context, names: try Self.sortedNames(root), path: [])]
        while let top = stack.indices.last {
            guard stack[top].next < stack[top].names.count else {
                let done = stack.removeLast()
                do { try leave(done.directory, done.context) } catch let e as EntryFailed { throw e } catch {
                    throw EntryFailed(path: done.path, error: error)
                }
                continue
            }
            let frame = stack[top]
            let name = frame.names[frame.next]
            stack[top].next += 1
            let path = frame.path.isEmpty ? name.bytes : frame.path + [0x2f] + name.bytes
            do {
                if let takeUnread, try takeUnread(name, frame.context) { continue }
                let st = try frame.directory.stat(name)
                let isMountPoint = st.isDirectory && !boundary.contains(st)
                if isMountPoint {
                    switch mountPoints {
                    case .skip: continue
                    case .fail: throw MountInside(path: path)
                    case .visit: break
                    }
                }
                let entry = Entry(
                    directory: frame.directory, name: name, stat: st, path: path, isMountPoint: isMountPoint)
                guard case .enter(let context) = try visit(entry, frame.context) else { continue }
                let sub = try frame.directory.openDirectory(name)
                let now = try sub.stat()
                guard now.inode == st.inode, now.device == st.device else { throw Errno.noSuchFileOrDirectory }
                stack.append(Frame(directory: sub, context: context, names: try Self.sortedNames(sub), path: path))
            } catch Errno.noSuchFileOrDirectory where skipVanished {
                vanished += 1
                onVanished?(name, frame.context)
            } catch let e as EntryFailed {
                throw e
            } catch let e as MountInside {
                throw e
            } catch let e as InputError {
                throw e
            } catch {
                throw EntryFailed(path: path, error: error)
            }
        }
    }
}
