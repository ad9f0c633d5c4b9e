import HashifySystem
import SystemPackage

/// The record of a run that changes guests: STORE/runs/RUNID. It exists
/// (fsync'ed) before the first change and is removed after the last one, so a
/// killed run leaves it behind. It names the directory being changed and its
/// original mtime, every private copy made under a temporary name, and every
/// exchange before it is made, so recovery can tell what a temporary name
/// holds after a kill at any instant. Plain appends survive SIGKILL (the page
/// cache keeps them).
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

    /// Notes a private copy this run created under the temporary name `temp`.
    func created(_ temp: FileName, inode: UInt64) { append("made \(hexString(temp.bytes)) \(inode)\n") }

    /// Notes, before it happens, that `temp` (holding inode `ours`) is about to
    /// be exchanged with `name` (expected to hold inode `expected`).
    func exchanging(_ temp: FileName, with name: FileName, ours: UInt64, expected: UInt64) {
        append("xchg \(hexString(temp.bytes)) \(hexString(name.bytes)) \(ours) \(expected)\n")
    }

    /// One write(2) per line on an O_APPEND descriptor: lines never interleave.
    private func append(_ line: String) {
        try? file.write(Array(line.utf8))
    }

    /// Set when a temporary name may be left that only recovery can judge:
    /// the run's record then stays, and the next run's recovery sees to it.
    private(set) var leftForRecovery = false
    func leaveForRecovery() { leftForRecovery = true }

    /// Ends the run: its record goes, unless it left work for recovery.
    func finish() {
        if !leftForRecovery { store.endRun(runID) }
    }

    /// A directory an unfinished run was changing when it stopped.
    public struct OpenDirectory: Hashable, Sendable {
        public var root: [UInt8]
        public var inode: UInt64
        public var mtime: Timestamp
    }

    /// An exchange a run was about to make (or made, or undid).
    struct Exchange: Hashable {
        var name: [UInt8]
        var ours: UInt64
        var expected: UInt64
    }

    /// What a killed run's journal says, read in one pass.
    struct Contents {
        /// Temporary names that hold a guest's file.
        var kept = Set<[UInt8]>()
        /// Private copies made, by temporary name: their inode.
        var created: [[UInt8]: UInt64] = [:]
        /// Exchanges announced, by temporary name (the last one counts).
        var exchanges: [[UInt8]: Exchange] = [:]
        /// The directory left half-changed, if any.
        var openDirectory: OpenDirectory?
    }

    /// Reads a run's journal; an unreadable one says nothing (and so proves nothing redundant).
    static func contents(store: Store, runID: String) -> Contents {
        var c = Contents()
        guard let f = try? store.runs.openFileForReading(FileName(runID)), let data = try? f.readAll() else { return c }
        for line in data.split(separator: 0x0a) {
            let fields = line.split(separator: 0x20).map { Array($0) }
            guard let verb = fields.first.map({ String(decoding: $0, as: UTF8.self) }) else { continue }
            func number(_ i: Int) -> UInt64? { UInt64(String(decoding: fields[i], as: UTF8.self)) }
            switch (verb, fields.count) {
            case ("keep", 2):
                if let n = bytesFromHex(fields[1]) { c.kept.insert(n) }
            case ("made", 3):
                if let n = bytesFromHex(fields[1]), let ino = number(2) { c.created[n] = ino }
            case ("xchg", 5):
                if let t = bytesFromHex(fields[1]), let n = bytesFromHex(fields[2]), let ours = number(3),
                    let expected = number(4)
                {
                    c.exchanges[t] = Exchange(name: n, ours: ours, expected: expected)
                }
            case ("dir", 5):
                if let root = bytesFromHex(fields[1]), let ino = number(2),
                    let s = Int64(String(decoding: fields[3], as: UTF8.self)),
                    let ns = UInt32(String(decoding: fields[4], as: UTF8.self))
                {
                    c.openDirectory = OpenDirectory(
                        root: root, inode: ino, mtime: Timestamp(seconds: s, nanoseconds: ns))
                }
            case ("done", 1):
                c.openDirectory = nil
            default:
                continue
            }
        }
        return c
    }
}
