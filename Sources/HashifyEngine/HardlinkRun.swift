import HashifySystem
import SystemPackage

extension Unifier {
    /// Unifies plain guests in hardlink mode: walk → recover → plan and hash →
    /// link (or, in a dry run, tally) → record, each phase one method of `HardlinkRun`.
    func runHardlink() throws -> UnifyReport {
        var run = try HardlinkRun(options: options, progress: progress)
        var walk = run.walk()
        let objectGenerations = run.attachObjects(&walk)
        run.recover(&walk)
        let plan = run.planAndHash(walk)
        run.countScanned(walk, plan: plan)
        let outcome = try run.link(plan, objectGenerations: objectGenerations)
        run.record(walk.inventory, plan: plan, outcome: outcome)
        return run.finish()
    }
}

/// One hardlink-mode run over plain guests, phase by phase. The link phase
/// is a `LinkStrategy`: `HardlinkLinker` for a real run, `DryRunTally` for a
/// dry run, and both outcomes are reported by the same code.
struct HardlinkRun {
    let options: UnifyOptions
    let sink: (any ProgressSink)?
    let roots: [GuestRoot]
    let store: Store?
    let started = MonotonicInstant.now()
    var report: UnifyReport
    var perGuest: [UnifyReport.Guest]
    var skips: [Skip] = []
    /// Guests whose root is not trusted, by index, with why: walked, never linked.
    let untrusted: [Int: String]
    private var clock = MonotonicInstant.now()

    /// What planning and hashing found.
    struct Plan {
        var inventory: Inventory
        var candidates: Planner.Candidates
        var contents: InodeContents
        var groups: [Planner.Group]
    }

    /// Opens the roots and the store (made, and locked, unless this is a dry run).
    init(options: UnifyOptions, progress: (any ProgressSink)?) throws {
        self.options = options
        self.sink = progress
        _ = prepareProcessForUnification()
        roots = try RootValidation.openRoots(options.roots)
        let storePath = options.store ?? RootValidation.defaultStorePath(for: options.roots)
        try RootValidation.checkStore(storePath, roots: roots)
        if options.dryRun {
            store = try Store.open(at: storePath, create: false)
        } else {
            let s = try Store.open(at: storePath, create: true)!
            try s.lock(wait: options.waitForLock)
            store = s
        }
        report = UnifyReport(dryRun: options.dryRun, store: storePath.string)
        perGuest = roots.map { UnifyReport.Guest(root: $0.path.string) }
        var untrusted: [Int: String] = [:]
        for (g, r) in roots.enumerated() { untrusted[g] = options.untrustedRoots[r.path] }
        self.untrusted = untrusted
    }

    /// Adds the time since the last lap to `phase`.
    private mutating func lap(_ phase: String) {
        report.phaseSeconds[phase, default: 0] += clock.secondsElapsed
        clock = MonotonicInstant.now()
    }

    /// Walks every guest with its excludes, includes and dpkg conffiles.
    mutating func walk() -> Walker.Result {
        let excludes =
            (options.defaultExcludes ? PathFilter.defaultExcludes.map { Array($0.utf8) } : []) + options.excludes
        let conffiles = roots.map { DpkgConffiles.read(guestRoot: $0.directory) }
        var walker = Walker(
            filter: PathFilter(excludes: excludes, includes: options.includes),
            minimumSize: max(1, options.minimumSize))
        for (g, root) in roots.enumerated() {
            let ex = options.guestExcludes[root.path] ?? []
            let inc = options.guestIncludes[root.path] ?? []
            if !ex.isEmpty || !inc.isEmpty {
                walker.guestFilters[g] = PathFilter(excludes: excludes + ex, includes: options.includes + inc)
            }
        }
        let sink = self.sink
        walker.onProgress = { n in sink?.update(phase: .walk, done: n, total: nil, bytes: 0, totalBytes: nil) }
        let walk = walker.walk(roots, conffiles: conffiles)
        lap("walk")
        skips += walk.skips
        return walk
    }

    /// Marks the inodes that are store objects; returns their generations by inode index.
    func attachObjects(_ walk: inout Walker.Result) -> [Int32: Int] {
        var objectGenerations: [Int32: Int] = [:]
        for (inode, generation) in (try? store?.objectGenerations()) ?? [:] {
            if let i = walk.inventory.index(ofInode: inode) {
                walk.inventory.inodes[Int(i)].isStoreObject = true
                objectGenerations[i] = generation
            }
        }
        return objectGenerations
    }

    /// Cleans up what an interrupted run left (not in a dry run).
    mutating func recover(_ walk: inout Walker.Result) {
        guard let store, !options.dryRun else { return }
        report.totals.temporariesRemoved = Recovery.clean(walk: &walk, roots: roots, store: store, skips: &skips)
    }

    /// Candidate groups, hashed (inodes the index vouches for are not read), then identity groups.
    mutating func planAndHash(_ walk: Walker.Result) -> Plan {
        let inventory = walk.inventory
        var candidates = Planner.candidates(inventory, ignoreModificationTime: options.ignoreModificationTime)
        if !untrusted.isEmpty {
            // An inode a guest of an untrusted root names is neither linked nor linked to.
            let untrusted = self.untrusted
            candidates = candidates.removing { i in
                inventory.names(of: i).contains { untrusted[Int(inventory.guest(ofName: $0))] != nil }
            }
        }
        for i in candidates.incomplete {
            skips.append(skip(inventory, inode: i, .linksOutsideRoots))
        }
        let contents = InodeContents(count: inventory.inodes.count)
        if let store, let problem = contents.load(from: store, inventory: inventory) { report.notes.append(problem) }
        let hashGroups = candidates.filtered { !contents.isKnown($0) }
        let count = hashGroups.members.count
        let totalBytes = hashGroups.members.reduce(UInt64(0)) { $0 + inventory.inodes[Int($1)].size }
        var hasher = ContentHasher(threads: options.threads)
        hasher.needsDigests = !options.dryRun
        let sink = self.sink
        let hashed = hasher.hashGroups(
            hashGroups, inventory: inventory, roots: roots.map(\.directory),
            contents: contents
        ) { files, bytes in
            sink?.update(phase: .hash, done: files, total: count, bytes: bytes, totalBytes: totalBytes)
        }
        lap("hash")
        report.totals.bytesHashed = hashed.bytesRead
        report.totals.bytesToHash = totalBytes
        report.totals.indexHits = candidates.members.count - count
        for (inode, reason) in hashed.skips { skips.append(skip(inventory, inode: inode, reason)) }
        return Plan(
            inventory: inventory, candidates: candidates, contents: contents,
            groups: Planner.groups(inventory, candidates: candidates, contents: contents))
    }

    private func skip(_ inventory: Inventory, inode: Int32, _ reason: SkipReason) -> Skip {
        let n = inventory.inodes[Int(inode)].firstName
        return Skip(guest: Int(inventory.guest(ofName: n)), path: inventory.path(ofName: n), reason: reason)
    }

    /// The totals the walk and the plan give, before anything is linked.
    mutating func countScanned(_ walk: Walker.Result, plan: Plan) {
        let inventory = walk.inventory
        report.totals.candidates = plan.candidates.members.count
        report.totals.identityGroups = plan.groups.count
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
        for group in plan.groups {
            for v in group.victims { report.totals.bytesSavedMaximum += inventory.inodes[Int(v)].allocatedBytes }
        }
    }

    /// Links every group's victims (a dry run tallies them), under a run journal in the store.
    mutating func link(_ plan: Plan, objectGenerations: [Int32: Int]) throws -> LinkOutcome {
        lap("plan")
        guard let store, !options.dryRun else { return DryRunTally(inventory: plan.inventory).run(plan.groups) }
        let journal = try RunJournal(store: store, runID: makeRunID())
        let linker = HardlinkLinker(
            inventory: plan.inventory, roots: roots, store: store, journal: journal,
            contents: plan.contents, objectGenerations: objectGenerations)
        let total = plan.groups.reduce(0) { n, g in
            n + g.victims.reduce(0) { $0 + Int(plan.inventory.inodes[Int($1)].nameCount) }
        }
        let sink = self.sink
        linker.progress = { done, _ in sink?.update(phase: .link, done: done, total: total, bytes: 0, totalBytes: nil) }
        let outcome = linker.run(plan.groups)
        lap("link")
        journal.finish()
        return outcome
    }

    /// Reports what linking did (or would do), and records in the store what
    /// this run vouches for: the index, the guests, the files open for writing.
    mutating func record(_ inventory: Inventory, plan: Plan, outcome: LinkOutcome) {
        skips += outcome.skips
        report.totals.pathsLinked = outcome.pathsLinked
        report.totals.inodesFreed = outcome.inodesFreed
        report.totals.bytesSaved = outcome.bytesSaved
        report.totals.objectsCreated = outcome.objectsCreated
        report.totals.pathsWithOtherModificationTime = outcome.pathsWithOtherModificationTime
        for (g, n) in outcome.perGuestPaths {
            perGuest[g].pathsLinked = n
            perGuest[g].pathsShared += n
        }
        for (g, n) in outcome.perGuestInodes { perGuest[g].inodesFreed = n }
        for (g, n) in outcome.perGuestBytes { perGuest[g].bytesSaved = n }
        guard let store, !options.dryRun else { return }
        report.processesToRestart = ProcessScanner.processesMapping(device: inventory.device) { inode in
            inventory.index(ofInode: inode).map { outcome.freed[Int($0)] } ?? false
        }
        // What this walk saw and hashify vouches for (and records of other filesystems).
        do { try plan.contents.save(to: store, inventory: inventory) } catch {
            report.notes.append("could not save the index: \(error)")
        }
        // The objects no guest links any more go now: the routine needs no separate gc for them.
        do {
            let collected = try StoreObjects(store: store).collectUnlinkedObjects()
            // An unused object a new one of its identity replaced is removed too.
            report.totals.objectsRemoved = collected.objects + store.replacedObjects
            report.totals.bytesFreedByRemoval = collected.bytes + store.replacedBytes
            if let first = collected.notRemoved.first {
                report.notes.append(
                    "\(collected.notRemoved.count) object\(collected.notRemoved.count == 1 ? "" : "s") no guest links any more could not be removed (\(first)): they stay"
                )
            }
        } catch {
            report.notes.append("could not remove the objects no guest links any more: \(error)")
        }
        store.rememberGuests(roots.map(\.path))
        // Another run may have unified them with another store at the same time: said, never silent.
        for r in roots {
            do { _ = try RootValidation.storeKnowing(root: r.path, using: store.path) } catch {
                if "\(error)".contains(": a guest of two stores, ") { report.guestsOfTwoStores.append("\(error)") }
                report.notes.append("\(error)")
            }
        }
        store.recordOpenForWriting(
            skips.filter { $0.reason == .openForWriting }.map { (roots[$0.guest].path.string, escapedPath($0.path)) },
            roots: roots.map(\.path.string))
    }

    /// The report, with skips, errors, time and peak memory.
    mutating func finish() -> UnifyReport {
        sink?.finish()
        for s in skips { perGuest[s.guest].skipped += 1 }
        report.skipped = skippedPaths(skips, roots: roots)
        report.totals.errors = skips.filter { $0.reason.isError }.count
        report.totals.skipped = skips.count
        report.guests = perGuest
        report.notLinked = untrusted.sorted { $0.key < $1.key }.map { g, why in
            UnifyReport.NotLinked(
                root: roots[g].path.string, reason: why, pathsShared: perGuest[g].pathsShared,
                overlayCanTakeIt: Overlay.idmappedRootfs(roots[g].path) == nil)
        }
        report.seconds = started.secondsElapsed
        report.peakMemoryBytes = peakResidentBytes()
        return report
    }
}
