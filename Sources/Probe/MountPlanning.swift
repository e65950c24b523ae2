import Syscall

/// The planner as `mount` uses it: gathers only the findings the decision needs (cheap checks, no
/// FUSE or fanotify round trips for a local image) and judges the backends.
public enum MountPlanning {
    /// What the planner decided and the findings it decided on (including `image.*`).
    public struct Result: Sendable {
        public var plan: Plan
        public var findings: Findings
    }

    /// Plans a mount of the local `image` (its EROFS superblock starting `offset` bytes in).
    /// `override` replaces findings before planning (used to simulate hosts that lack a feature).
    public static func planLocal(image: String, offset: UInt64, implemented: Set<Backend>,
                                 override: [Finding] = []) -> Result {
        // Trials run on the image's own filesystem: that is where file-backed mounts must work.
        let ctx = ProbeContext(options: ProbeOptions(cacheDir: image.parentPath, image: image), lightweight: true)
        var findings = Findings()
        SystemChecks.kernel(ctx).forEach { findings.add($0) }
        EROFSChecks.planning(ctx).forEach { findings.add($0) }
        BlockChecks.planning(ctx).forEach { findings.add($0) }
        FuseChecks.planning(ctx).forEach { findings.add($0) }
        let kernelFeatures = Set(ctx.host.list("/sys/fs/erofs/features"))
        ImageChecks.run(ctx, image: image, offset: offset, kernelFeatures: kernelFeatures, trial: false).forEach { findings.add($0) }
        override.forEach { findings.add($0) }
        return Result(plan: Planner.plan(findings, source: .local, implemented: implemented), findings: findings)
    }
}
