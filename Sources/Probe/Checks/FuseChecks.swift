#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Glibc
import Syscall
import SystemPackage

/// FUSE: /dev/fuse, fusermount3, libfuse, and what the kernel offers in its INIT request (passthrough,
/// io_uring), read from a real FUSE mount made inside a private mount namespace of a helper thread.
enum FuseChecks {
    static func run(_ ctx: ProbeContext) -> [Finding] {
        var out: [Finding] = []
        var dev = ModuleState.finding(id: "fuse.module", title: "fuse driver",
                                      ModuleState.gather("fuse", host: ctx.host, release: ctx.release, config: ctx.config,
                                                         configKey: "CONFIG_FUSE_FS", filesystem: "fuse"))
        var devPresent = false
        if ctx.host.isLive, let st = try? Sys.stat("/dev/fuse") {
            let isChar = (st.st_mode & S_IFMT) == S_IFCHR
            devPresent = isChar && Sys.major(st.st_rdev) == 10 && Sys.minor(st.st_rdev) == 229
            dev.evidence.append(.init("stat /dev/fuse", isChar ? "char \(Sys.major(st.st_rdev)):\(Sys.minor(st.st_rdev))" : "not a character device"))
        } else {
            dev.evidence.append(.init("/dev/fuse", ctx.host.exists("/dev/fuse") ? "present" : "absent"))
            devPresent = ctx.host.exists("/dev/fuse")
        }
        out.append(dev)
        out.append(Finding("fuse.device", "/dev/fuse", devPresent ? .present : .absent, evidence: dev.evidence.suffix(1)))

        out.append(fusermount(ctx))
        out.append(unprivilegedDevice(ctx))

        let lib = Libraries.libfuse
        out.append(Finding("fuse.libfuse", "libfuse runtime", .present, value: lib.package,
                           evidence: [.init("fuse_pkgversion()/fuse_version()", "\(lib.package) (API \(lib.api))")]))
        let libVersion = parseVersion(lib.package)

        let initFlags = devPresent ? kernelInit(ctx) : .failure(FuseProbeError.noDevice)
        var kernelEv: Finding.Evidence
        var flags: UInt64?
        switch initFlags {
        case .success(let r):
            flags = r.flags
            kernelEv = .init("FUSE INIT from the kernel (private mount namespace)", "protocol 7.\(r.minor), flags 0x\(String(r.flags, radix: 16))")
        case .failure(let e):
            kernelEv = .init("FUSE INIT from the kernel", "\(e)")
        }
        out.append(combined("fuse.passthrough", "FUSE passthrough (kernel FUSE_PASSTHROUGH + libfuse ≥ 3.17)", kernel: flags.map { $0 & FuseWire.passthrough != 0 },
                            kernelEv: kernelEv, libOK: libVersion >= [3, 17], lib: lib.package, config: ctx.configEvidence("CONFIG_FUSE_PASSTHROUGH")))
        // erofs-compat speaks the protocol itself: for its own servers only the kernel's offer counts.
        let offered = flags.map { $0 & FuseWire.passthrough != 0 }
        out.append(Finding("fuse.kernel_passthrough", "FUSE passthrough in the kernel (FUSE_PASSTHROUGH offered in INIT)",
                           offered.map { $0 ? .present : .absent } ?? .unknown,
                           value: offered.map { $0 ? "offered" : "not offered" } ?? "unknown", evidence: [kernelEv]))
        var uringEv = [ctx.configEvidence("CONFIG_FUSE_IO_URING")].compactMap { $0 }
        if let p = ctx.host.read("/sys/module/fuse/parameters/enable_uring") {
            uringEv.append(.init("/sys/module/fuse/parameters/enable_uring", p.trimmed))
        }
        var uring = combined("fuse.io_uring", "FUSE over io_uring (kernel FUSE_OVER_IO_URING + libfuse ≥ 3.18)", kernel: flags.map { $0 & FuseWire.overIoUring != 0 },
                             kernelEv: kernelEv, libOK: libVersion >= [3, 18], lib: lib.package, config: nil)
        uring.evidence += uringEv
        out.append(uring)

        let helper = ["/usr/bin/fuservicemount3", "/bin/fuservicemount3", "/usr/sbin/fuservicemount3"].first { ctx.host.exists($0) }
        let runDir = ctx.host.isDirectory("/run/filesystems")
        let serviceOK = libVersion >= [3, 19] && helper != nil
        out.append(Finding("fuse.service_mode", "libfuse service mode (libfuse ≥ 3.19 + fuservicemount3)", serviceOK ? .present : .absent,
                           evidence: [.init("libfuse", "\(lib.package)" + (libVersion >= [3, 19] ? "" : " (< 3.19: no fuse_service_accept)")),
                                      .init("fuservicemount3", helper ?? "not found"),
                                      .init("/run/filesystems", runDir ? "present" : "absent (created by socket units)")]))
        return out
    }

    /// What the mount planner needs: the device and the unprivileged helper.
    static func planning(_ ctx: ProbeContext) -> [Finding] {
        let dev = ctx.host.exists("/dev/fuse")
        return [Finding("fuse.device", "/dev/fuse", dev ? .present : .absent, evidence: [.init("/dev/fuse", dev ? "present" : "absent")]),
                fusermount(ctx), unprivilegedDevice(ctx)]
    }

    /// fusermount3 opens /dev/fuse with the caller's credentials: unprivileged mounts need it
    /// readable and writable by others (Debian's udev rule makes it 0666).
    static func unprivilegedDevice(_ ctx: ProbeContext) -> Finding {
        let title = "/dev/fuse open to unprivileged users"
        guard let st = try? Sys.stat(ctx.host.path("/dev/fuse")) else {
            return Finding("fuse.device_unprivileged", title, .absent, evidence: [.init("stat /dev/fuse", "absent")])
        }
        let mode = String(st.st_mode & 0o777, radix: 8)
        let open = st.st_mode & 0o006 == 0o006
        return Finding("fuse.device_unprivileged", title, open ? .present : .absent, value: "mode \(mode)",
                       evidence: [.init("stat /dev/fuse", "mode \(mode)" + (open ? "" : " (others cannot open it; Debian's udev sets 0666)"))])
    }

    /// fusermount3 is only useful to unprivileged callers when it is setuid root.
    static func fusermount(_ ctx: ProbeContext) -> Finding {
        let title = "fusermount3 (setuid root, for unprivileged mounts)"
        guard let path = ["/usr/bin/fusermount3", "/bin/fusermount3", "/usr/local/bin/fusermount3"].first(where: { ctx.host.exists($0) }),
              let st = try? Sys.stat(ctx.host.path(path)) else {
            return Finding("fuse.fusermount3", title, .absent, evidence: [.init("PATH", "fusermount3 not found (Debian: fuse3)")])
        }
        let setuid = st.st_mode & S_ISUID != 0 && st.st_uid == 0
        return Finding("fuse.fusermount3", title, setuid ? .present : .absent, value: path,
                       evidence: [.init("stat \(path)", setuid ? "setuid root" : "present but not setuid root")])
    }

    static func combined(_ id: String, _ title: String, kernel: Bool?, kernelEv: Finding.Evidence, libOK: Bool, lib: String, config: Finding.Evidence?) -> Finding {
        let status: Finding.Status = kernel == nil ? (libOK ? .unknown : .absent) : (kernel! && libOK ? .present : .absent)
        let value = "kernel: " + (kernel.map { $0 ? "yes" : "no" } ?? "unknown") + ", libfuse \(lib): " + (libOK ? "yes" : "no")
        return Finding(id, title, status, value: value, evidence: [kernelEv, .init("libfuse version", lib)] + [config].compactMap { $0 })
    }

    enum FuseProbeError: Error, CustomStringConvertible {
        case noDevice, noPrivilege, timeout, short(Int)
        var description: String {
            switch self {
            case .noDevice: return "not attempted: no /dev/fuse"
            case .noPrivilege: return "not attempted: needs CAP_SYS_ADMIN to mount in a private namespace"
            case .timeout: return "no INIT request within 1 s"
            case .short(let n): return "INIT request too short (\(n) bytes)"
            }
        }
    }

    /// Mounts a FUSE filesystem in a private mount namespace of a helper thread and reads the kernel's
    /// INIT request; the mount dies with the thread's namespace and the closed device.
    static func kernelInit(_ ctx: ProbeContext) -> Result<(minor: UInt32, flags: UInt64), Error> {
        guard ctx.host.isLive, ctx.privileged else { return .failure(FuseProbeError.noPrivilege) }
        let box = Locked<Result<(minor: UInt32, flags: UInt64), Error>>(.failure(FuseProbeError.timeout))
        let done = DispatchSemaphore(value: 0)
        let target = ctx.trialDir
        Threads.detach {
            defer { done.signal() }
            box.set(Result {
                try Sys.unshareMountNamespace()
                let dev = try Sys.open("/dev/fuse", O_RDWR)
                defer { Sys.close(dev.rawValue) }
                try MountAPI.mount(source: "erofs-compat-probe", target: target, type: "fuse",
                                   flags: MountAPI.Attributes([.readOnly, .noSuid, .noDev]).msFlags,
                                   data: "fd=\(dev.rawValue),rootmode=40000,user_id=0,group_id=0")
                defer { try? MountAPI.umount(target, detach: true) }
                guard try Sys.poll(dev.rawValue, timeoutMs: 1000) else { throw FuseProbeError.timeout }
                var buf = [UInt8](repeating: 0, count: 1 << 17)
                let n = try buf.withUnsafeMutableBytes { try Sys.read(dev.rawValue, into: $0) }
                return try FuseInit.parse(Array(buf[0..<n]))
            })
        }
        _ = done.wait(timeout: .now() + 3)
        return box.get()
    }

    static func parseVersion(_ s: String) -> [Int] { s.split(separator: ".").compactMap { Int($0) } }
}

/// Parses the kernel's FUSE_INIT request (fuse_in_header + fuse_init_in).
enum FuseInit {
    static func parse(_ b: [UInt8]) throws -> (minor: UInt32, flags: UInt64) {
        guard b.count >= 56 else { throw FuseChecks.FuseProbeError.short(b.count) }
        func u32(_ o: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 | UInt32(b[o + $1]) << (8 * $1) } }
        guard u32(4) == FuseWire.initOpcode else { throw FuseChecks.FuseProbeError.short(b.count) }
        let minor = u32(44)
        var flags = UInt64(u32(52))
        if flags & FuseWire.initExt != 0, b.count >= 60 { flags |= UInt64(u32(56)) << 32 }
        return (minor, flags)
    }
}

extension Array where Element == Int {
    static func >= (a: [Int], b: [Int]) -> Bool { a.lexicographicallyPrecedes(b) == false }
}
