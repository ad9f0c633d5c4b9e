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
        file = try store.runs.openOrCreateFile(FileName(runID), mode: 0o600)
    }

    /// Notes that directory (root, inode) with original mtime is about to change.
    func beginDirectory(root: [UInt8], inode: UInt64, mtime: Timestamp) {
        append("dir \(hexString(root)) \(inode) \(mtime.seconds) \(mtime.nanoseconds)\n")
    }

    /// Notes that the directory's changes (and its mtime) are complete.
    func endDirectory() {
        append("done\n")
    }

    /// Notes a temporary name that holds a guest's file (never to be removed).
    func keep(_ name: FileName) { append("keep \(hexString(name.bytes))\n") }

    private func append(_ line: String) {
        var off: UInt64 = 0
        if let st = try? file.stat() { off = st.size }
        _ = line.utf8CString.withUnsafeBytes { b in Glibc.pwrite(file.fd, b.baseAddress, b.count - 1, Glibc.off_t(off)) }
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
        var last: OpenDirectory?
        for line in data.split(separator: 0x0a) {
            let fields = line.split(separator: 0x20)
            if fields.count == 5, fields[0].elementsEqual("dir".utf8), let root = bytesFromHex(fields[1]),
               let ino = UInt64(String(decoding: fields[2], as: UTF8.self)),
               let s = Int64(String(decoding: fields[3], as: UTF8.self)),
               let ns = UInt32(String(decoding: fields[4], as: UTF8.self)) {
                last = OpenDirectory(root: root, inode: ino, mtime: Timestamp(seconds: s, nanoseconds: ns))
            } else if fields.first.map({ $0.elementsEqual("done".utf8) }) == true {
                last = nil
            }
        }
        return last
    }
}

#if canImport(Glibc)
import Glibc
#endif
