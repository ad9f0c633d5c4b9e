/// The strategy of a dry run: it changes nothing and tallies what the
/// `hardlink` strategy does when every guard passes, filling the same
/// `LinkOutcome` the same way, so `--dry-run` predicts the real run by
/// construction (the real run can only do less: what a guest changes
/// meanwhile is skipped, and an object full at the filesystem's link limit
/// makes one more).
final class DryRunTally: LinkStrategy {
    let inventory: Inventory
    var progress: (@Sendable (Int, Int) -> Void)?

    init(inventory: Inventory) { self.inventory = inventory }

    func run(_ groups: [Planner.Group]) -> LinkOutcome {
        var outcome = LinkOutcome()
        outcome.freed = [Bool](repeating: false, count: inventory.inodes.count)
        for group in groups {
            if !inventory.inodes[Int(group.keeper)].isStoreObject { outcome.objectsCreated += 1 }
            for v in group.victims {
                let e = inventory.inodes[Int(v)]
                for n in inventory.names(of: v) {
                    outcome.countLinked(
                        guest: Int(inventory.guest(ofName: n)),
                        otherModificationTime: e.modificationTime != group.identity.modificationTime)
                }
                // Every name of a victim is in the roots (others are never planned): it is freed.
                outcome.countFreed(v, owner: Int(inventory.guest(ofInode: v)), bytes: e.allocatedBytes)
            }
        }
        return outcome
    }
}
