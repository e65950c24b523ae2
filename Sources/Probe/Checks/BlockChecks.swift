#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Syscall
import SystemPackage

/// Loop and NBD block devices.
enum BlockChecks {
    static func run(_ ctx: ProbeContext) -> [Finding] {
        var out: [Finding] = []
        let loopModule = ModuleState.gather("loop", host: ctx.host, release: ctx.release, config: ctx.config,
                                            configKey: "CONFIG_BLK_DEV_LOOP", filesystem: nil)
        var loop = ModuleState.finding(id: "loop.module", title: "loop driver", loopModule)
        let control = ctx.host.exists(Loop.controlPath)
        loop.evidence.append(.init(Loop.controlPath, control ? "present" : "absent"))
        out.append(loop)
        out.append(loopConfigure(ctx, control: control))

        let nbdModule = ModuleState.gather("nbd", host: ctx.host, release: ctx.release, config: ctx.config,
                                           configKey: "CONFIG_BLK_DEV_NBD", filesystem: nil)
        var nbd = ModuleState.finding(id: "nbd.module", title: "nbd driver", nbdModule)
        let devs = ctx.host.list("/sys/block").filter { $0.hasPrefix("nbd") }
        nbd.evidence.append(.init("/sys/block", devs.isEmpty ? "no nbd devices" : "\(devs.count) nbd devices"))
        let blockMajors = ctx.host.read("/proc/devices").map { ProcDevices.parse($0).block } ?? [:]
        nbd.evidence.append(.init("/proc/devices", blockMajors["nbd"].map { "nbd major \($0)" } ?? "no nbd major"))
        if nbd.status == .unknown, !devs.isEmpty { nbd.status = .present }
        out.append(nbd)
        out.append(nbdNetlink(ctx, module: nbd))
        return out
    }

    /// What the mount planner needs: loop, and whether an nbd driver exists at all.
    static func planning(_ ctx: ProbeContext) -> [Finding] {
        let loop = ModuleState.finding(id: "loop.module", title: "loop driver",
                                       ModuleState.gather("loop", host: ctx.host, release: ctx.release, config: nil,
                                                          configKey: "CONFIG_BLK_DEV_LOOP", filesystem: nil))
        let nbd = ModuleState.finding(id: "nbd.module", title: "nbd driver",
                                      ModuleState.gather("nbd", host: ctx.host, release: ctx.release, config: nil,
                                                         configKey: "CONFIG_BLK_DEV_NBD", filesystem: nil))
        return [loop, loopConfigure(ctx, control: ctx.host.exists(Loop.controlPath)), nbd]
    }

    /// LOOP_CONFIGURE (5.8) on an unbound existing device with fd -1: EBADF proves the ioctl exists,
    /// EINVAL says it does not; nothing is bound either way.
    static func loopConfigure(_ ctx: ProbeContext, control: Bool) -> Finding {
        let id = "loop.configure", title = "LOOP_CONFIGURE"
        guard ctx.host.isLive else { return Finding(id, title, .unknown, evidence: [.init("trial", "not the live host")]) }
        guard control else { return Finding(id, title, .absent, evidence: [.init(Loop.controlPath, "absent")]) }
        guard ctx.privileged else { return ctx.unknownWithoutPrivilege(id, title, "open /dev/loopN") }
        let free = ctx.host.list("/sys/block").filter {
            $0.hasPrefix("loop") && !ctx.host.exists("/sys/block/\($0)/loop/backing_file")
        }
        guard let dev = free.first else {
            return Finding(id, title, .unknown, evidence: [.init("/sys/block", "no unbound loop device to try without allocating one")])
        }
        do {
            let fd = try Sys.open("/dev/\(dev)", O_RDWR)
            defer { Sys.close(fd.rawValue) }
            do {
                try Loop.configure(device: fd.rawValue, backing: -1, flags: [.readOnly])
                return Finding(id, title, .unknown, evidence: [.init("ioctl(/dev/\(dev), LOOP_CONFIGURE, fd=-1)", "unexpectedly succeeded")])
            } catch let e as Errno where e == .badFileDescriptor {
                return Finding(id, title, .present, evidence: [.init("ioctl(/dev/\(dev), LOOP_CONFIGURE, fd=-1)", "EBADF: the ioctl exists (nothing bound)")])
            } catch let e as Errno where e == .invalidArgument || e == .inappropriateIOCTLForDevice {
                return Finding(id, title, .absent, evidence: [.init("ioctl(/dev/\(dev), LOOP_CONFIGURE)", "\(errnoName(e)): needs Linux 5.8")])
            }
        } catch {
            return Finding(id, title, .unknown, evidence: [.init("open /dev/\(dev)", "\(error)")])
        }
    }

    /// CTRL_CMD_GETFAMILY "nbd" over generic netlink.
    static func nbdNetlink(_ ctx: ProbeContext, module: Finding) -> Finding {
        let id = "nbd.netlink", title = "nbd netlink setup (genetlink family \"nbd\")"
        guard ctx.host.isLive else { return Finding(id, title, .unknown, evidence: [.init("trial", "not the live host")]) }
        if module.value == ModuleState.loadable.rawValue, !ctx.options.allowModuleLoad {
            return Finding(id, title, .unknown, evidence: [.init("CTRL_CMD_GETFAMILY nbd", "not attempted: the lookup would autoload the nbd module; pass --allow-module-load")])
        }
        let note = Finding.Evidence("note", "the kernel may autoload the nbd module for this lookup on hosts with modules")
        switch Result(catching: { try GenericNetlink.familyID("nbd") }) {
        case .success(.success(let fid)):
            return Finding(id, title, .present, value: "family id \(fid)", evidence: [.init("CTRL_CMD_GETFAMILY nbd", "family id \(fid)"), note])
        case .success(.failure(let e)) where e == .noSuchFileOrDirectory:
            var ev: [Finding.Evidence] = [.init("CTRL_CMD_GETFAMILY nbd", "ENOENT: no nbd family registered"), note]
            if module.status == .present {
                // Older kernels (6.1) register the family in the initial network namespace only.
                ev.append(.init("nbd driver", "present: this network namespace cannot see the family; "
                                + "mounts set devices up through their ioctls (no reconnection after a server crash)"))
            }
            return Finding(id, title, .absent, evidence: ev)
        case .success(.failure(let e)):
            return Finding(id, title, .unknown, evidence: [.init("CTRL_CMD_GETFAMILY nbd", errnoName(e))])
        case .failure(let e):
            return Finding(id, title, .unknown, evidence: [.init("netlink socket", "\(e)")])
        }
    }
}
