// erofs-compat-bench: in-process latency figures for `make bench`, each against a baseline measured
// in the same run (process start-up excluded on both sides).
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Glibc
import Probe
import EROFS
import Runtime
import Syscall
import SystemPackage

func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }
func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

let args = CommandLine.arguments
guard args.count == 4, args[1] == "mount-latency" else {
    print("usage: erofs-compat-bench mount-latency IMAGE WORKDIR")
    exit(2)
}
let image = args[2], work = args[3]
let mnt = work + "/mnt"
try? Sys.mkdir(mnt)
let runtime = Runtime(state: StateStore(root: (ProcessInfo.processInfo.environment["BENCH_STATE_BASE"] ?? "/run") + "/erofs-compat-bench-\(Sys.processID)"))
let rounds = 100

/// Each operation is timed on its own, with the mount left in place for `dwell` in between (the same
/// for every side): a umount issued within microseconds of its mount finds less kernel work pending
/// than one issued after the mount has been in place a while, as any real mount has; timing the pair
/// back to back would hand that advantage to the raw side only (which has nothing to do in between).
let dwell: UInt64 = 2_000_000

/// Raw file-backed: fsopen + fsconfig(source, ro) + CREATE + fsmount + move_mount (+ close).
func rawFileMount() throws {
    let fc = try MountAPI.fsopen("erofs")
    try MountAPI.setString(fc, "source", image)
    try MountAPI.setFlag(fc, "ro")
    try MountAPI.create(fc)
    try MountAPI.attach(fc, attributes: [.readOnly], at: mnt)
}

/// Raw loop: GET_FREE + LOOP_CONFIGURE + mount of the device (autoclear detaches it at umount).
func rawLoopMount() throws {
    let backing = try Sys.open(image, O_RDONLY)
    defer { Sys.close(backing.rawValue) }
    let n = try Loop.getFree()
    let dev = try Sys.open("/dev/loop\(n)", O_RDONLY)
    defer { Sys.close(dev.rawValue) }
    try Loop.configure(device: dev.rawValue, backing: backing.rawValue, flags: [.readOnly, .autoClear, .directIO], blockSize: 4096)
    let fc = try MountAPI.fsopen("erofs")
    try MountAPI.setString(fc, "source", "/dev/loop\(n)")
    try MountAPI.setFlag(fc, "ro")
    try MountAPI.create(fc)
    try MountAPI.attach(fc, attributes: [.readOnly], at: mnt)
}

func rawUmount() throws { try MountAPI.umount(mnt) }

/// The floor: the steps the runtime issue requires around the raw syscalls and nothing else (no
/// planner, no findings, a fixed record): canonical source and mountpoint, superblock with its
/// checksum, libblkid, the state lock, "already a mount?", the mount id, the record written
/// atomically (temp + fsync + rename); at umount the canonical path, the lock, the record read,
/// "still ours?", the record removed.
let floorState = runtime.state.root + "-floor"
let floorRecord = floorState + "/record.json"
let floorBytes = Array(#"{"backend":"file","mountID":1,"mountpoint":"\#(mnt)","options":"ro","since":1,"source":"\#(image)","sourceIdentity":"1:1","sourceKind":"local","version":1}"#.utf8)

func floorMount(_ rawMount: () throws -> Void) throws {
    let (src, _) = try Sys.openCanonical(image, O_RDONLY | O_NONBLOCK | O_NOCTTY)
    guard try Sys.fstat(src.rawValue).st_mode & S_IFMT == S_IFREG else { throw Errno.invalidArgument }
    _ = try Superblock(parsing: Sys.preadFully(src.rawValue, count: 3072, at: 1024))
    guard Libraries.blkid(fd: src.rawValue, onlyTypes: ["erofs"]).result == 0 else { throw Errno.invalidArgument }
    Sys.close(src.rawValue)
    guard try Sys.canonical(mnt).stat.st_mode & S_IFMT == S_IFDIR, Sys.hasCapSysAdmin() else { throw Errno.invalidArgument }
    let lock = try Sys.open(floorState + "/lock", O_RDWR | O_CREAT)
    defer { Sys.close(lock.rawValue) }
    try Sys.flock(lock.rawValue, exclusive: true)
    guard try Sys.mountIdentity(mnt).isRoot != true else { throw Errno.resourceBusy }
    try rawMount()
    _ = try Sys.mountIdentity(mnt)
    let tmp = floorRecord + ".tmp.\(Sys.processID)"
    let fd = try Sys.open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_EXCL)
    try floorBytes.withUnsafeBytes { try Sys.pwriteAll(fd.rawValue, $0, at: 0) }
    try Sys.fsync(fd.rawValue)
    Sys.close(fd.rawValue)
    try Sys.rename(tmp, floorRecord)
    Sys.unlock(lock.rawValue)
}

func floorUmount() throws {
    guard try Sys.canonical(mnt).stat.st_mode & S_IFMT == S_IFDIR, Sys.hasCapSysAdmin() else { throw Errno.invalidArgument }
    let lock = try Sys.open(floorState + "/lock", O_RDWR | O_CREAT)
    defer { Sys.close(lock.rawValue) }
    try Sys.flock(lock.rawValue, exclusive: true)
    guard try Sys.readRegularFile(floorRecord).count == floorBytes.count, try Sys.mountIdentity(mnt).isRoot == true else { throw Errno.invalidArgument }
    try MountAPI.umount(mnt)
    try Sys.unlink(floorRecord)
    Sys.unlock(lock.rawValue)
}

/// Times `mount`, leaves the mount in place for `dwell`, times `umount`; returns the sum in ms.
func cycle(_ mount: () throws -> Void, _ umount: () throws -> Void) throws -> Double {
    var t = now()
    try mount()
    var elapsed = now() - t
    let until = now() + dwell
    while now() < until { usleep(100) }
    t = now()
    try umount()
    elapsed += now() - t
    return Double(elapsed) / 1e6
}

/// The bench's state directories (the runtime's and the floor's), on success and on failure.
func removeState() {
    try? FileManager.default.removeItem(atPath: floorState)
    try? FileManager.default.removeItem(atPath: runtime.state.root)
}

func ms(_ v: Double) -> String { formatDecimal(v, digits: 3) + " ms" }

do {
    try Sys.mkdir(floorState, mode: 0o700)
    for (backend, rawMount) in [(Backend.file, rawFileMount), (.loop, rawLoopMount)] {
        let oursMount = { _ = try runtime.mount(MountRequest(source: image, mountpoint: mnt, backend: backend)) }
        let oursUmount = { _ = try runtime.umount(mnt) }
        var base: [Double] = [], floor: [Double] = [], tool: [Double] = []
        for _ in 0..<3 {  // warm up
            _ = try cycle(rawMount, rawUmount)
            _ = try cycle({ try floorMount(rawMount) }, floorUmount)
            _ = try cycle(oursMount, oursUmount)
        }
        for _ in 0..<rounds {
            base.append(try cycle(rawMount, rawUmount))
            floor.append(try cycle({ try floorMount(rawMount) }, floorUmount))
            tool.append(try cycle(oursMount, oursUmount))
        }
        let (b, f, o) = (median(base), median(floor), median(tool))
        print("mount+umount \(backend.rawValue): raw syscalls \(ms(b)); required steps alone \(ms(f)) (\(formatDecimal(f / b, digits: 2))x raw); "
              + "erofs-compat \(ms(o)): ratio \(formatDecimal(o / b, digits: 2)) (target <= 1.3), \(formatDecimal(o / f, digits: 2))x the required steps")
    }
} catch {
    print("bench failed: \(error)")
    try? MountAPI.umount(mnt, detach: true)
    removeState()
    exit(1)
}
removeState()
