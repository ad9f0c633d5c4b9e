import HashifySystem

/// A report that renders itself as text for a terminal; `--json` encodes
/// the same report. Every command's text is made here, in one place.
public protocol TextReport {
    func humanReadable(verbose: Bool) -> String
}

extension UnifyReport: TextReport {}
extension ManifestReport: TextReport {}

/// The text lines for skipped paths and notes that the maintenance reports end with.
func skippedAndNotes(_ skipped: [UnifyReport.SkippedPath], notes: [String] = []) -> String {
    skipped.map { "skipped   \($0.location): \($0.detail)\n" }.joined() + notes.map { "note      \($0)\n" }.joined()
}

extension KSM.Status: TextReport {
    public func humanReadable(verbose: Bool) -> String {
        let r = self
        let s = r.settings
        func v(_ k: String) -> String { s[k].map(String.init) ?? "-" }
        var out = "hashify ksm status — ksmd \(r.running ? "running" : "not running")\n"
        out +=
            "settings  pages_to_scan \(v("pages_to_scan")), sleep_millisecs \(v("sleep_millisecs")), max_page_sharing \(v("max_page_sharing")), merge_across_nodes \(v("merge_across_nodes"))\n"
        let page: Int64 = 4096
        out +=
            "merged    pages_shared \(v("pages_shared")), pages_sharing \(v("pages_sharing")) (\(formatBytes(UInt64(max(0, (s["pages_sharing"] ?? 0) * page)))) saved), general_profit \(formatBytes(UInt64(max(0, s["general_profit"] ?? 0))))\n\n"
        let w = max(5, r.guests.map { $0.guest.count }.max() ?? 5)
        out += "GUEST".rightPadded(w) + "  PROCS  MERGE-ANY      MERGED      PROFIT\n"
        for g in r.guests {
            out +=
                g.guest.rightPadded(w) + String(g.processes).leftPadded(7) + String(g.mergeAnyProcesses).leftPadded(11)
            out +=
                formatBytes(g.mergedBytes).leftPadded(12) + formatBytes(UInt64(max(0, g.profitBytes))).leftPadded(12)
                + "\n"
        }
        for n in r.notes { out += "note      \(n)\n" }
        return out
    }
}

extension MemoryReport: TextReport {
    public func humanReadable(verbose: Bool) -> String {
        let r = self
        func mib(_ b: UInt64) -> String { formatBytes(b) }
        let w = max(5, r.guests.map { $0.guest.count }.max() ?? 5)
        var out =
            "hashify mem\(r.partial ? " (partial: \(r.unreadableProcesses) processes could not be read)" : "")\n\n"
        out += "GUEST".rightPadded(w) + "  PROCS   FILE-BACKED      SHARED  DUPLICATED   ANONYMOUS  KSM-MERGED\n"
        for g in r.guests + [MemoryReport.Guest(guest: "total", figures: r.totals)] {
            let f = g.figures
            out += g.guest.rightPadded(w) + String(f.processes).leftPadded(7) + mib(f.fileBackedBytes).leftPadded(14)
            out += mib(f.sharedBytes).leftPadded(12) + mib(f.duplicatedBytes).leftPadded(12)
            out += mib(f.anonymousBytes).leftPadded(12) + mib(f.ksmMergedBytes).leftPadded(12) + "\n"
        }
        out += "\nstore     \(mib(r.storeCachedBytes)) of store objects in the page cache\n"
        if !r.duplicatedFiles.isEmpty {
            out += "\nstill duplicated in memory (and what would merge each):\n"
            for d in r.duplicatedFiles.prefix(10) {
                out +=
                    "  \(mib(d.duplicatedBytes).leftPadded(10))  \(d.copies) copies  \(d.path)  (\(d.mergedBy))\n"
            }
            out += "unify would save \(mib(r.unifyWouldSaveBytes)) of it (then restart what maps those copies)"
            if r.overlayModeWouldSaveBytes > 0 {
                out +=
                    "; only overlay mode would merge \(mib(r.overlayModeWouldSaveBytes)) (copies whose owner, mode, mtime or xattrs differ, or in guests whose root is not trusted)"
            }
            out += "\n"
        }
        if !r.processesToRestart.isEmpty {
            out += "\nrestart to share memory (they map copies unify replaced):\n"
            for p in r.processesToRestart {
                out +=
                    "  \(String(p.pid).leftPadded(7)) \(p.command.rightPadded(16)) \(p.guest)\(p.group.map { " [\($0)]" } ?? "")  frees \(mib(p.bytes))\n"
            }
        }
        for n in r.notes { out += "note      \(n)\n" }
        return out
    }
}

extension StatusReport: TextReport {
    public func humanReadable(verbose: Bool) -> String {
        let r = self
        var out = "hashify status — store \(r.store)\n\n"
        let w = max(5, r.guests.map { $0.label.count }.max() ?? 5)
        out += "GUEST".rightPadded(w) + "      FILES       BYTES     SHARED  BYTES SHARED\n"
        for g in r.guests {
            out += g.label.rightPadded(w)
            out += String(g.filesScanned).leftPadded(11) + formatBytes(g.bytesScanned).leftPadded(12)
            out += String(g.pathsShared).leftPadded(11) + formatBytes(g.bytesShared).leftPadded(14) + "\n"
        }
        let h = r.storeHealth
        out += "\nstore     \(h.objects) objects, \(formatBytes(h.bytes)); \(h.indexEntries) index entries\n"
        out +=
            "unused    \(h.unreferencedObjects) objects no guest links (\(formatBytes(h.unreferencedBytes))): hashify gc removes them\n"
        out += "links     \(h.objectsNearLinkLimit) objects near the link limit (\(h.linkLimit))\n"
        if h.unfinishedRuns > 0 {
            out +=
                "warning   \(h.unfinishedRuns) interrupted runs left temporary names: the next unify or gc removes them\n"
        }
        out += "re-run    would link \(r.rerunWouldLinkPaths) paths and save \(formatBytes(r.rerunWouldSaveBytes))\n"
        if let o = r.overlay {
            let ow = max(13, o.guests.map { $0.label.count }.max() ?? 0)
            out +=
                "\n" + "OVERLAY GUEST".rightPadded(ow)
                + "  GEN  LAYERS    MOUNTED  SHARED FILES  SHARED BYTES  COPY-UPS\n"
            for g in o.guests {
                out +=
                    g.label.rightPadded(ow) + String(g.generation).leftPadded(5) + String(g.layers).leftPadded(8)
                    + (g.layout ?? (g.mounted ? "yes" : "no")).leftPadded(11)
                out += String(g.sharedFiles).leftPadded(14) + formatBytes(g.sharedBytes).leftPadded(14)
                out +=
                    formatBytes(g.copyUpBytes).leftPadded(10)
                    + (g.foldPending ? (g.mounted ? "  (fold at next start)" : "  (unify folds)") : "") + "\n"
            }
            out +=
                "data      \(o.dataObjects) objects, \(formatBytes(o.dataBytes)); \(o.unreferencedDataObjects) unreferenced (\(formatBytes(o.unreferencedDataBytes))): hashify gc removes them\n"
            out +=
                "reserve   \(formatBytes(o.freeBytes)) free for copy-ups; a routine update needs about \(formatBytes(o.routineUpdateBytes))\n"
            for w in o.warnings { out += "warning   \(w)\n" }
        }
        for n in r.notLinked {
            if n.pathsShared > 0 {
                out +=
                    "warning   \(n.label): \(n.whoseRoot), yet \(n.undo)\n"
            } else {
                out += "untrusted \(n.line)\n"
            }
        }
        for b in r.sharingBreakers {
            out += "breaker   \(b.guest.map { "\($0):\(b.path)" } ?? b.root + b.path): \(b.detail)\n"
        }
        for n in r.notes { out += "note      \(n)\n" }
        return out
    }
}

extension VerifyReport: TextReport {
    public func humanReadable(verbose: Bool) -> String {
        let r = self
        // Each mode's objects named when the store has them (an overlay-only store: no "0 objects" line).
        let overlay = r.dataObjectsChecked > 0 || !r.damagedDataObjects.isEmpty
        var checked: [String] = []
        if r.objectsChecked > 0 || !overlay {
            checked.append("\(r.objectsChecked) objects" + (overlay ? " (hardlink mode)" : ""))
        }
        if overlay { checked.append("\(r.dataObjectsChecked) data objects (overlay mode)") }
        var out =
            "hashify verify — store \(r.store)\nchecked   \(checked.joined(separator: " and ")), \(formatBytes(r.bytesRead)) read\n"
        for d in r.damagedDataObjects {
            out +=
                "DAMAGED   data\(d.object): "
                + (d.missing
                    ? "missing, but stubs point at it\n"
                    : d.recordedDigest.isEmpty
                        ? "no record of its digest, but stubs point at it\n"
                        : "content changed (now \(d.digest))"
                            + (d.neverReused ? "; its record dropped: no new stub is given it\n" : "\n"))
            if let from = d.restoredFrom { out += "restored  data\(d.object) from \(from)\n" }
            for f in d.filesLost.prefix(verbose ? Int.max : 10) {
                out += "LOST      \(f) (no copy of its content is left)\n"
            }
            if !verbose && d.filesLost.count > 10 {
                out += "LOST      … \(d.filesLost.count - 10) more (-v lists them)\n"
            }
        }
        for image in r.damagedImages { out += "DAMAGED   \(image)\n" }
        if r.damaged.isEmpty && r.damagedDataObjects.isEmpty && r.damagedImages.isEmpty {
            out += "ok        every object matches its name\n"
        }
        for d in r.damaged {
            let what = [d.contentChanged ? "content" : nil, d.metadataChanged ? "metadata" : nil].compactMap { $0 }
                .joined(separator: " and ")
            out +=
                "DAMAGED   \(d.object): \(what) changed; linked by \(d.paths.count) paths\(d.repaired ? " — repaired" : "")\n"
            for p in d.paths { out += "            \(p.location)\n" }
        }
        if r.repair { out += "split     \(r.pathsSplit) paths\n" }
        out += skippedAndNotes(r.skipped)
        return out
    }
}

extension GCReport: TextReport {
    public func humanReadable(verbose: Bool) -> String {
        let r = self
        var out = "hashify gc\(r.dryRun ? " (dry run: nothing changed)" : "") — store \(r.store)\n"
        out +=
            "\(r.dryRun ? "would remove" : "removed")  \(r.objectsRemoved) unreferenced objects, \(formatBytes(r.bytesFreed)) freed\n"
        if r.dataObjectsRemoved > 0 {
            out +=
                "\(r.dryRun ? "would remove" : "removed")  \(r.dataObjectsRemoved) data objects no overlay guest uses, \(formatBytes(r.dataBytesFreed)) freed\n"
        }
        if r.temporariesRemoved > 0 { out += "cleaned   \(r.temporariesRemoved) temporary names of interrupted runs\n" }
        out += skippedAndNotes(r.skipped, notes: r.notes)
        return out
    }
}

extension SplitReport: TextReport {
    public func humanReadable(verbose: Bool) -> String {
        let r = self
        var out = "hashify split\(r.dryRun ? " (dry run: nothing changed)" : "") — store \(r.store)\n"
        out +=
            "\(r.dryRun ? "would split" : "split")     \(r.pathsSplit) paths (\(r.notUnified) matching paths were not unified)\n"
        out += skippedAndNotes(r.skipped)
        return out
    }
}

extension CloneReport: TextReport {
    public func humanReadable(verbose: Bool) -> String {
        let r = self
        var out =
            "\(r.destination): cloned from \(r.sourceGuest ?? r.source) (\(r.mode) mode): \(r.filesShared) files shared, "
        out += "\(r.filesCopied) copied (\(formatBytes(r.bytesCopied))), \((r.seconds * 100).rounded() / 100) s\n"
        if let c = r.lxcConfig { out += "lxc config: \(c)\n" }
        return out
    }
}

extension OverlayReport: TextReport {
    public func humanReadable(verbose: Bool) -> String {
        let r = self
        var out = ""
        for g in r.guests {
            out += "\(g.label): \(g.action)"
            var parts: [String] = []
            if g.stubs > 0 { parts.append("\(g.stubs) files") }
            if g.objectsCreated > 0 { parts.append("\(g.objectsCreated) new objects") }
            if g.filesSharingObjects > 0 { parts.append("\(g.filesSharingObjects) files share existing objects") }
            if g.bytesLinked > 0 { parts.append("\(formatBytes(g.bytesLinked)) linked") }
            if g.bytesCopied > 0 { parts.append("\(formatBytes(g.bytesCopied)) copied") }
            if g.seconds > 0 { parts.append("\((g.seconds * 100).rounded() / 100) s") }
            if !parts.isEmpty { out += " (" + parts.joined(separator: ", ") + ")" }
            out += "\n"
            for n in g.notes { out += "  note: \(n)\n" }
        }
        return out
    }
}
