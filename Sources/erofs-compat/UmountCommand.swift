import ArgumentParser
import Runtime

/// `erofs-compat umount MOUNTPOINT`.
struct UmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "umount",
        abstract: "Unmount an image mounted by erofs-compat and release its loop device and state.",
        discussion: """
            Works from any directory and with any path form of the mountpoint. A record whose mount is \
            already gone (someone ran umount(8)) is cleaned up. Mounts not made by erofs-compat are refused.

            Exit codes: 0 unmounted, 1 the unmount failed (e.g. busy), 2 usage error, 5 not root (a user may unmount their own fuse-erofs mounts), \
            6 nothing of erofs-compat's is mounted there.
            """
    )

    @Flag(help: "Detach now and clean up when the last open file closes (MNT_DETACH).")
    var lazy = false

    @Argument(help: "The mountpoint.")
    var mountpoint: String

    func run() throws {
        let (record, stale) = try runtimeCall { try Runtime().umount(mountpoint, lazy: lazy) }
        if stale {
            print("\(record.mountpoint) was already unmounted; removed its stale state")
        } else {
            print("unmounted \(record.mountpoint)\(record.device.map { " (released \($0))" } ?? "")")
        }
    }
}
