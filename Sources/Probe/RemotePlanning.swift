extension MountPlanning {
    /// Plans a mount of a remote image whose cache lives in `cacheDir` (pre-content marks are tried
    /// on that filesystem).
    public static func planRemote(cacheDir: String, implemented: Set<Backend>, override: [Finding] = []) -> Result {
        let ctx = ProbeContext(options: ProbeOptions(cacheDir: cacheDir), lightweight: true)
        var findings = Findings()
        SystemChecks.kernel(ctx).forEach { findings.add($0) }
        FanotifyChecks.run(ctx).forEach { findings.add($0) }
        EROFSChecks.planning(ctx).forEach { findings.add($0) }
        BlockChecks.planning(ctx).forEach { findings.add($0) }
        FuseChecks.planning(ctx).forEach { findings.add($0) }
        override.forEach { findings.add($0) }
        return Result(plan: Planner.plan(findings, source: .remote, implemented: implemented), findings: findings, cached: false)
    }
}
