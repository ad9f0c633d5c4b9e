import HashifyEngine
import SystemPackage
import Testing

/// The linker visits directories by guest-relative path, all guests' copies
/// of one path back to back; the order must still hold every directory once.
@Suite("linking order")
struct LinkingOrderTests {
    @Test(
        "directories by relative path: each once, one path's guests together in guest order, paths in walk order; names by directory"
    )
    func directoriesByRelativePath() throws {
        let s = Scratch("order")
        let roots = (1...3).map { s.sub("g\($0)") }
        for (i, r) in roots.enumerated() {
            for d in ["usr/bin", "usr/lib/x", "etc", "var/lib"] { writeFile("\(r)/\(d)/f", "same") }
            if i == 1 { writeFile("\(r)/opt/only-here/f", "one guest") }
            // A name that differs from another path's only in where the slash falls.
            writeFile("\(r)/" + (i == 2 ? "ab/c" : "a/bc") + "/f", "slash")
        }
        let guests = try RootValidation.openRoots(roots.map { FilePath($0) })
        let inventory = Walker(filter: PathFilter(excludes: [], includes: []), minimumSize: 1)
            .walk(guests, conffiles: guests.map { _ in [] }).inventory
        let order = inventory.directoriesByRelativePath()
        #expect(order.sorted() == Array(0..<Int32(inventory.directories.count)))
        let paths = order.map { inventory.directoryPath($0) }
        // Runs of one path: contiguous, guests ascending, and no path comes back later.
        var seen = Set<[UInt8]>()
        var i = 0
        while i < order.count {
            var j = i
            while j + 1 < order.count && paths[j + 1] == paths[i] { j += 1 }
            #expect(!seen.contains(paths[i]), "path \(String(decoding: paths[i], as: UTF8.self)) comes back")
            seen.insert(paths[i])
            let g = order[i...j].map { inventory.directories[Int($0)].guest }
            #expect(g == g.sorted() && Set(g).count == g.count)
            i = j + 1
        }
        // Every guest has usr/lib/x; it forms one run of three.
        let x = paths.indices.filter { paths[$0] == Array("/usr/lib/x".utf8) }
        #expect(x.count == 3 && x.last! - x.first! == 2)
        // First appearances keep the walk's order (the first guest's preorder).
        let firstGuest = (0..<inventory.directories.count).filter { inventory.directories[$0].guest == 0 }
            .map { inventory.directoryPath(Int32($0)) }
        let firstSeen = paths.reduce(into: [[UInt8]]()) { acc, p in if !acc.contains(p) { acc.append(p) } }
        #expect(Array(firstSeen.filter { firstGuest.contains($0) }) == firstGuest)
        // Each directory's names are one range of the name table, found by nameRange.
        var covered = 0
        for d in 0..<Int32(inventory.directories.count) {
            let range = inventory.nameRange(ofDirectory: d)
            #expect(range.allSatisfy { inventory.names[Int($0)].directory == d })
            covered += range.count
        }
        #expect(covered == inventory.names.count)
    }
}
