import HashifySystem

/// What linking did.
public struct LinkOutcome: Sendable {
    public var pathsLinked = 0
    public var inodesFreed = 0
    public var bytesSaved: UInt64 = 0
    public var objectsCreated = 0
    public var pathsWithOtherModificationTime = 0
    public var perGuestPaths: [Int: Int] = [:]
    public var perGuestInodes: [Int: Int] = [:]
    public var perGuestBytes: [Int: UInt64] = [:]
    public var skips: [Skip] = []
    /// By inode index: true when the inode lost its last name (processes
    /// mapping it should restart).
    public var freed: [Bool] = []

    /// Counts one name linked to its group's object, in guest `guest`.
    mutating func countLinked(guest: Int, otherModificationTime: Bool) {
        pathsLinked += 1
        perGuestPaths[guest, default: 0] += 1
        if otherModificationTime { pathsWithOtherModificationTime += 1 }
    }

    /// Counts inode `victim` of guest `owner` freed (its last name is gone) with the bytes it held.
    mutating func countFreed(_ victim: Int32, owner: Int, bytes: UInt64) {
        inodesFreed += 1
        bytesSaved += bytes
        perGuestInodes[owner, default: 0] += 1
        perGuestBytes[owner, default: 0] += bytes
        freed[Int(victim)] = true
    }
}

/// How a unify run makes the members of each identity group share one copy.
///
/// This is the stage of `unify` that changes what is stored under a plain
/// guest's names: walk, plan and hash only read, and every strategy shares
/// them. `hardlink` (`HardlinkLinker`) is the one built today; a reflink mode
/// plugs in here, beside it. Overlay guests are not changed path by path but
/// get a whole new generation of layers: that fold lives in `Overlay/`.
protocol LinkStrategy: AnyObject {
    /// Called with (names done, names planned) as the work goes on.
    var progress: (@Sendable (Int, Int) -> Void)? { get set }
    /// Links each group's victims to the group's object; every guard of the
    /// invariants is the strategy's own.
    func run(_ groups: [Planner.Group]) -> LinkOutcome
}
