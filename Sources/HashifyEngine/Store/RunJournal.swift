import HashifySystem
import SystemPackage

/// The record of a run that changes guests: STORE/runs/RUNID. It exists
/// (fsync'ed) before the first change and is removed after the last one, so a
/// killed run leaves it behind. It names the directory being changed and its
/// original mtime; plain appends survive SIGKILL (the page cache keeps them).
public final class RunJournal: @unchecked Sendable {
    public let runID: String
    let file: OpenFile
    let store: Store

    init(store: Store, runID: String) throws {
        self.store = store
        self.runID = runID
        try store.beginRun(runID)
        file = try store.runs.openForAppending(FileName(runID), mode: 0o600)
    }

    /// Notes that directory (root, inode) with original mtime is about to change.
    func beginDirectory(root: [UInt8], inode: UInt64, mtime: Timestamp) {
        append("dir \(hexString(root)) \(inode) \(mtime.seconds) \(mtime.nanoseconds)\n")
    }

    /// Notes that the directory is complete (its mtime given back).
    func endDirectory() {
        append("done\n")
    }

    /// Notes a temporary name that holds a guest's file (never to be removed).
    func keep(_ name: FileName) { append("keep \(hexString(name.bytes))\n") }

    /// One write(2) per line on an O_APPEND descriptor: lines never interleave.
    private func append(_ line: String) {
        _ = line.utf8CString.withUnsafeBytes { b in Glibc.write(file.fd, b.baseAddress, b.count - 1) }
    }

    /// Temporary names a run marked as kept.
    static func keptNames(store: Store, runID: String) -> Set<[UInt8]> {
        guard let f = try? store.runs.openFileForReading(FileName(runID)), let data = try? f.readAll() else { return [] }
        var kept = Set<[UInt8]>()
        for line in data.split(separator: 0x0a) {
            let fields = line.split(separator: 0x20)
            if fields.count == 2, fields[0].elementsEqual("keep".utf8), let n = bytesFromHex(fields[1]) { kept.insert(n) }
        }
        return kept
    }

    func finish() { store.endRun(runID) }

    /// A directory an unfinished run was changing when it stopped.
    public struct OpenDirectory: Hashable, Sendable {
        public var root: [UInt8]
        public var inode: UInt64
        public var mtime: Timestamp
    }

    /// The directory a killed run left half-changed, if any.
    static func openDirectory(store: Store, runID: String) -> OpenDirectory? {
        guard let f = try? store.runs.openFileForReading(FileName(runID)), let data = try? f.readAll() else { return nil }
        var open: OpenDirectory?
        for line in data.split(separator: 0x0a) {
            let fields = String(decoding: line, as: UTF8.self).split(separator: " ")
            if fields.count == 5, fields[0] == "dir", let root = bytesFromHex(Array(fields[1].utf8)),
               let ino = UInt64(fields[2]), let s = Int64(fields[3]), let ns = UInt32(fields[4]) {
                open = OpenDirectory(root: root, inode: ino, mtime: Timestamp(seconds: s, nanoseconds: ns))
            } else if fields.first == "done" {
                open = nil
            }
        }
        return open
    }
}

#if canImport(Glibc)
import Glibc
#endif
