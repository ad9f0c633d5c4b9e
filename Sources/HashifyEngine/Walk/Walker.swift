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
        var seen = 0
        let filters = roots.indices.map { guestFilters[$0] ?? filter }
        let warmer = MetadataWarmer(roots: roots, filters: filters)
        warmer.start()
        defer { warmer.stop() }
        for (g, root) in roots.enumerated() {
            warmer.walkReached(g)
            let filter = filters[g]
            var counts = GuestCounts()
            let guest = UInt16(g)
            let rootID = result.inventory.addDirectory(parent: -1, guest: guest, name: nil, length: 0, stat: root.stat)
            var stack = [Frame(directory: root.directory, id: rootID, path: [], scope: filter.rootScope)]
            var pending: [Pending] = []
            let guestConffiles = conffiles.indices.contains(g) ? conffiles[g] : []
            // Directories that hold conffiles: only their files are looked up.
            let conffileDirectories = Set(guestConffiles.map { p in Array(p[..<(p.lastIndex(of: 0x2f) ?? 0)]) })
            while true {
                // Open the next pending subdirectory, or take the next open one.
                var frame: Frame
                if let f = stack.popLast() {
                    frame = f
                } else if let p = pending.popLast() {
                    let child: Directory
                    do {
                        child = try withCName(p.name) { try p.parent.openDirectory(cName: $0) }
                        let st = try child.stat()
                        guard st.inode == p.stat.inode, st.device == p.stat.device, st.mountID == p.stat.mountID else {
                            result.skips.append(Skip(guest: g, path: p.path, reason: .changedDuringRun))
                            continue
                        }
                    } catch Errno.noSuchFileOrDirectory {
                        continue  // vanished: nothing to do
                    } catch {
                        let e = errnoCode(error)
                        result.skips.append(
                            Skip(
                                guest: g, path: p.path,
                                reason: e == .tooManySymbolicLinkLevels || e == .notDirectory
                                    ? .changedDuringRun : .failed(OperationError(.openDirectory, error))))
                        continue
                    }
                    let id = p.name.withUnsafeBufferPointer { b in
                        b.withMemoryRebound(to: CChar.self) {
                            result.inventory.addDirectory(
                                parent: p.parentID, guest: guest, name: $0.baseAddress!, length: $0.count, stat: p.stat)
                        }
                    }
                    counts.directories += 1
                    frame = Frame(directory: child, id: id, path: p.path, scope: p.scope)
                } else {
                    break
                }
                let dir = frame.directory
                let dirID = frame.id
                let dirPath = frame.path
                let scope = frame.scope
                let holdsConffiles = !guestConffiles.isEmpty && conffileDirectories.contains(dirPath)
                var subdirs: [Pending] = []
                do {
                    try dir.forEachEntry { cName, type, _ in
                        seen += 1
                        if seen & 4095 == 0 { onProgress?(seen) }
                        let name = PathFilter.Name(cString: cName, count: nameLength(cName))
                        if name.bytes.starts(with: Self.temporaryPrefix) {
                            result.temporaries.append(
                                TemporaryName(directory: dirID, name: FileName(bytes: name.bytes)))
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
                            st = try dir.stat(cName: cName)
                        } catch Errno.noSuchFileOrDirectory {
                            return
                        } catch {
                            result.skips.append(
                                Skip(guest: g, path: path(), reason: .failed(OperationError(.stat, error))))
                            return
                        }
                        if st.isDirectory {
                            if st.mountID != root.stat.mountID || st.device != root.stat.device {
                                result.skips.append(Skip(guest: g, path: path(), reason: .mountPoint))
                                return
                            }
                            let sub = filter.enter(scope, name, path: path)
                            if sub.verdict == .excluded {
                                counts.excluded += 1
                                return
                            }
                            subdirs.append(
                                Pending(
                                    parent: dir, parentID: dirID, name: Array(name.bytes), path: path(), stat: st,
                                    scope: sub))
                        } else if st.isRegular {
                            if st.mountID != root.stat.mountID || st.device != root.stat.device {
                                result.skips.append(Skip(guest: g, path: path(), reason: .mountPoint))
                                return
                            }
                            if !filter.includesFile(in: scope, name, path: path) {
                                counts.excluded += 1
                                return
                            }
                            if holdsConffiles && guestConffiles.contains(path()) {
                                counts.conffiles += 1
                                return
                            }
                            counts.regularFiles += 1
                            counts.regularBytes += st.size
                            if st.size < minimumSize {
                                counts.belowMinimumSize += 1
                                return
                            }
                            if st.isImmutableOrAppendOnly {
                                result.skips.append(Skip(guest: g, path: path(), reason: .immutableOrAppendOnly))
                                return
                            }
                            result.inventory.addFile(directory: dirID, name: cName, length: name.bytes.count, stat: st)
                        } else if st.isSymlink {
                            counts.symlinks += 1
                        } else {
                            counts.otherFiles += 1
                        }
                    }
                } catch {
                    result.skips.append(
                        Skip(
                            guest: g, path: dirPath.isEmpty ? [0x2f] : dirPath,
                            reason: .failed(OperationError(.readDirectory, error))))
                }
                // Visit subdirectories in name order for a stable preorder.
                subdirs.sort { $0.name.lexicographicallyPrecedes($1.name) }
                pending.append(contentsOf: subdirs.reversed())
            }
            result.counts.append(counts)
        }
        return result
    }
}
