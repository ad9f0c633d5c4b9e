import HashifySystem
import SystemPackage

/// Builds sample guests from real files of the host: copies of parts of
/// /usr with every attribute (mode, owner, mtime, xattrs), so `hashify demo`
/// shows a real unification on any Linux machine.
public struct DemoGuests {
    public var parent: FilePath
    public var guestCount = 3
    /// At most this many bytes of host files per guest.
    public var bytesPerGuest: UInt64 = 48 << 20
    public var sources: [FilePath] = [
        "/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/share/perl5",
    ]

    public init(parent: FilePath) { self.parent = parent }

    /// What was built.
    public struct Built: Sendable {
        public var directory: FilePath
        public var roots: [FilePath]
        public var files: Int
    }

    public func build() throws -> Built {
        let dirPath: FilePath
        do { dirPath = try makeTemporaryDirectory(parent.string + "/hashify-demo.XXXXXX") } catch {
            throw InputError("\(parent): cannot create a directory: \(error)")
        }
        let top = try Directory.open(path: dirPath)
        try top.makeDirectory(FileName("guests"), mode: 0o755)
        let guests = try top.openDirectory(FileName("guests"))
        var roots: [FilePath] = []
        var files = 0
        for g in 1...guestCount {
            let name = FileName("guest\(g)")
            try guests.makeDirectory(name, mode: 0o755)
            let root = try guests.openDirectory(name)
            var budget = bytesPerGuest
            for src in sources {
                guard let s = try? Directory.open(path: src) else { continue }
                // Recreate the source's path inside the guest (usr/bin, ...).
                var dest = root
                for comp in src.components {
                    let c = FileName(comp.string)
                    do { try dest.makeDirectory(c, mode: 0o755) } catch Errno.fileExists {}
                    dest = try dest.openDirectory(c)
                }
                files += try copyTree(from: s, to: dest, budget: &budget)
                try? dest.setModificationTime(try s.stat().modificationTime)
            }
            // The same text file in every guest: the demo writes to it in one guest to show copy-on-write.
            try Self.writeSample(root)
            // Guest-specific state: excluded /etc, a locally changed file, an extra file.
            try root.makeDirectory(FileName("etc"), mode: 0o755)
            let etc = try root.openDirectory(FileName("etc"))
            let host = try etc.createFile(FileName("hostname"), mode: 0o644)
            try host.write(Array("guest\(g)\n".utf8))
            if g == guestCount {
                let local = try root.openDirectory(FileName("usr")).openDirectory(FileName("bin"))
                let f = try local.createFile(FileName("guest-local-tool"), mode: 0o755)
                try f.write(Array("#!/bin/sh\necho only in guest\(g)\n".utf8))
            }
            roots.append(dirPath.appending("guests").appending("guest\(g)"))
        }
        return Built(directory: dirPath, roots: roots, files: files)
    }

    /// The path below each guest root of the file that is the same in every guest.
    public static let samplePath: [String] = ["usr", "share", "hashify-demo", "README"]
    /// Its content.
    public static let sampleContent: [UInt8] = Array(
        String(
            repeating: "This file is the same in every sample guest; hashify demo writes to it in one of them.\n",
            count: 64
        ).utf8)

    static func writeSample(_ root: Directory) throws {
        var dir = root
        for c in samplePath.dropLast() {
            do { try dir.makeDirectory(FileName(c), mode: 0o755) } catch Errno.fileExists {}
            dir = try dir.openDirectory(FileName(c))
        }
        let f = try dir.createFile(FileName(samplePath.last!), mode: 0o644)
        try f.write(sampleContent)
        try f.setModificationTime(Timestamp(seconds: 1_700_000_000, nanoseconds: 0))
    }

    /// Copies regular files, symlinks and directories (not devices), with
    /// mode, owner, mtime and xattrs; stops when the budget is spent.
    func copyTree(from src: Directory, to dst: Directory, budget: inout UInt64) throws -> Int {
        var files = 0
        var traversal = TreeTraversal<Directory>()
        traversal.mountPoints = .skip
        traversal.skipVanished = true
        try traversal.run(src, context: dst) { entry, dst in
            let (src, name, st) = (entry.directory, entry.name, entry.stat)
            guard budget > 0 else { return .next }
            if st.isRegular {
                guard st.size <= budget, let input = try? src.openFileForReading(name) else { return .next }
                let out = try dst.createFile(name, mode: 0o600)
                try input.copyContent(to: out, size: st.size)
                try out.setOwner(uid: st.uid, gid: st.gid)
                try out.setMode(st.mode)
                for a in (try? input.extendedAttributes()) ?? [] { try? out.setExtendedAttribute(a) }
                try out.setModificationTime(st.modificationTime)
                budget -= min(budget, st.size)
                files += 1
            } else if st.isSymlink {
                guard let target = try? src.readLink(name) else { return .next }
                try dst.makeSymlink(name, target: target)
                try? dst.changeOwner(of: name, uid: st.uid, gid: st.gid)
                try? dst.setModificationTime(of: name, st.modificationTime)
            } else if st.isDirectory {
                try dst.makeDirectory(name, mode: st.mode & 0o7777)
                try? dst.changeOwner(of: name, uid: st.uid, gid: st.gid)
                return .enter(try dst.openDirectory(name))
            }
            return .next
        } leave: { dir, dst in
            // A directory's mtime last, after its entries were made.
            if let st = try? dir.stat() { try? dst.setModificationTime(st.modificationTime) }
        }
        return files
    }
}

/// Disk use of trees as du counts it: allocated blocks, each inode once.
public struct DiskUsage: Sendable {
    public var bytes: UInt64 = 0
    public var files = 0
    /// Regular-file inodes with more than one name.
    public var sharedInodes = 0
    /// Names of those shared inodes.
    public var sharedPaths = 0

    public static func measure(_ roots: [FilePath]) throws -> DiskUsage {
        var u = DiskUsage()
        var seen = Set<InodeKey>()
        var shared = Set<InodeKey>()
        for r in roots {
            let d = try Directory.open(path: r)
            let st = try d.stat()
            if seen.insert(InodeKey(device: st.device, inode: st.inode)).inserted { u.bytes += st.allocatedBytes }
            var traversal = TreeTraversal<Void>()
            traversal.mountPoints = .visit
            traversal.skipVanished = true
            try traversal.run(d, context: ()) { entry, _ in
                let st = entry.stat
                let key = InodeKey(device: st.device, inode: st.inode)
                if st.isRegular {
                    u.files += 1
                    if st.linkCount > 1 {
                        u.sharedPaths += 1
                        shared.insert(key)
                    }
                }
                if seen.insert(key).inserted { u.bytes += st.allocatedBytes }
                return st.isDirectory && !entry.isMountPoint ? .enter(()) : .next
            }
        }
        u.sharedInodes = shared.count
        return u
    }
}

/// Removes a tree (used for the demo's own temporary directory only).
public func removeTree(_ path: FilePath) throws {
    try Directory.open(path: path).removeContents()
    try? removeEmptyDirectory(path)
}
