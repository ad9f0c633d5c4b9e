import HashifySystem
import SystemPackage

/// Prometheus' text exposition format, one metric family at a time.
struct PrometheusText {
    private(set) var text = ""

    mutating func metric(_ name: String, _ type: String, _ help: String, _ samples: [(String, Double)]) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        for (labels, v) in samples { text += name + labels + " " + Self.format(v) + "\n" }
    }

    /// `{key="value"}` with the value escaped as the format wants.
    static func label(_ k: String, _ v: String) -> String {
        var e = ""
        for c in v {
            switch c {
            case "\\": e += "\\\\"
            case "\"": e += "\\\""
            case "\n": e += "\\n"
            default: e.append(c)
            }
        }
        return "{\(k)=\"\(e)\"}"
    }

    static func format(_ v: Double) -> String {
        if v == v.rounded(), abs(v) < 1e15 { return String(Int64(v)) }
        return String(v)
    }
}

/// `unify --metrics FILE` and `mem --metrics FILE`: a run in Prometheus'
/// text format, for node_exporter's textfile collector, replaced atomically
/// (`Directory.writeAtomically`) so the collector never reads half a file.
public enum MetricsFile {
    /// The text of the metrics for a finished run. `lastSuccess` is the time of
    /// the last run without errors (this one, or one an earlier file recorded).
    public static func text(_ r: UnifyReport, finishedAt now: Timestamp, lastSuccess: Double?) -> String {
        var p = PrometheusText()
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(String, Double)]) {
            p.metric(name, type, help, samples)
        }
        let label = PrometheusText.label
        let t = r.totals
        metric("hashify_guests", "gauge", "Guest roots the last run was given.", [("", Double(t.guests))])
        metric(
            "hashify_files", "gauge", "Regular files scanned, per guest.",
            r.guests.map { (label("guest", $0.label), Double($0.filesScanned)) })
        metric(
            "hashify_shared_paths", "gauge", "Paths that link a store object after the run, per guest.",
            r.guests.map { (label("guest", $0.label), Double($0.pathsShared)) })
        metric(
            "hashify_shared_bytes", "gauge", "Apparent size of the paths that link a store object, per guest.",
            r.guests.map { (label("guest", $0.label), Double($0.bytesShared)) })
        metric(
            "hashify_run_linked_paths", "gauge", "Paths the last run replaced by a link to a store object.",
            [("", Double(t.pathsLinked))])
        metric("hashify_run_saved_bytes", "gauge", "Allocated bytes the last run freed.", [("", Double(t.bytesSaved))])
        metric(
            "hashify_duplicated_bytes", "gauge",
            "Allocated bytes still to gain: identical files the last run could not merge.",
            [("", Double(t.bytesSavedMaximum - min(t.bytesSavedMaximum, t.bytesSaved)))])
        metric(
            "hashify_store_objects_created", "gauge", "Store objects the last run made.",
            [("", Double(t.objectsCreated))])
        metric("hashify_bytes_read", "gauge", "Bytes the last run read to hash.", [("", Double(t.bytesHashed))])
        var reasons: [String: Int] = [:]
        for s in r.skipped { reasons[s.reason, default: 0] += 1 }
        metric(
            "hashify_skipped_paths", "gauge", "Paths the last run left alone, by reason.",
            reasons.sorted { $0.key < $1.key }.map { (label("reason", $0.key), Double($0.value)) })
        metric("hashify_run_errors", "gauge", "Paths the last run skipped because of errors.", [("", Double(t.errors))])
        metric("hashify_run_duration_seconds", "gauge", "Wall time of the last run.", [("", r.seconds)])
        let finished = Double(now.totalNanoseconds) / 1e9
        metric(
            "hashify_last_run_timestamp_seconds", "gauge", "When the last run finished (Unix time).", [("", finished)])
        if let success = t.errors == 0 ? finished : lastSuccess {
            metric(
                "hashify_last_success_timestamp_seconds", "gauge",
                "When the last run without errors finished (Unix time).", [("", success)])
        }
        return p.text
    }

    /// The text of `mem`'s metrics: per guest (and the host) and in total,
    /// the memory figures of its report, the bytes a restart would free, and
    /// what unify and overlay mode would still save.
    public static func text(_ r: MemoryReport, finishedAt now: Timestamp) -> String {
        var p = PrometheusText()
        let rows = r.guests.map { (PrometheusText.label("guest", $0.guest), $0.figures) }
        let figures: [(String, String, KeyPath<MemoryReport.Figures, UInt64>)] = [
            ("file_backed", "Proportional resident size of file-backed mappings", \.fileBackedBytes),
            ("shared", "Of it, in inodes that processes of another guest (or the host) map too", \.sharedBytes),
            ("duplicated", "Of it, in inodes whose content is resident under another inode as well", \.duplicatedBytes),
            ("anonymous", "Proportional resident size of anonymous memory", \.anonymousBytes),
            ("ksm_merged", "Anonymous memory KSM merged", \.ksmMergedBytes),
        ]
        for (name, help, field) in figures {
            p.metric(
                "hashify_mem_\(name)_bytes", "gauge", "\(help), per guest (bytes).",
                rows.map { ($0.0, Double($0.1[keyPath: field])) })
            p.metric(
                "hashify_mem_\(name)_total_bytes", "gauge", "\(help), all guests and the host (bytes).",
                [("", Double(r.totals[keyPath: field]))])
        }
        p.metric(
            "hashify_mem_processes", "gauge", "Processes read, per guest.", rows.map { ($0.0, Double($0.1.processes)) })
        p.metric("hashify_mem_processes_total", "gauge", "Processes read.", [("", Double(r.totals.processes))])
        p.metric(
            "hashify_mem_restart_frees_bytes", "gauge",
            "What restarting the processes that map copies unify replaced would free (bytes).",
            [("", Double(r.processesToRestart.reduce(0) { $0 + $1.bytes }))])
        p.metric(
            "hashify_mem_unify_would_save_bytes", "gauge",
            "Duplicated memory unify would merge, once what maps it restarts (bytes).",
            [("", Double(r.unifyWouldSaveBytes))])
        p.metric(
            "hashify_mem_overlay_mode_would_save_bytes", "gauge",
            "Duplicated memory only overlay mode would merge (copies of differing owner, mode, mtime or xattrs; bytes).",
            [("", Double(r.overlayModeWouldSaveBytes))])
        p.metric(
            "hashify_mem_store_cached_bytes", "gauge", "Page cache the store's objects hold (bytes).",
            [("", Double(r.storeCachedBytes))])
        p.metric(
            "hashify_mem_unreadable_processes", "gauge", "Processes that could not be read (left out of the figures).",
            [("", Double(r.unreadableProcesses))])
        p.metric("hashify_mem_duration_seconds", "gauge", "Wall time of the run.", [("", r.seconds)])
        p.metric(
            "hashify_mem_timestamp_seconds", "gauge", "When the run finished (Unix time).",
            [("", Double(now.totalNanoseconds) / 1e9)])
        return p.text
    }

    /// The last-success time an earlier metrics file at `path` recorded.
    static func previousSuccess(in dir: Directory, _ name: FileName) -> Double? {
        guard let text = try? dir.openFileForReading(name).readAll() else { return nil }
        for line in String(decoding: text, as: UTF8.self).split(separator: "\n")
        where line.hasPrefix("hashify_last_success_timestamp_seconds ") {
            return Double(line.split(separator: " ")[1])
        }
        return nil
    }

    /// Writes the metrics for a run to `path`, atomically.
    public static func write(_ r: UnifyReport, to path: FilePath) throws {
        try write(to: path) { dir, name in
            text(r, finishedAt: .wallClockNow(), lastSuccess: previousSuccess(in: dir, name))
        }
    }

    /// Writes `mem`'s metrics to `path`, atomically.
    public static func write(_ r: MemoryReport, to path: FilePath) throws {
        try write(to: path) { _, _ in text(r, finishedAt: .wallClockNow()) }
    }

    static func write(to path: FilePath, _ body: (Directory, FileName) -> String) throws {
        guard let last = path.lastComponent else { throw InputError("\(path): not a file name") }
        let parentPath = path.removingLastComponent().isEmpty ? FilePath(".") : path.removingLastComponent()
        let dir: Directory
        do { dir = try Directory.open(path: parentPath) } catch {
            throw InputError("--metrics \(path): no directory \(parentPath)")
        }
        let name = FileName(last.string)
        try dir.writeAtomically(Array(body(dir, name).utf8), as: name, mode: 0o644)
    }
}
