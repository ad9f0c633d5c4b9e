import HashifySystem
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

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
    public init(roots: [FilePath]) { self.roots = roots }

    /// Hashing threads for a machine: one per CPU, but at least 4 (on a cold
    /// cache several reads in flight beat one per core) and at most 16 (each
    /// thread holds 1.25 MiB of buffers).
    public static func defaultThreads(processors: Int) -> Int { min(16, max(4, processors)) }
}

/// The phases a run reports progress for.
public enum Phase: String, Sendable {
    case walk = "scanning", hash = "hashing", link = "linking"
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
        let storePath = options.store ?? RootValidation.defaultStorePath(for: options.roots)
        var overlay = Overlay.overlayGuests(among: options.roots, storePath: storePath)
        var plain = options.roots.filter { !overlay.contains($0) }
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
            report = try Unifier(options: o, progress: progress).runHardlink()
        }
        if !overlay.isEmpty {
            let started = MonotonicInstant.now()
            _ = prepareProcessForUnification()
            guard let store = try Store.open(at: storePath, create: false) else { return report }
            if !options.dryRun { try store.lock(wait: options.waitForLock) }
            report.overlayGuests = try Overlay.fold(roots: options.roots.filter { overlay.contains($0) }, store: store, dryRun: options.dryRun)
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
            if options.dryRun { c.notes.append("\(root) would be converted to an overlay guest (mode overlay)"); continue }
            var o = OverlayOptions(roots: [root])
            o.store = storePath
            o.waitForLock = options.waitForLock
            do {
                _ = try Overlay.convert(o)
                c.notes.append("\(root) converted to an overlay guest (mode overlay)")
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

    func runHardlink() throws -> UnifyReport {
        let started = MonotonicInstant.now()
        _ = prepareProcessForUnification()
        let roots = try RootValidation.openRoots(options.roots)
        let storePath = options.store ?? RootValidation.defaultStorePath(for: options.roots)
        try RootValidation.checkStore(storePath, roots: roots)
        var store: Store?
        if options.dryRun {
            store = try Store.open(at: storePath, create: false)
        } else {
            store = try Store.open(at: storePath, create: true)
            try store!.lock(wait: options.waitForLock)
        }
        var report = UnifyReport(dryRun: options.dryRun, store: storePath.string)

        // Walk.
        let excludes = (options.defaultExcludes ? PathFilter.defaultExcludes.map { Array($0.utf8) } : []) + options.excludes
        let conffiles = roots.map { DpkgConffiles.read(guestRoot: $0.directory) }
        var walker = Walker(filter: PathFilter(excludes: excludes, includes: options.includes), minimumSize: max(1, options.minimumSize))
        for (g, root) in roots.enumerated() {
            let ex = options.guestExcludes[root.path] ?? [], inc = options.guestIncludes[root.path] ?? []
            if !ex.isEmpty || !inc.isEmpty { walker.guestFilters[g] = PathFilter(excludes: excludes + ex, includes: options.includes + inc) }
        }
        let sink = progress
        walker.onProgress = { n in sink?.update(phase: .walk, done: n, total: nil, bytes: 0, totalBytes: nil) }
        var clock = MonotonicInstant.now()
        func lap(_ phase: String) {
            report.phaseSeconds[phase, default: 0] += clock.secondsElapsed
            clock = MonotonicInstant.now()
        }
        var walk = walker.walk(roots, conffiles: conffiles)
        lap("walk")
        var skips = walk.skips

        // Attach store objects to the inodes guests link.
        var objectGenerations: [Int32: Int] = [:]
        for (inode, generation) in (try? store?.objectGenerations()) ?? [:] {
            if let i = walk.inventory.index(ofInode: inode) {
                walk.inventory.inodes[Int(i)].isStoreObject = true
                objectGenerations[i] = generation
            }
        }

        // Leftovers of an interrupted run.
        if let store, !options.dryRun {
            report.totals.temporariesRemoved = Recovery.clean(walk: &walk, roots: roots, store: store, skips: &skips)
        }
        let inventory = walk.inventory

        // Plan and hash; inodes the index vouches for are not read at all.
        let candidates = Planner.candidates(inventory, ignoreModificationTime: options.ignoreModificationTime)
        for i in candidates.incomplete {
            let n = inventory.inodes[Int(i)].firstName
            skips.append(Skip(guest: Int(inventory.guest(ofName: n)), path: inventory.path(ofName: n), reason: .linksOutsideRoots))
        }
        let contents = InodeContents(count: inventory.inodes.count)
        if let store, let problem = contents.load(from: store, inventory: inventory) { report.notes.append(problem) }
        let hashGroups = candidates.filtered { !contents.isKnown($0) }
        let count = hashGroups.members.count
        let totalBytes = hashGroups.members.reduce(UInt64(0)) { $0 + inventory.inodes[Int($1)].size }
        var hasher = ContentHasher(threads: options.threads)
        hasher.needsDigests = !options.dryRun
        let hashed = hasher.hashGroups(hashGroups, inventory: inventory,
                                                                        roots: roots.map(\.directory), contents: contents) { files, bytes in
            sink?.update(phase: .hash, done: files, total: count, bytes: bytes, totalBytes: totalBytes)
        }
        lap("hash")
        report.totals.bytesHashed = hashed.bytesRead
        report.totals.bytesToHash = totalBytes
        report.totals.indexHits = candidates.members.count - count
        for (inode, reason) in hashed.skips {
            let n = inventory.inodes[Int(inode)].firstName
            skips.append(Skip(guest: Int(inventory.guest(ofName: n)), path: inventory.path(ofName: n), reason: reason))
        }
        let groups = Planner.groups(inventory, candidates: candidates, contents: contents)

        // Totals the plan promises.
        report.totals.candidates = candidates.members.count
        report.totals.identityGroups = groups.count
        var perGuest = roots.map { UnifyReport.Guest(root: $0.path.string) }
        for (g, c) in walk.counts.enumerated() {
            perGuest[g].filesScanned = c.regularFiles
            perGuest[g].bytesScanned = c.regularBytes
            report.totals.directories += c.directories + 1
            report.totals.filesScanned += c.regularFiles
            report.totals.bytesScanned += c.regularBytes
            report.totals.excluded += c.excluded
            report.totals.conffiles += c.conffiles
            report.totals.belowMinimumSize += c.belowMinimumSize
        }
        report.totals.guests = roots.count
        for (i, e) in inventory.inodes.enumerated() where e.isStoreObject {
            for n in inventory.names(of: Int32(i)) {
                let g = Int(inventory.guest(ofName: n))
                perGuest[g].pathsShared += 1
                perGuest[g].bytesShared += e.size
            }
        }
        for group in groups {
            for v in group.victims {
                report.totals.bytesSavedMaximum += inventory.inodes[Int(v)].allocatedBytes
            }
        }

        if options.dryRun {
            for group in groups {
                for v in group.victims {
                    let e = inventory.inodes[Int(v)]
                    report.totals.pathsLinked += Int(e.nameCount)
                    report.totals.inodesFreed += 1
                    report.totals.bytesSaved += e.allocatedBytes
                    let owner = Int(inventory.guest(ofInode: v))
                    perGuest[owner].inodesFreed += 1
                    perGuest[owner].bytesSaved += e.allocatedBytes
                    for n in inventory.names(of: v) {
                        perGuest[Int(inventory.guest(ofName: n))].pathsLinked += 1
                        if e.modificationTime != group.identity.modificationTime { report.totals.pathsWithOtherModificationTime += 1 }
                    }
                }
            }
        } else if let store {
            let journal = try RunJournal(store: store, runID: makeRunID())
            let linker: any LinkStrategy = HardlinkLinker(inventory: inventory, roots: roots, store: store, journal: journal,
                                        contents: contents, objectGenerations: objectGenerations)
            let total = groups.reduce(0) { n, g in n + g.victims.reduce(0) { $0 + Int(inventory.inodes[Int($1)].nameCount) } }
            linker.progress = { done, _ in sink?.update(phase: .link, done: done, total: total, bytes: 0, totalBytes: nil) }
            lap("plan")
            let linked = linker.run(groups)
            lap("link")
            journal.finish()
            skips += linked.skips
            report.totals.pathsLinked = linked.pathsLinked
            report.totals.inodesFreed = linked.inodesFreed
            report.totals.bytesSaved = linked.bytesSaved
            report.totals.objectsCreated = linked.objectsCreated
            report.totals.pathsWithOtherModificationTime = linked.pathsWithOtherModificationTime
            for (g, n) in linked.perGuestPaths { perGuest[g].pathsLinked = n; perGuest[g].pathsShared += n }
            for (g, n) in linked.perGuestInodes { perGuest[g].inodesFreed = n }
            for (g, n) in linked.perGuestBytes { perGuest[g].bytesSaved = n }
            report.processesToRestart = ProcessScanner.processesMapping(device: inventory.device) { inode in
                inventory.index(ofInode: inode).map { linked.freed[Int($0)] } ?? false
            }
        }
        if let store, !options.dryRun {
            // What this walk saw and hashify vouches for (and records of other filesystems).
            do { try contents.save(to: store, inventory: inventory) } catch { report.notes.append("could not save the index: \(error)") }
            store.rememberGuests(roots.map(\.path))
        }
        sink?.finish()

        for s in skips { perGuest[s.guest].skipped += 1 }
        report.skipped = skippedPaths(skips, roots: roots)
        if let store, !options.dryRun {
            store.recordOpenForWriting(skips.filter { $0.reason == .openForWriting }.map { (roots[$0.guest].path.string, escapedPath($0.path)) },
                                       roots: roots.map(\.path.string))
        }
        report.totals.errors = skips.filter { $0.reason.isError }.count
        report.totals.skipped = skips.count
        report.guests = perGuest
        report.seconds = started.secondsElapsed
        report.peakMemoryBytes = peakResidentBytes()
        return report
    }
}


