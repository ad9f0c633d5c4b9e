import HashifySystem

/// The result of `unify`, for people (`HumanReport`) and scripts (`--json`).
/// The JSON schema is documented in docs/json.md; `schema` changes only with
/// an incompatible change.
public struct UnifyReport: Sendable, Codable {
    public struct Totals: Sendable, Codable {
        public var guests = 0
        public var directories = 0
        public var filesScanned = 0
        public var bytesScanned: UInt64 = 0
        public var excluded = 0
        public var conffiles = 0
        public var belowMinimumSize = 0
        /// Inodes that share size and known metadata with another (only these are read).
        public var candidates = 0
        public var bytesHashed: UInt64 = 0
        /// The size of the candidates that had to be read (not known from the index).
        public var bytesToHash: UInt64 = 0
        /// Candidates whose digest the store's index knew (not read).
        public var indexHits = 0
        /// Sets of inodes with equal content and identity.
        public var identityGroups = 0
        /// Paths replaced by a link to a store object (or that would be, in a dry run).
        public var pathsLinked = 0
        /// Inodes whose last name was replaced, so their space is free.
        public var inodesFreed = 0
        /// Allocated bytes freed (st_blocks, each inode once: what du shows).
        public var bytesSaved: UInt64 = 0
        /// What merging every group would free under the identity rules.
        public var bytesSavedMaximum: UInt64 = 0
        public var objectsCreated = 0
        public var pathsWithOtherModificationTime = 0
        public var temporariesRemoved = 0
        /// Hardlink objects no guest linked any more, removed after linking (with the bytes they held).
        public var objectsRemoved = 0
        public var bytesFreedByRemoval: UInt64 = 0
        public var skipped = 0
        public var errors = 0
    }

    public struct Guest: Sendable, Codable {
        public var root: String
        public var filesScanned = 0
        public var bytesScanned: UInt64 = 0
        public var pathsLinked = 0
        public var inodesFreed = 0
        public var bytesSaved: UInt64 = 0
        public var skipped = 0
        /// Paths that link a store object (before this run's changes in a dry run).
        public var pathsShared = 0
        /// Their apparent size, counted per path.
        public var bytesShared: UInt64 = 0
        /// The guest's name (LXC container, nspawn machine, config entry), when it has one.
        public var guest: String?
    }

    public struct SkippedPath: Sendable, Codable {
        public var root: String
        public var path: String
        public var reason: String
        public var detail: String
        public var error: Bool
        /// The guest's name, when it has one.
        public var guest: String?
        /// For a failure: what was being done, and the errno when the kernel refused it.
        public var operation: String?
        public var errno: Int32?
    }

    /// A plain guest hardlink mode leaves unlinked: its root is not the
    /// host's root and the config does not trust it (a shared file would be
    /// writable in place by it for every guest).
    public struct NotLinked: Sendable, Codable {
        public var root: String
        /// Why its root is not the host's root: `lxc.idmap`, an unprivileged Incus container, ….
        public var reason: String
        /// Its paths that link store objects already (linked by an earlier
        /// version, or before its root changed): its root can write them in place for every guest.
        public var pathsShared: Int
        /// Whether `overlay convert` can take it (not a rootfs its manager mounts idmapped).
        public var overlayCanTakeIt: Bool
        /// The guest's name, when it has one.
        public var guest: String?
    }

    public var schema = 1
    public var command = "unify"
    public var mode = "hardlink"
    public var dryRun: Bool
    public var store: String
    public var seconds: Double = 0
    /// Peak resident memory of the process (what `time -v` reports as maximum RSS).
    public var peakMemoryBytes: UInt64 = 0
    /// Wall seconds per phase: walk, hash, link (and recovery when it ran).
    public var phaseSeconds: [String: Double] = [:]
    public var totals = Totals()
    public var guests: [Guest] = []
    public var skipped: [SkippedPath] = []
    public var processesToRestart: [StaleProcess] = []
    /// Warnings about the run itself (a damaged index that was rebuilt, ...).
    public var notes: [String] = []
    /// Overlay guests among the roots: what their fold did (they are not walked as plain guests).
    public var overlayGuests: [OverlayReport.Guest] = []
    /// Plain guests left unlinked because their root is not trusted (walked and counted, never linked).
    public var notLinked: [NotLinked] = []

    public init(dryRun: Bool, store: String) {
        self.dryRun = dryRun
        self.store = store
    }

    /// 0 done, 1 done with files skipped because of errors (or an overlay guest whose fold failed,
    /// kept files whole, or has files whose data object is missing), or a guest claimed by two stores.
    public var exitStatus: Int32 {
        totals.errors > 0 || !guestsOfTwoStores.isEmpty
            || overlayGuests.contains { $0.action == .leftAsItWas || $0.filesWithoutData > 0 }
            ? 1 : 0
    }
    /// Guests another store claimed while this run unified them (two runs with different stores at
    /// once): each line names both stores.
    public var guestsOfTwoStores: [String] = []
}

extension UnifyReport.NotLinked {
    /// The guest's name, or its root.
    public var label: String { guest ?? root }

    /// The one line that says why the guest is not linked and what to do;
    /// with the command that undoes its earlier sharing when it shares files already.
    public var line: String {
        var l = "\(label): not linked: \(whoseRoot); a shared file would be writable by it — "
        l +=
            overlayCanTakeIt
            ? "use overlay mode (hashify overlay convert) or set trust-root in the config"
            : "set trust-root in the config if you trust it (overlay mode cannot take a rootfs mounted idmapped)"
        if pathsShared > 0 { l += "; " + undo }
        return l
    }

    /// "its root is not the host's root (REASON)".
    public var whoseRoot: String {
        reason == RootTrustPolicy.distrustedByConfig
            ? "its root is not trusted (\(reason))" : "its root is not the host's root (\(reason))"
    }

    /// What its root can reach now, and the command that takes it back.
    public var undo: String {
        "\(pathsShared) of its files already share store objects, writable by it for every guest that shares them: "
            + "hashify split --root \(root) gives them their own copies"
            + (overlayCanTakeIt ? " (or hashify overlay convert \(root))" : "")
    }
}

/// Formats byte counts the way df -h and du -h do (binary units).
public func formatBytes(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var v = Double(n)
    var u = 0
    while v >= 1024 && u < units.count - 1 {
        v /= 1024
        u += 1
    }
    if u == 0 { return "\(n) B" }
    let scaled = (v * 10).rounded() / 10
    return "\(scaled) \(units[u])"
}

extension UnifyReport {
    /// The report as a table for a terminal.
    public func humanReadable(verbose: Bool) -> String {
        var out = ""
        let t = totals
        let verb = dryRun ? "would link" : "linked"
        out += "hashify unify\(dryRun ? " (dry run: nothing changed)" : "") — store \(store)\n"
        if guests.isEmpty && !overlayGuests.isEmpty {
            // Overlay guests alone; what was left as it is (a refused conversion) still said.
            for n in notes { out += "note      \(n)\n" }
            if !notes.isEmpty { out += "\n" }
            return out + overlaySection(width: 5) + "done in \((seconds * 100).rounded() / 100) s\n"
        }
        out +=
            "scanned   \(t.filesScanned) files (\(formatBytes(t.bytesScanned)) in size) in \(t.guests) guests, \(t.directories) directories"
        out += "; excluded \(t.excluded), conffiles \(t.conffiles), below min size \(t.belowMinimumSize)\n"
        out +=
            "hashed    \(t.candidates) candidate files (\(t.indexHits) known from the index), \(formatBytes(t.bytesHashed)) read (a file compared with another counts both); "
        out += "\(t.identityGroups) groups of identical files\n"
        out += "\(verb.rightPadded(11))\(t.pathsLinked) paths; \(t.inodesFreed) copies freed, "
        out +=
            "\(formatBytes(t.bytesSaved)) saved (maximum under the identity rules: \(formatBytes(t.bytesSavedMaximum)))\n"
        if t.pathsWithOtherModificationTime > 0 {
            out +=
                "mtime     \(t.pathsWithOtherModificationTime) paths \(dryRun ? "would get" : "got") another mtime (--ignore-mtime)\n"
        }
        for n in notes { out += "note      \(n)\n" }
        for n in notLinked { out += "untrusted \(n.line)\n" }
        if t.objectsRemoved > 0 {
            out +=
                "removed   \(t.objectsRemoved) objects no guest links any more (\(formatBytes(t.bytesFreedByRemoval)))\n"
        }
        if t.temporariesRemoved > 0 {
            out += "cleaned   \(t.temporariesRemoved) temporary names of an interrupted run\n"
        }
        out += "\n"
        let w = max(5, guests.map { $0.label.count }.max() ?? 5)
        out += "GUEST".rightPadded(w) + "      FILES     LINKED      FREED      SAVED  SKIPPED\n"
        for g in guests {
            out += g.label.rightPadded(w)
            out += pad(g.filesScanned, 11) + pad(g.pathsLinked, 11) + pad(g.inodesFreed, 11)
            out += formatBytes(g.bytesSaved).leftPadded(11) + pad(g.skipped, 9) + "\n"
        }
        out += overlaySection(width: w)
        if !skipped.isEmpty {
            out += "\nskipped \(skipped.count) paths (\(t.errors) because of errors):\n"
            let shown = verbose ? skipped : Array(skipped.prefix(20))
            for s in shown { out += "  \(s.location): \(s.detail)\n" }
            if shown.count < skipped.count {
                out += "  … \(skipped.count - shown.count) more (--verbose or --json lists all)\n"
            }
        }
        if !processesToRestart.isEmpty {
            out += "\nrestart these processes to share memory (they still map replaced copies):\n"
            for p in processesToRestart { out += "  \(p.pid) \(p.command) (\(p.staleFiles) files)\n" }
        }
        out += "done in \((seconds * 100).rounded() / 100) s"
        out += verbose ? ", peak memory \(formatBytes(peakMemoryBytes))\n" : "\n"
        return out
    }

    /// What the fold did to each overlay guest.
    private func overlaySection(width: Int) -> String {
        if overlayGuests.isEmpty { return "" }
        let w = max(width, overlayGuests.map { $0.label.count }.max() ?? 0)
        var out = "\n" + "OVERLAY GUEST".rightPadded(w) + "  ACTION\n"
        for g in overlayGuests {
            out += g.label.rightPadded(w) + "  " + g.action.description
            if g.action == .folded {
                out += ": \(g.filesHashed) files read, \(g.filesUnchanged) unchanged, \(g.objectsCreated) new objects"
            }
            out += "\n"
            for n in g.notes { out += "  note: \(n)\n" }
        }
        return out
    }

    private func pad(_ n: Int, _ w: Int) -> String { String(n).leftPadded(w) }
}

extension String {
    /// Right-aligned in a column of width w (one space before when wider).
    public func leftPadded(_ w: Int) -> String {
        count >= w ? " " + self : String(repeating: " ", count: w - count) + self
    }
    /// Left-aligned in a column of width w (never truncated).
    public func rightPadded(_ w: Int) -> String { count >= w ? self : self + String(repeating: " ", count: w - count) }
}

/// A message of at most about 2,000 characters: a longer one (a path
/// thousands of directories deep) keeps its beginning and its end, which
/// name the guest and the failure, and says how much was left out.
public func elided(_ message: String, keeping edge: Int = 1_000) -> String {
    guard message.count > 2 * edge + 100 else { return message }
    let left = message.count - 2 * edge
    return "\(message.prefix(edge))…(\(left) characters left out)…\(message.suffix(edge))"
}
