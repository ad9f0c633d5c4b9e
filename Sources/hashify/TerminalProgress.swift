import HashifyEngine
import HashifySystem
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A one-line progress display on stderr (phase, files, bytes, rate, ETA),
/// redrawn at most ten times a second; only when stderr is a terminal.
final class TerminalProgress: ProgressSink {
    struct State {
        var last: Int64 = 0
        var phase: Phase?
        var phaseStart: Int64 = 0
        var drawn = false
    }
    let state = Mutex(State())

    static func ifTerminal() -> TerminalProgress? { isatty(2) != 0 ? TerminalProgress() : nil }

    func update(phase: Phase, done: Int, total: Int?, bytes: UInt64, totalBytes: UInt64?) {
        let now = MonotonicInstant.now().nanoseconds
        let line: String? = state.withLock { s in
            if s.phase != phase {
                s.phase = phase
                s.phaseStart = now
                s.last = 0
            }
            guard now - s.last > 100_000_000 || done == total else { return nil }
            s.last = now
            s.drawn = true
            let elapsed = Double(now - s.phaseStart) / 1e9
            var text = "\(phase.rawValue): \(done)"
            if let total { text += "/\(total)" }
            text += " files"
            if bytes > 0 {
                text += ", " + formatBytes(bytes)
                if let totalBytes { text += "/" + formatBytes(totalBytes) }
                if elapsed > 0.2 {
                    let rate = Double(bytes) / elapsed
                    text += ", " + formatBytes(UInt64(rate)) + "/s"
                    if let totalBytes, rate > 0, totalBytes > bytes {
                        text += ", ETA \(Int((Double(totalBytes - bytes) / rate).rounded(.up))) s"
                    }
                }
            }
            return text
        }
        if let line { write("\r\u{1b}[K" + line) }
    }

    func finish() {
        let drawn = state.withLock { $0.drawn }
        if drawn { write("\r\u{1b}[K") }
    }

    private func write(_ s: String) { writeStandardError(s) }
}
