#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import EROFS
import Syscall
import SystemPackage

/// EROFS: registration, module state, file-backed mounts (side-effect-free superblock trial), on-disk
/// features, compression algorithms and fscache on-demand.
enum EROFSChecks {
    static func run(_ ctx: ProbeContext) -> [Finding] {
        var out: [Finding] = []
        let registered = ctx.filesystems.contains("erofs")
        out.append(Finding("erofs.registered", "erofs in /proc/filesystems", registered ? .present : .absent,
                           evidence: [.init("/proc/filesystems", registered ? "erofs listed" : "erofs not listed")]))
        let module = ModuleState.finding(id: "erofs.module", title: "erofs driver",
                                         ModuleState.gather("erofs", host: ctx.host, release: ctx.release, config: ctx.config,
                                                            configKey: "CONFIG_EROFS_FS", filesystem: "erofs"))
        out.append(module)
        out.append(fileBacked(ctx, module: module))

        let features = ctx.host.list("/sys/fs/erofs/features")
        out.append(Finding("erofs.features", "on-disk features the driver understands", features.isEmpty ? (registered ? .unknown : .absent) : .present,
                           value: features.joined(separator: " "),
                           evidence: [.init("/sys/fs/erofs/features", features.isEmpty ? "absent" : "\(features.count) entries")]))

        if let config = ctx.config {
            var algs: [String] = []
            let keys = [("CONFIG_EROFS_FS_ZIP", "lz4"), ("CONFIG_EROFS_FS_ZIP_LZMA", "lzma"),
                        ("CONFIG_EROFS_FS_ZIP_DEFLATE", "deflate"), ("CONFIG_EROFS_FS_ZIP_ZSTD", "zstd")]
            for (k, name) in keys where config.enabled(k) { algs.append(name) }
            out.append(Finding("erofs.compression", "compression algorithms", algs.isEmpty ? .absent : .present,
                               value: algs.joined(separator: " "),
                               evidence: keys.map { .init(config.source, "\($0.0)=\(config.value($0.0))") }))
        } else {
            out.append(Finding("erofs.compression", "compression algorithms", .unknown,
                               evidence: [.init("kernel config", "neither /proc/config.gz nor /boot/config-\(ctx.release) is readable")]))
        }

        // fscache on-demand: config + /dev/cachefiles (stat only; it is single-open).
        let cachefiles = ctx.host.exists("/dev/cachefiles")
        let ondemand = ctx.config?.value("CONFIG_EROFS_FS_ONDEMAND")
        let status: Finding.Status = ondemand == nil ? (cachefiles ? .unknown : .absent) : (ctx.config!.enabled("CONFIG_EROFS_FS_ONDEMAND") && cachefiles ? .present : .absent)
        out.append(Finding("erofs.fscache_ondemand", "fscache on-demand mode", status,
                           evidence: [ctx.configEvidence("CONFIG_EROFS_FS_ONDEMAND"),
                                      .init("stat /dev/cachefiles", cachefiles ? "exists (not opened: single-open device)" : "absent")].compactMap { $0 }))
        return out
    }

    /// What the mount planner needs: the driver and file-backed mounts.
    static func planning(_ ctx: ProbeContext) -> [Finding] {
        let module = ModuleState.finding(id: "erofs.module", title: "erofs driver",
                                         ModuleState.gather("erofs", host: ctx.host, release: ctx.release, config: nil,
                                                            configKey: "CONFIG_EROFS_FS", filesystem: "erofs"))
        return [module, fileBacked(ctx, module: module)]
    }

    /// fsopen("erofs") + fsconfig(source=tiny image) + FSCONFIG_CMD_CREATE builds a superblock without
    /// attaching it anywhere; closing the context leaves nothing.
    static func fileBacked(_ ctx: ProbeContext, module: Finding) -> Finding {
        let id = "erofs.file_backed", title = "file-backed mounts (no loop device)"
        var ev = [ctx.configEvidence("CONFIG_EROFS_FS_BACKED_BY_FILE")].compactMap { $0 }
        if module.value == ModuleState.loadable.rawValue, !ctx.filesystems.contains("erofs"), !ctx.options.allowModuleLoad {
            return Finding(id, title, .unknown, evidence: ev + [.init("fsopen(\"erofs\")", "not attempted: it would autoload the erofs module; pass --allow-module-load")])
        }
        guard ctx.host.isLive else { return Finding(id, title, .unknown, evidence: ev + [.init("trial", "not the live host")]) }
        if !ctx.filesystems.contains("erofs") {
            ev.append(.init("note", "fsopen(\"erofs\") can autoload the erofs module on hosts with modules"))
        }
        guard ctx.privileged else { return ctx.unknownWithoutPrivilege(id, title, "fsconfig(FSCONFIG_CMD_CREATE)") }
        let result = trialCreate(in: ctx.trialDir, image: TinyImage.bytes())
        let place = "a 4 KiB image on \(ctx.trialFSType) (\(ctx.trialDir))"
        switch result {
        case .success:
            return Finding(id, title, .present, evidence: ev + [.init("fsopen+fsconfig(source)+FSCONFIG_CMD_CREATE", "ok with \(place); nothing attached")])
        case .failure(let e as Errno) where e == .notBlockDevice:
            // tmpfs files cannot back EROFS (no read_folio) even where the kernel can; ramfs files can.
            if ctx.trialFSType == "tmpfs" {
                return Finding(id, title, .unknown, evidence: ev + [.init("FSCONFIG_CMD_CREATE", "ENOTBLK, but the image sat on \(ctx.trialFSType), which EROFS cannot back from; retry with --cache-dir on ext4/xfs/btrfs")])
            }
            return Finding(id, title, .absent, evidence: ev + [.init("FSCONFIG_CMD_CREATE", "ENOTBLK with \(place): kernel lacks CONFIG_EROFS_FS_BACKED_BY_FILE (Linux 6.12+)")])
        case .failure(let e as Errno) where e == .operationNotSupportedByDevice:
            return Finding(id, title, .absent, evidence: ev + [.init("fsopen(\"erofs\")", "ENODEV: erofs is not available")])
        case .failure(let e as Errno) where e == .notPermitted:
            return ctx.unknownWithoutPrivilege(id, title, "fsopen: EPERM")
        case .failure(let e):
            return Finding(id, title, .unknown, evidence: ev + [.init("trial", "\(e)")])
        }
    }

    /// Writes `image` to a temporary file in `dir` and builds (never attaches) an EROFS superblock from it.
    static func trialCreate(in dir: String, image: [UInt8]) -> Result<Void, Error> {
        Result {
            let file = try Sys.openTemporary(in: dir)
            defer { Sys.close(file.rawValue) }
            try image.withUnsafeBytes { try Sys.pwriteAll(file.rawValue, $0, at: 0) }
            try trialCreate(source: "/proc/self/fd/\(file.rawValue)")
        }
    }

    static func trialCreate(source: String) throws {
        let fc = try MountAPI.fsopen("erofs")
        try MountAPI.setString(fc, "source", source)
        try MountAPI.create(fc)
    }
}
