import HashifySystem
import SystemPackage

/// `hashify mem`: what the guests' processes hold in memory, how much of the
/// file-backed part is one copy shared between guests, how much is the same
/// content resident under several inodes (what unify would still save), and
/// which processes must restart to let go of replaced copies.
public struct MemoryReport: Sendable, Codable {
    /// Figures for one guest, the host, or all of them.
    public struct Figures: Sendable, Codable {
        /// Proportional resident size of file-backed mappings.
        public var fileBackedBytes: UInt64 = 0
        /// The part of it in inodes that processes of another guest (or the host) map too: one copy.
        public var sharedBytes: UInt64 = 0
        /// The part of it in inodes whose content is resident under another inode as well.
        public var duplicatedBytes: UInt64 = 0
        public var anonymousBytes: UInt64 = 0
        public var ksmMergedBytes: UInt64 = 0
        public var processes = 0
    }
    /// One guest (or "host").
    public struct Guest: Sendable, Codable {
        public var guest: String
        public var figures: Figures
        public init(guest: String, figures: Figures) {
            self.guest = guest
            self.figures = figures
        }
    }
    /// A process that maps a copy unify replaced.
    public struct Restart: Sendable, Codable {
        public var pid: Int
        public var guest: String
        /// LXC container (`lxc:NAME`), nspawn machine or systemd unit, when the cgroup says.
        public var group: String?
        public var command: String
        /// What its restart would free (its share of pages of replaced inodes all of whose mappers restart).
        public var bytes: UInt64
    }
    public var schema = 1
    public var command = "mem"
    public var totals = Figures()
    public var guests: [Guest] = []
    public var processesToRestart: [Restart] = []
    /// Page-cache bytes of the store's objects (`cachestat(2)`, `mincore` before Linux 6.5).
    public var storeCachedBytes: UInt64 = 0
    /// Contents resident under several inodes, largest first (at most 20).
    public var duplicatedFiles: [DuplicatedFile] = []
    /// Of all duplicated bytes, those unify would merge (plain guests' copies
    /// of one identity; overlay guests' copy-ups, by its fold), once the
    /// processes that map them restart.
    public var unifyWouldSaveBytes: UInt64 = 0
    /// Those only overlay mode would merge (copies whose owner, mode, mtime or
    /// xattrs differ, as between guests of two unprivileged id ranges).
    public var overlayModeWouldSaveBytes: UInt64 = 0
    /// Processes whose memory could not be read (permission, hidepid): the figures leave them out.
    public var unreadableProcesses = 0
    /// True when some processes could not be read.
    public var partial = false
    public var seconds = 0.0
    public var notes: [String] = []

    /// One content resident under several inodes.
    public struct DuplicatedFile: Sendable, Codable {
        public var path: String
        public var copies: Int
        /// Resident bytes beyond one copy.
        public var duplicatedBytes: UInt64
        /// Page cache the extra copies hold (`cachestat`): mapped or not.
        public var cachedBytes: UInt64
        /// What would merge the extra copies: `unify`, `overlay mode`,
        /// `unify, then overlay mode`, `a restart` (copies unify replaced
        /// already, which processes still map), or `nothing` (64 bytes or
        /// less: whole in each overlay guest).
        public var mergedBy = "unify"
        public var unifyWouldSaveBytes: UInt64 = 0
        public var overlayModeWouldSaveBytes: UInt64 = 0
        /// Resident bytes of copies unify replaced already (deleted inodes processes still map): a restart frees them.
        public var restartWouldFreeBytes: UInt64 = 0
    }
}
