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
import Runtime
import Syscall

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

/// Raw file-backed: fsopen + fsconfig(source, ro) + CREATE + fsmount + move_mount, then umount2.
func rawFile() throws {
    let fc = try MountAPI.fsopen("erofs")
    try MountAPI.setString(fc, "source", image)
    try MountAPI.setFlag(fc, "ro")
    try MountAPI.create(fc)
    try MountAPI.attach(fc, attributes: [.readOnly], at: mnt)
    try MountAPI.umount(mnt)
}

/// Raw loop: GET_FREE + LOOP_CONFIGURE + mount of the device, then umount2 (autoclear).
func rawLoop() throws {
    let backing = try Sys.open(image, O_RDONLY)
    defer { Sys.close(backing.rawValue) }
    let n = try Loop.getFree()
    let dev = try Sys.open("/dev/loop\(n)", O_RDONLY)
    try Loop.configure(device: dev.rawValue, backing: backing.rawValue, flags: [.readOnly, .autoClear, .directIO], blockSize: 4096)
    let fc = try MountAPI.fsopen("erofs")
    try MountAPI.setString(fc, "source", "/dev/loop\(n)")
    try MountAPI.setFlag(fc, "ro")
    try MountAPI.create(fc)
    try MountAPI.attach(fc, attributes: [.readOnly], at: mnt)
    Sys.close(dev.rawValue)
    try MountAPI.umount(mnt)
}

func ours(_ backend: Backend) throws {
    _ = try runtime.mount(MountRequest(source: image, mountpoint: mnt, backend: backend))
    try runtime.umount(mnt)
}

do {
    for (backend, raw) in [(Backend.file, rawFile), (.loop, rawLoop)] {
        var base: [Double] = [], tool: [Double] = []
        for _ in 0..<3 { try raw(); try ours(backend) }  // warm up
        for _ in 0..<rounds {
            var t = now(); try raw(); base.append(Double(now() - t) / 1e6)
            t = now(); try ours(backend); tool.append(Double(now() - t) / 1e6)
        }
        let (b, o) = (median(base), median(tool))
        print("mount+umount \(backend.rawValue): erofs-compat \(formatDecimal(o, digits: 2)) ms, raw syscalls \(formatDecimal(b, digits: 2)) ms, ratio \(formatDecimal(o / b, digits: 2)) (target <= 1.3)")
    }
} catch {
    print("bench failed: \(error)")
    try? MountAPI.umount(mnt, detach: true)
    exit(1)
}
try? FileManager.default.removeItem(atPath: runtime.state.root)
