import Glibc
import Syscall
import SystemPackage

/// fs-verity on the cache directory's filesystem: whether a complete cache file can be handed to
/// the kernel, which then checks every page read from disk against the tree and refuses writes.
enum VerityChecks {
    static func run(_ ctx: ProbeContext) -> [Finding] { [cacheFilesystem(ctx)] }

    static let id = "fsverity.cache_fs"
    static let title = "fs-verity on the cache filesystem (complete cache files checked by the kernel)"

    /// FS_IOC_ENABLE_VERITY on an unnamed 4 KiB file in the cache directory (reopened read-only, its
    /// writable descriptor closed: fs-verity refuses files open for writing); the file goes with
    /// its last descriptor, so nothing is left behind.
    static func cacheFilesystem(_ ctx: ProbeContext) -> Finding {
        let place = "\(ctx.trialFSType) (\(ctx.trialDir))"
        var ev: [Finding.Evidence] = []
        if ctx.trialFSType == "ext4" {
            let has = ctx.host.exists("/sys/fs/ext4/features/verity")
            ev.append(.init("/sys/fs/ext4/features/verity",
                            has ? "present: this kernel's ext4 has fs-verity" : "absent: this kernel's ext4 has no fs-verity"))
        }
        guard ctx.host.isLive else { return Finding(id, title, .unknown, evidence: ev + [.init("trial", "not the live host")]) }
        let source = "FS_IOC_ENABLE_VERITY on a temporary file in \(ctx.trialDir)"
        switch Result(catching: { try trial(in: ctx) }) {
        case .success(let digest):
            return Finding(id, title, .present, value: place, evidence: ev + [.init(source, "ok; measured \(digest)")])
        case .failure(let e as Errno) where e == .notSupported || e == .inappropriateIOCTLForDevice:
            let why = ctx.trialFSType != "ext4" ? ""
                : " (ext4 needs the verity feature, tune2fs -O verity, 4 KiB blocks and a kernel with CONFIG_FS_VERITY)"
            return Finding(id, title, .absent, value: place, evidence: ev + [.init(source, errnoName(e) + why)])
        case .failure(let e as Errno):
            return Finding(id, title, .unknown, evidence: ev + [.init(source, errnoName(e))])
        case .failure(let e):
            return Finding(id, title, .unknown, evidence: ev + [.init("trial", "\(e)")])
        }
    }

    static func trial(in ctx: ProbeContext) throws -> String {
        let rw = try ctx.temporaryFile()
        let ro: FileDescriptor
        do {
            let block = [UInt8](repeating: 0x5a, count: 4096)
            _ = try block.withUnsafeBytes { try Sys.pwrite(rw.rawValue, $0, at: 0) }
            ro = try Sys.reopen(rw, O_RDONLY)
        } catch {
            Sys.close(rw.rawValue)
            throw error
        }
        Sys.close(rw.rawValue)
        defer { Sys.close(ro.rawValue) }
        try Sys.enableVerity(ro.rawValue)
        return "sha256:" + (try Sys.measureVerity(ro.rawValue)).map { String(hexByte: $0) }.joined()
    }
}
