import Crypto
import HashifySystem
import SystemPackage

/// What a metadata layer's stubs reference: for each data object, how many
/// stubs redirect to it, kept beside the layer (`gK/meta.refs`,
/// `gK/upper.refs`) so that a fold can tell which objects no guest needs any
/// more without reading every guest's layers.
///
/// A list may say more than its layer holds (a stub removed after the list
/// was written counts until the list is rewritten), never less: it is
/// written from a scan of the finished layer before anything may act on it,
/// and ends with the SHA-256 of its lines, so that a list truncated, emptied
/// or edited is taken for none (its layer is scanned again).
/// A layer without a list is unknown, and an object is removed only when
/// every layer of every guest is known (`unreferenced`); `gc` reads the
/// layers themselves and needs none of this.
enum LayerReferences {
    typealias Counts = [[UInt8]: Int]

    static func fileName(_ sub: String) -> FileName { FileName(sub + ".refs") }

    /// The list of a layer, or nil when it has none or it is not whole (then
    /// its layer is scanned again: a list is never taken on a damaged word).
    static func read(_ layer: OverlayGuest.Layer) -> Counts? {
        guard let bytes = try? layer.holder.openFileForReading(fileName(layer.name)).readAll(),
            let body = verifiedBody(bytes)
        else { return nil }
        var out: Counts = [:]
        for line in body.split(separator: 0x0a) {
            guard let space = line.lastIndex(of: 0x20),
                let n = Int(String(decoding: line[(space + 1)...], as: UTF8.self))
            else { return nil }
            let r = Array(line[..<space])
            guard DataObjects.isValidRedirect(r), n > 0 else { return nil }
            out[r, default: 0] += n
        }
        return out
    }

    static func write(_ counts: Counts, _ layer: OverlayGuest.Layer) throws {
        var bytes: [UInt8] = []
        for (r, n) in counts.sorted(by: { $0.key.lexicographicallyPrecedes($1.key) }) where n > 0 {
            bytes += r + [0x20] + Array(String(n).utf8) + [0x0a]
        }
        try layer.holder.writeAtomically(bytes + trailer(bytes), as: fileName(layer.name))
    }

    /// The last line of a list: "#sha256 " and the SHA-256 of the lines before it.
    static func trailer(_ body: [UInt8]) -> [UInt8] {
        Array("#sha256 \(hexString(Array(SHA256.hash(data: body))))\n".utf8)
    }

    /// The lines of a list before its trailer, when the trailer matches them
    /// (a list truncated, emptied or edited is not whole: nil).
    static func verifiedBody(_ bytes: [UInt8]) -> [UInt8]? {
        guard bytes.last == 0x0a else { return nil }
        let start = bytes.dropLast().lastIndex(of: 0x0a).map { $0 + 1 } ?? 0
        let body = Array(bytes[..<start])
        guard Array(bytes[start...]) == trailer(body) else { return nil }
        return body
    }

    /// Whether a list as `write` writes it (lines "REDIRECT COUNT", sorted by
    /// redirect) names `redirect`: a binary search over the bytes.
    static func sortedLinesContain(_ bytes: [UInt8], _ redirect: [UInt8]) -> Bool {
        bytes.withUnsafeBufferPointer { buf in
            // The key of the line that starts at `start`, and where the next line starts.
            func line(at start: Int) -> (ArraySlice<UInt8>, Int) {
                var end = start
                while end < buf.count && buf[end] != 0x0a { end += 1 }
                var space = end
                while space > start && buf[space - 1] != 0x20 { space -= 1 }
                return (ArraySlice(buf[start..<max(start, space - 1)]), end + 1)
            }
            // The start of the line holding byte `i`.
            func lineStart(_ i: Int) -> Int {
                var j = i
                while j > 0 && buf[j - 1] != 0x0a { j -= 1 }
                return j
            }
            var (low, high) = (0, buf.count)
            while low < high {
                let start = lineStart((low + high) / 2)
                let (key, next) = line(at: start)
                if key.elementsEqual(redirect) { return true }
                if key.lexicographicallyPrecedes(redirect) { low = next } else { high = start }
            }
            return false
        }
    }

    /// Scans a finished layer and writes its list.
    @discardableResult
    static func record(_ layer: OverlayGuest.Layer) throws -> Counts {
        var scan = Overlay.LayerScan()
        scan.scan(layer)
        if let failure = scan.failure { throw InputError("a metadata layer could not be read whole: \(failure)") }
        try write(scan.counts, layer)
        return scan.counts
    }

    /// The list of a layer of a generation in force, made from the layer
    /// when it has none (a layer made before lists were kept).
    static func ensure(_ layer: OverlayGuest.Layer) throws -> Counts {
        try read(layer) ?? record(layer)
    }

    /// Of `candidates`, the objects no layer of any guest references, or
    /// none when that cannot be known: a guest whose state is not `active`,
    /// that has a stacked fold to finish, or that holds a layer outside its
    /// generation in force (left by a killed run) keeps every object.
    /// Layers of generations in force without a list get one.
    static func unreferenced(_ candidates: Set<[UInt8]>, store: Store) -> Set<[UInt8]> {
        guard !candidates.isEmpty else { return [] }
        var left = candidates
        let (guests, unreadable) = OverlayGuest.records(in: store)
        guard unreadable.isEmpty else { return [] }
        for g in guests {
            // A record with neither state nor generations is no guest (an export's leftover).
            if (try? g.readState()) == .some(nil) && g.generationNumbers().isEmpty { continue }
            guard let state = try? g.readState(), state.phase == .active,
                let refs = try? g.layerReferences(state.generation),
                (try? g.directory.openDirectory(OverlayGuest.generationName(state.generation)).stat(
                    Overlay.foldJournalName)) == nil
            else { return [] }
            // Every layer directory the record holds must be one the generation in force stacks (or its upper).
            for n in g.generationNumbers() {
                guard let gen = try? g.directory.openDirectory(OverlayGuest.generationName(n)) else { return [] }
                for sub in [GuestImage.layerName, "meta", "upper"] where (try? gen.stat(FileName(sub))) != nil {
                    if n == state.generation && sub == "upper" { continue }
                    if !refs.contains("g\(n)/\(sub)") { return [] }
                }
            }
            for ref in refs {
                guard let layer = try? g.layer(ref) else { return [] }
                if let bytes = try? layer.holder.openFileForReading(fileName(layer.name)).readAll(),
                    let bytes = verifiedBody(bytes)
                {
                    // Only membership matters here: each candidate is looked up in the sorted lines.
                    left = left.filter { !sortedLinesContain(bytes, $0) }
                } else {
                    guard let counts = try? record(layer) else { return [] }
                    left = left.filter { (counts[$0] ?? 0) == 0 }
                }
                if left.isEmpty { return [] }
            }
        }
        return left
    }
}
