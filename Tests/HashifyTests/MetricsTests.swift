import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Samples of a Prometheus text file as the Python prometheus_client parser reads them: "name{labels}" → value.
func prometheusSamples(_ file: String) -> [String: Double]? {
    let script = """
        import json, sys
        from prometheus_client.parser import text_string_to_metric_families
        out = {}
        for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
            for s in fam.samples:
                labels = ','.join('%s=%s' % kv for kv in sorted(s.labels.items()))
                out[s.name + ('{' + labels + '}' if labels else '')] = s.value
        print(json.dumps(out))
        """
    let r = run(["/usr/bin/python3", "-c", script, file])
    guard r.status == 0 else { return nil }
    return (try? JSONSerialization.jsonObject(with: Data(r.out.utf8))) as? [String: Double]
}

let hasPrometheusParser = run(["/usr/bin/python3", "-c", "import prometheus_client.parser"]).status == 0

@Suite("unify --metrics", .enabled(if: hasPrometheusParser, "needs python3-prometheus-client (the independent parser)"))
struct MetricsTests {
    @Test("the metrics file parses as Prometheus text and its figures equal the run's --json")
    func metricsEqualJSON() throws {
        let s = Scratch("metrics")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        makeGuest(a, index: 0)
        makeGuest(b, index: 1)
        settle()
        let file = s.sub("hashify.prom")
        let r = hashify(["unify", "--json", "--metrics", file, a, b])
        #expect(r.status == 0, "\(r.err)")
        let report = jsonReport(r.out)
        let t = report["totals"] as? [String: Any] ?? [:]
        guard let m = prometheusSamples(file) else {
            Issue.record(
                "the metrics file does not parse: \((try? String(contentsOfFile: file, encoding: .utf8)) ?? "")")
            return
        }
        #expect(m["hashify_guests"] == 2)
        #expect(m["hashify_run_linked_paths"] == Double(t["pathsLinked"] as? Int ?? -1))
        #expect(m["hashify_run_saved_bytes"] == Double(t["bytesSaved"] as? Int ?? -1))
        #expect(m["hashify_run_errors"] == 0)
        for g in report["guests"] as? [[String: Any]] ?? [] {
            let root = g["root"] as? String ?? ""
            #expect(m["hashify_files{guest=\(root)}"] == Double(g["filesScanned"] as? Int ?? -1))
        }
        #expect(abs((m["hashify_run_duration_seconds"] ?? -1) - (report["seconds"] as? Double ?? 0)) < 0.001)
        let success = m["hashify_last_success_timestamp_seconds"] ?? 0
        #expect(abs(success - Date().timeIntervalSince1970) < 60)
        #expect(
            !FileManager.default.fileExists(atPath: s.sub(".hashify.prom.new")),
            "written atomically, no temporary left")
        // A second run keeps the file whole and up to date.
        #expect(hashify(["unify", "-q", "--metrics", file, a, b]).status == 0)
        #expect(prometheusSamples(file)?["hashify_run_linked_paths"] == 0)
    }

    @Test("--metrics into a missing directory: bad input before anything is changed")
    func badMetricsPath() {
        let s = Scratch("metricsbad")
        let a = s.sub("guests/a")
        let b = s.sub("guests/b")
        makeGuest(a, index: 0)
        makeGuest(b, index: 1)
        let before = manifest([a, b], inodes: true)
        let r = hashify(["unify", "--metrics", s.sub("missing/dir/h.prom"), a, b])
        #expect(r.status == 2 && r.err.contains("--metrics"), "\(r.err)")
        #expect(manifest([a, b], inodes: true) == before)
        #expect(!FileManager.default.fileExists(atPath: s.sub("guests/.hashify")))
    }
}
