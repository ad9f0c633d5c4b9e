import HashifySystem
import SystemPackage

/// Options of a `unify` run.
public struct UnifyOptions: Sendable {
    public var roots: [FilePath]
    public var store: FilePath?
    public var dryRun = false
    public var excludes: [[UInt8]] = []
    public var includes: [[UInt8]] = []
    /// Patterns of single guests, added to `excludes` and `includes` for them (by root as given).
    public var guestExcludes: [FilePath: [[UInt8]]] = [:]
    public var guestIncludes: [FilePath: [[UInt8]]] = [:]
    public var defaultExcludes = true
    public var minimumSize: UInt64 = 1
    public var ignoreModificationTime = false
    public var threads = 4
    public var waitForLock = true
    /// `.overlay`: plain guests that are not running are converted to overlay guests first (the rest wait).
    public var mode: HashifyConfig.Mode = .hardlink
    /// Whose roots hardlink mode trusts besides the host's root (the config's `trust-guest-roots` and `trust-root`).
    public var rootTrust = RootTrustPolicy()
    /// Hardlink mode's guests whose root is not trusted, by canonical root, with why (set by `Unifier.run`).
    var untrustedRoots: [FilePath: String] = [:]
    public init(roots: [FilePath]) { self.roots = roots }

    /// The options the host's config gives (the defaults where it is silent
    /// or absent); the command line adds to them or overrides them.
    public init(roots: [FilePath], config: HashifyConfig?, processors: Int) {
        self.roots = roots
        store = config?.store
        excludes = config?.excludes ?? []
        includes = config?.includes ?? []
        defaultExcludes = config?.defaultExcludes ?? true
        minimumSize = config?.minimumSize ?? 1
        ignoreModificationTime = config?.ignoreModificationTime ?? false
        threads = config?.threads ?? Self.defaultThreads(processors: processors)
        mode = config?.mode ?? .hardlink
        // Guests the config names by root; the command line adds those it knows by name.
        rootTrust = config?.rootTrust(names: GuestNames()) ?? RootTrustPolicy()
    }

    /// Hashing threads for a machine: one per CPU, but at least 4 (on a cold
    /// cache several reads in flight beat one per core) and at most 16 (each
    /// thread holds 1.25 MiB of buffers).
    public static func defaultThreads(processors: Int) -> Int { min(16, max(4, processors)) }
}

/// The phases a run reports progress for.
public enum Phase: String, Sendable {
    case walk = "scanning"
    case hash = "hashing"
    case link = "linking"
}

/// Receives progress; called from worker threads.
public protocol ProgressSink: Sendable {
    func update(phase: Phase, done: Int, total: Int?, bytes: UInt64, totalBytes: UInt64?)
    func finish()
}

/// Runs `unify`: walk → plan → hash → link → report.
public struct Unifier {
    public var options: UnifyOptions
    public var progress: (any ProgressSink)?

    public init(options: UnifyOptions, progress: (any ProgressSink)? = nil) {
        self.options = options
        self.progress = progress
    }

    /// Unifies the plain guests among the roots with hard links and folds the
    /// overlay guests (those the store has overlay records for).
    public func run() throws -> UnifyReport {
        if options.roots.isEmpty { throw InputError("no guest root given") }
        // Guests are named by their real path in every report (as status and mem name them).
        let roots = options.roots.map { RootValidation.canonical($0) ?? $0 }
        // Each overlay guest carries its store: given another, the run refuses; not given, the
        // plain guests take the default store, and each overlay guest folds in its own.
        var ownStores: [FilePath: FilePath] = [:]
        for r in roots { if let own = GuestStore.of(r) { ownStores[r] = own } }
        let unmarked = roots.filter { ownStores[$0] == nil }
        let storePath = options.store ?? RootValidation.defaultStorePath(for: roots)
        // A plain guest belongs to the store an earlier run unified it with (given another, the run refuses).
        try GuestStore.check(options.store == nil ? unmarked : roots, store: storePath)
        var overlay = Overlay.overlayGuests(among: unmarked, storePath: storePath).union(ownStores.keys)
        var plain = roots.filter { !overlay.contains($0) }
        var conversion = Conversion()
        if options.mode == .overlay {
            conversion = try convert(plain, storePath: storePath)
            overlay.formUnion(conversion.converted)
            plain = []
        }
        var report: UnifyReport
        if plain.isEmpty {
            report = UnifyReport(dryRun: options.dryRun, store: storePath.string)
        } else {
            var o = options
            o.roots = plain
            o.store = storePath
            // Walked (their shared files counted), but none of their files linked.
            o.untrustedRoots = options.rootTrust.untrusted(plain)
            report = try Unifier(options: o, progress: progress).runHardlink()
        }
        if !overlay.isEmpty {
            let started = MonotonicInstant.now()
            _ = prepareProcessForUnification()
            // A guest converted by this run has nothing to fold: its conversion is its report.
            let toFold = roots.filter { overlay.contains($0) && !conversion.converted.contains($0) }
            var byStore: [FilePath: [FilePath]] = [:]
            for r in toFold { byStore[ownStores[r] ?? storePath, default: []].append(r) }
            for (path, group) in byStore.sorted(by: { $0.key.string < $1.key.string }) {
                guard let store = try Store.open(at: path, create: false) else {
                    for r in group {
                        var left = OverlayReport.Guest(root: r.string, action: .leftAsItWas)
                        left.notes.append("its store \(path) cannot be opened")
                        report.overlayGuests.append(left)
                    }
                    continue
                }
                if !options.dryRun { try store.lock(wait: options.waitForLock) }
                report.overlayGuests += try Overlay.fold(roots: group, store: store, dryRun: options.dryRun)
            }
            report.overlayGuests += conversion.reports
            report.mode = plain.isEmpty ? "overlay" : "hardlink+overlay"
            report.seconds += Overlay.elapsed(since: started)
        }
        report.overlayGuests += conversion.failed
        report.notes += conversion.notes
        return report
    }

    /// What overlay mode's conversions did.
    struct Conversion {
        var converted = Set<FilePath>()
        /// What the conversions did, per guest.
        var reports: [OverlayReport.Guest] = []
        var notes: [String] = []
        /// Guests whose conversion failed (not refused): the run exits with status 1.
        var failed: [OverlayReport.Guest] = []
    }

    /// Overlay mode: each plain guest that is not running becomes an overlay
    /// guest (then folded with the others); a refused one (running, a mount
    /// point, …) is left as it is for a later run, and is not hard-linked meanwhile.
    func convert(_ plain: [FilePath], storePath: FilePath) throws -> Conversion {
        var c = Conversion()
        for root in plain {
            if options.dryRun {
                if let why = Overlay.conversionRefusal(root: root, storePath: storePath) {
                    c.notes.append("\(root) would be left as it is until a later run (mode overlay): \(why)")
                } else {
                    c.notes.append("\(root) would be converted to an overlay guest (mode overlay)")
                }
                continue
            }
            var o = OverlayOptions(roots: [root])
            o.store = storePath
            o.waitForLock = options.waitForLock
            do {
                c.reports += try Overlay.convert(o).guests
                c.converted.insert(root)
            } catch let e as InputError {
                c.notes.append("\(root) left as it is until a later run (mode overlay): \(e.description)")
            } catch let busy as Store.Busy {
                throw busy
            } catch {
                var g = OverlayReport.Guest(root: root.string, action: .leftAsItWas)
                g.notes.append("conversion to an overlay guest failed: \(error)")
                c.failed.append(g)
            }
        }
        return c
    }
}
