#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Syscall

/// Kernel release, privileges, systemd and PSI.
enum SystemChecks {
    static func kernel(_ ctx: ProbeContext) -> [Finding] {
        var out = [Finding("kernel.release", "kernel release", .present, value: ctx.release,
                           evidence: [.init(ctx.host.isLive ? "uname(2)" : "/proc/sys/kernel/osrelease", ctx.release)])]
        out.append(Finding("kernel.config", "kernel config readable", ctx.config == nil ? .absent : .present,
                           value: ctx.config?.source,
                           evidence: [.init("/proc/config.gz, /boot/config-\(ctx.release)", ctx.config == nil ? "neither readable: config-based findings are unknown" : "read \(ctx.config!.values.count) options")]))
        let caps = ctx.host.read("/proc/self/status").flatMap(ProcStatus.effectiveCapabilities)
        out.append(Finding("privileges.cap_sys_admin", "CAP_SYS_ADMIN", caps == nil ? .unknown : (ctx.privileged ? .present : .absent),
                           evidence: [.init("/proc/self/status CapEff", caps.map { "0x" + String($0, radix: 16) } ?? "unreadable")]))
        if let map = ctx.host.read("/proc/self/uid_map") {
            let initial = UIDMap.isInitialNamespace(map)
            out.append(Finding("privileges.user_namespace", "running in a user namespace", initial ? .absent : .present,
                               evidence: [.init("/proc/self/uid_map", map.split(separator: "\n").map { $0.split(separator: " ").joined(separator: " ") }.joined(separator: "; "))]))
        } else {
            out.append(Finding("privileges.user_namespace", "running in a user namespace", .unknown, evidence: [.init("/proc/self/uid_map", "unreadable")]))
        }
        return out
    }

    static func system(_ ctx: ProbeContext) -> [Finding] {
        var out: [Finding] = []
        let pid1 = ctx.host.read("/proc/1/comm")?.trimmed
        out.append(Finding("systemd.pid1", "systemd is PID 1", pid1 == nil ? .unknown : (pid1 == "systemd" ? .present : .absent),
                           value: pid1, evidence: [.init("/proc/1/comm", pid1 ?? "unreadable")]))
        // The version is in the shared library's file name; no process is spawned.
        var version: String?
        var where_ = "no libsystemd-shared-*.so found"
        for dir in ["/usr/lib/x86_64-linux-gnu/systemd", "/usr/lib/aarch64-linux-gnu/systemd", "/usr/lib/systemd", "/lib/systemd", "/usr/lib64/systemd"] {
            if let f = ctx.host.list(dir).first(where: { $0.hasPrefix("libsystemd-shared-") && $0.hasSuffix(".so") }) {
                version = String(f.dropFirst("libsystemd-shared-".count).dropLast(3))
                where_ = dir + "/" + f
                break
            }
        }
        out.append(Finding("systemd.version", "systemd installed", version == nil ? .absent : .present, value: version,
                           evidence: [.init("systemd shared library", where_)]))
        if let psi = ctx.host.read("/proc/pressure/memory") {
            out.append(Finding("psi.memory", "memory pressure (PSI)", .present, value: psi.split(separator: "\n").first.map(String.init),
                               evidence: [.init("/proc/pressure/memory", "readable")]))
        } else {
            out.append(Finding("psi.memory", "memory pressure (PSI)", .absent,
                               evidence: [.init("/proc/pressure/memory", "unreadable (CONFIG_PSI off or psi=0)")]))
        }
        return out
    }
}
