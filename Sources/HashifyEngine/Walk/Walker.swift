import HashifySystem
import SystemPackage

/// Per-guest counts from the walk.
public struct GuestCounts: Sendable, Codable {
    public var directories = 0
    public var regularFiles = 0
    public var symlinks = 0
    public var otherFiles = 0
    public var excluded = 0
    public var conffiles = 0
    public var belowMinimumSize = 0
    public var regularBytes: UInt64 = 0
    public init() {}
}

/// A guest root the walk starts from.
public struct GuestRoot: @unchecked Sendable {
    public var path: FilePath
    public var directory: Directory
    public var stat: FileStat
}

/// Walks guest roots into an `Inventory`: `getdents64` + `statx`, every
/// step relative to a directory descriptor opened with `O_NOFOLLOW`, never
/// crossing a mount point, never following a symlink.
public struct Walker {
    public static let temporaryPrefix: [UInt8] = Array(".hashify~".utf8)

    public var filter: PathFilter
    /// Filters of single guests (by index) that replace `filter` for them.
    public var guestFilters: [Int: PathFilter] = [:]
    public var minimumSize: UInt64
    /// Called every few thousand entries with (entries seen so far).
    public var onProgress: ((Int) -> Void)?

    public init(filter: PathFilter, minimumSize: UInt64) {
        self.filter = filter
        self.minimumSize = minimumSize
    }

    /// A temporary name found by the walk (to be cleaned up).
    public struct TemporaryName: Sendable {
        public var directory: Int32
        public var name: FileName
    }

    public struct Result: Sendable {
        public var inventory = Inventory()
        public var counts: [GuestCounts] = []
        public var skips: [Skip] = []
        public var temporaries: [TemporaryName] = []
    }

    struct Pending {
        var parent: Directory
        var parentID: Int32
        var name: [UInt8]
        var path: [UInt8]
        var stat: FileStat
        var scope: PathFilter.Scope
    }

    /// A directory being listed.
    struct Frame {
        var directory: Directory
        var id: Int32
        var path: [UInt8]
        var scope: PathFilter.Scope
    }

    public func walk(_ roots: [GuestRoot], conffiles: [Set<[UInt8]>]) -> Result {
        var result = Result()
        result.inventory.device = roots.first?.stat.device ?? 0
        let filters = roots.indices.map { guestFilters[$0] ?? filter }
        let warmer = MetadataWarmer(roots: roots, filters: filters)
        warmer.start()
        defer { warmer.stop() }
        var seen = 0
        for (g, root) in roots.enumerated() {
            warmer.walkReached(g)
            var guest = GuestWalk(
                walker: self, index: g, root: root, filter: filters[g],
                conffiles: conffiles.indices.contains(g) ? conffiles[g] : [], seen: seen)
            guest.run(into: &result)
            seen = guest.seen
            result.counts.append(guest.counts)
        }
        return result
    }

    /// One guest's walk, depth first in name order: the directories open and
    /// being listed (`stack`), the subdirectories still to open (`pending`),
    /// and the guest's counts.
    struct GuestWalk {
        let walker: Walker
        let index: Int
        let root: GuestRoot
        /// The guest's filesystem and mount: an entry outside is a mount point, left alone.
        let boundary: TreeBoundary
        let filter: PathFilter
        let conffiles: Set<[UInt8]>
        /// Directories that hold conffiles: only their files are looked up.
        let conffileDirectories: Set<[UInt8]>
        var counts = GuestCounts()
        /// Entries seen in all guests so far (for progress).
        var seen: Int
        var stack: [Frame] = []
        var pending: [Pending] = []

        init(walker: Walker, index: Int, root: GuestRoot, filter: PathFilter, conffiles: Set<[UInt8]>, seen: Int) {
            self.walker = walker
            self.index = index
            self.root = root
            self.boundary = TreeBoundary(root: root.stat)
            self.filter = filter
            self.conffiles = conffiles
            self.conffileDirectories = Set(conffiles.map { p in Array(p[..<(p.lastIndex(of: 0x2f) ?? 0)]) })
            self.seen = seen
        }

        mutating func run(into result: inout Result) {
            let rootID = result.inventory.addDirectory(
                parent: -1, guest: UInt16(index), name: nil, length: 0, stat: root.stat)
            stack = [Frame(directory: root.directory, id: rootID, path: [], scope: filter.rootScope)]
            while let frame = nextFrame(&result) { list(frame, into: &result) }
        }

        /// The next directory to list: an open one, else the next pending
        /// subdirectory, opened and checked to be the one its parent listed.
        mutating func nextFrame(_ result: inout Result) -> Frame? {
            if let f = stack.popLast() { return f }
            while let p = pending.popLast() {
                let child: Directory
                do {
                    child = try withCName(p.name) { try p.parent.openDirectory(cName: $0) }
                    let st = try child.stat()
                    guard st.inode == p.stat.inode, st.device == p.stat.device, st.mountID == p.stat.mountID else {
                        result.skips.append(Skip(guest: index, path: p.path, reason: .changedDuringRun))
                        continue
                    }
                } catch Errno.noSuchFileOrDirectory {
                    continue  // vanished: nothing to do
                } catch {
                    let e = errnoCode(error)
                    result.skips.append(
                        Skip(
                            guest: index, path: p.path,
                            reason: e == .tooManySymbolicLinkLevels || e == .notDirectory
                                ? .changedDuringRun : .failed(OperationError(.openDirectory, error))))
                    continue
                }
                let id = p.name.withUnsafeBufferPointer { b in
                    b.withMemoryRebound(to: CChar.self) {
                        result.inventory.addDirectory(
                            parent: p.parentID, guest: UInt16(index), name: $0.baseAddress!, length: $0.count,
                            stat: p.stat)
                    }
                }
                counts.directories += 1
                return Frame(directory: child, id: id, path: p.path, scope: p.scope)
            }
            return nil
        }

        /// Lists one directory: files into the inventory, subdirectories onto
        /// `pending` in name order (a stable preorder).
        mutating func list(_ frame: Frame, into result: inout Result) {
            let holdsConffiles = !conffiles.isEmpty && conffileDirectories.contains(frame.path)
            var subdirs: [Pending] = []
            do {
                try frame.directory.forEachEntry { cName, type, _ in
                    visit(cName, type: type, in: frame, holdsConffiles: holdsConffiles, subdirs: &subdirs, &result)
                }
            } catch {
                result.skips.append(
                    Skip(
                        guest: index, path: frame.path.isEmpty ? [0x2f] : frame.path,
                        reason: .failed(OperationError(.readDirectory, error))))
            }
            subdirs.sort { $0.name.lexicographicallyPrecedes($1.name) }
            pending.append(contentsOf: subdirs.reversed())
        }

        /// One entry of a directory: counted, filtered, and a regular file added to the inventory.
        @inline(__always)
        mutating func visit(
            _ cName: UnsafePointer<CChar>, type: UInt8, in frame: Frame, holdsConffiles: Bool,
            subdirs: inout [Pending], _ result: inout Result
        ) {
            seen += 1
            if seen & 4095 == 0 { walker.onProgress?(seen) }
            let name = PathFilter.Name(cString: cName, count: nameLength(cName))
            if name.bytes.starts(with: Walker.temporaryPrefix) {
                result.temporaries.append(TemporaryName(directory: frame.id, name: FileName(bytes: name.bytes)))
                return
            }
            // DT_LNK, DT_CHR, DT_BLK, DT_FIFO, DT_SOCK: no statx needed.
            switch type {
            case 10:
                counts.symlinks += 1
                return
            case 1, 2, 6, 12:
                counts.otherFiles += 1
                return
            default: break
            }
            let dirPath = frame.path
            // The entry's guest-absolute path, built only when it is needed.
            func path() -> [UInt8] {
                var p = dirPath
                p.reserveCapacity(dirPath.count + 1 + name.bytes.count)
                p.append(0x2f)
                p.append(contentsOf: name.bytes)
                return p
            }
            let st: FileStat
            do {
                st = try frame.directory.stat(cName: cName)
            } catch Errno.noSuchFileOrDirectory {
                return
            } catch {
                result.skips.append(Skip(guest: index, path: path(), reason: .failed(OperationError(.stat, error))))
                return
            }
            if st.isDirectory {
                if !boundary.contains(st) {
                    result.skips.append(Skip(guest: index, path: path(), reason: .mountPoint))
                    return
                }
                let sub = filter.enter(frame.scope, name, path: path)
                if sub.verdict == .excluded {
                    counts.excluded += 1
                    return
                }
                subdirs.append(
                    Pending(
                        parent: frame.directory, parentID: frame.id, name: Array(name.bytes), path: path(), stat: st,
                        scope: sub))
            } else if st.isRegular {
                if !boundary.contains(st) {
                    result.skips.append(Skip(guest: index, path: path(), reason: .mountPoint))
                    return
                }
                if !filter.includesFile(in: frame.scope, name, path: path) {
                    counts.excluded += 1
                    return
                }
                if holdsConffiles && conffiles.contains(path()) {
                    counts.conffiles += 1
                    return
                }
                counts.regularFiles += 1
                counts.regularBytes += st.size
                if st.size < walker.minimumSize {
                    counts.belowMinimumSize += 1
                    return
                }
                if st.isImmutableOrAppendOnly {
                    result.skips.append(Skip(guest: index, path: path(), reason: .immutableOrAppendOnly))
                    return
                }
                result.inventory.addFile(directory: frame.id, name: cName, length: name.bytes.count, stat: st)
            } else if st.isSymlink {
                counts.symlinks += 1
            } else {
                counts.otherFiles += 1
            }
        }
    }
}
