#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import EROFS
import Syscall

/// The planner as `mount` uses it: the findings the decision needs (no FUSE or fanotify round trips
/// for a local image), the image's own checks, and the planner's judgement.
public enum MountPlanning {
    /// What the planner decided and the findings it decided on (including `image.*`).
    public struct Result: Sendable {
        public var plan: Plan
        public var findings: Findings
        /// True when the host findings came from the cache.
        public var cached: Bool
        /// The image's superblock (nil when it has none).
        public var superblock: Superblock?
    }

    /// Host findings already decoded in this process, by cache key (a runtime mounting many images
    /// decodes them once).
    private static let memo = Locked<[String: (findings: Findings, kernelFeatures: Set<String>?)]>([:])

    /// Forgets the in-process memo (tests of the cache file).
    static func forgetMemo() { memo.withLock { $0 = [:] } }

    /// Plans a mount of the local `image` (its EROFS superblock starting `offset` bytes in).
    /// `override` replaces findings before planning (used to simulate hosts that lack a feature).
    /// `cacheFile` keeps host findings between mounts; they are reused only while the boot, the
    /// kernel, the loaded modules, the privileges and the image's filesystem type are unchanged.
    /// A caller that has the image open already passes `imageFD` (read, never closed here) and what
    /// it knows of its privileges.
    public static func planLocal(image: String, imageFD: Int32? = nil, privileged: Bool? = nil, offset: UInt64, implemented: Set<Backend>,
                                 override: [Finding] = [], cacheFile: String? = nil) -> Result {
        // Trials run on the image's own filesystem: that is where file-backed mounts must work.
        let fsType = imageFD.flatMap { try? Sys.fstatfs($0) }.map { UInt64(bitPattern: Int64($0.f_type)) }
        let ctx = ProbeContext(options: ProbeOptions(cacheDir: image.parentPath, image: image), lightweight: true,
                               privileged: privileged, trialFilesystem: fsType)
        let host = hostFindings(ctx, kind: "local", cacheFile: cacheFile) {
            SystemChecks.kernel(ctx) + EROFSChecks.planning(ctx) + BlockChecks.planning(ctx) + FuseChecks.planning(ctx)
        }
        var findings = host.findings
        let (cached, kernelFeatures) = (host.cached, host.kernelFeatures)
        let image = ImageChecks.inspect(ctx, image: image, fd: imageFD, offset: offset, kernelFeatures: kernelFeatures, trial: false)
        image.findings.forEach { findings.add($0) }
        override.forEach { findings.add($0) }
        return Result(plan: Planner.plan(findings, source: .local, implemented: implemented), findings: findings, cached: cached,
                      superblock: image.superblock)
    }

    /// The host's findings for one kind of plan: from this process's memo, else from `cacheFile`
    /// when its key still matches (same boot, kernel, modules, privileges, trial filesystem type),
    /// else gathered by `gather` (and stored). Without `cacheFile` they are always gathered.
    static func hostFindings(_ ctx: ProbeContext, kind: String, cacheFile: String?, gather: () -> [Finding])
        -> (findings: Findings, kernelFeatures: Set<String>?, cached: Bool) {
        let key = kind + " " + cacheKey(ctx)
        if cacheFile != nil, let hit = memo.withLock({ $0[key] }) { return (hit.findings, hit.kernelFeatures, true) }
        var findings = Findings()
        var cached = false
        let entries = cacheFile.map(readEntries) ?? []
        if let entry = entries.first(where: { $0.key == key }) {
            findings = entry.findings
            cached = true
        } else {
            gather().forEach { findings.add($0) }
            if let cacheFile { store(CacheEntry(key: key, findings: findings), at: cacheFile, replacingIn: entries) }
        }
        let kernelFeatures = ImageChecks.kernelFeatures(ctx)
        if cacheFile != nil { memo.withLock { [findings] in $0[key] = (findings, kernelFeatures) } }
        return (findings, kernelFeatures, cached)
    }

    struct CacheEntry: Codable {
        var key: String
        var findings: Findings
    }

    /// Everything that can change what the host supports without the cache noticing otherwise.
    static func cacheKey(_ ctx: ProbeContext) -> String {
        let boot = ctx.host.isLive ? liveBootID : (ctx.host.read("/proc/sys/kernel/random/boot_id")?.trimmed ?? "?")
        let modules = ctx.host.read("/proc/modules") ?? ""
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in modules.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        let fs = ctx.trialFSType
        return "v1 \(boot) \(ctx.release) modules:\(String(h, radix: 16)) admin:\(ctx.privileged) fs:\(fs)"
    }

    /// The boot cannot change under a running process.
    static let liveBootID = Host().read("/proc/sys/kernel/random/boot_id")?.trimmed ?? "?"

    /// The cache file's entries (none when it is missing or damaged).
    static func readEntries(_ path: String) -> [CacheEntry] {
        (try? Sys.readFile(path)).flatMap { try? JSONDecoder().decode([CacheEntry].self, from: Data($0)) } ?? []
    }

    /// Keeps one entry per kind of plan (local, remote) in the file; `entries`: its content when the
    /// caller has just read it.
    static func store(_ entry: CacheEntry, at path: String, replacingIn entries: [CacheEntry]? = nil) {
        let kind = entry.key.prefix(while: { $0 != " " })
        var entries = entries ?? readEntries(path)
        entries.removeAll { $0.key.prefix(while: { $0 != " " }) == kind }
        entries.append(entry)
        guard let data = try? JSONEncoder().encode(entries) else { return }
        try? Sys.writeFileAtomically(path, [UInt8](data))
    }
}
