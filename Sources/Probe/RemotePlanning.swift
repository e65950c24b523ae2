extension MountPlanning {
    /// Plans a mount of a remote image whose cache lives in `cacheDir` (pre-content marks are tried
    /// on that filesystem). `cacheFile` keeps the host findings between mounts, as for local images.
    public static func planRemote(cacheDir: String, implemented: Set<Backend>, override: [Finding] = [],
                                  cacheFile: String? = nil) -> Result {
        let ctx = ProbeContext(options: ProbeOptions(cacheDir: cacheDir), lightweight: true)
        let host = hostFindings(ctx, kind: "remote", cacheFile: cacheFile) {
            SystemChecks.kernel(ctx) + FanotifyChecks.run(ctx) + EROFSChecks.planning(ctx) + BlockChecks.planning(ctx)
                + FuseChecks.planning(ctx)
        }
        var findings = host.findings
        override.forEach { findings.add($0) }
        return Result(plan: Planner.plan(findings, source: .remote, implemented: implemented), findings: findings, cached: host.cached)
    }
}
