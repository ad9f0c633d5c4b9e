import HashifySystem
import SystemPackage

/// `unify --metrics FILE`: the run in Prometheus' text format, for
/// node_exporter's textfile collector, replaced atomically (written beside
/// FILE, then renamed over it) so the collector never reads half a file.
public enum MetricsFile {
    /// The text of the metrics for a finished run. `lastSuccess` is the time of
    /// the last run without errors (this one, or one an earlier file recorded).
    public static func text(_ r: UnifyReport, finishedAt now: Timestamp, lastSuccess: Double?) -> String {
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(String, Double)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (labels, v) in samples { out += name + labels + " " + format(v) + "\n" }
        }
        func label(_ k: String, _ v: String) -> String {
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
        return out
    }

    static func format(_ v: Double) -> String {
        if v == v.rounded(), abs(v) < 1e15 { return String(Int64(v)) }
        return String(v)
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
        guard let last = path.lastComponent else { throw InputError("\(path): not a file name") }
        let parentPath = path.removingLastComponent().isEmpty ? FilePath(".") : path.removingLastComponent()
        let dir: Directory
        do { dir = try Directory.open(path: parentPath) } catch {
            throw InputError("--metrics \(path): no directory \(parentPath)")
        }
        let name = FileName(last.string)
        let body = text(r, finishedAt: .wallClockNow(), lastSuccess: previousSuccess(in: dir, name))
        try dir.writeAtomically(Array(body.utf8), as: name, mode: 0o644)
    }
}
