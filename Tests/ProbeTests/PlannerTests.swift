import Testing
@testable import Probe

/// The planner over synthetic finding sets, as kernels of several generations would produce them.
@Suite struct PlannerTests {
    static func host(_ version: String, nbd: Bool, fuse: Bool, privileged: Bool = true, preAccessFS: Bool = true) -> Findings {
        let v = version.split(separator: ".").compactMap { Int($0) }
        let at = { (a: Int, b: Int) in (v[0], v[1]) >= (a, b) }
        func s(_ ok: Bool) -> Finding.Status { ok ? .present : .absent }
        let adminDependent: (Finding.Status) -> Finding.Status = { privileged ? $0 : .unknown }
        return Findings([
            Finding("kernel.release", "", .present, value: version),
            Finding("privileges.cap_sys_admin", "", s(privileged)),
            Finding("erofs.module", "", .present, value: "loadable"),
            Finding("erofs.file_backed", "", adminDependent(s(at(6, 12)))),
            Finding("loop.module", "", .present),
            Finding("loop.configure", "", adminDependent(s(at(5, 8)))),
            Finding("fanotify.pre_access", "", adminDependent(s(at(6, 14) && preAccessFS))),
            Finding("fanotify.range_info", "", adminDependent(s(at(6, 14) && preAccessFS))),
            Finding("fanotify.deny_errno", "", adminDependent(s(at(6, 13)))),
            Finding("nbd.module", "", s(nbd)),
            Finding("fuse.device", "", s(fuse)),
            Finding("fuse.fusermount3", "", s(fuse)),
        ])
    }

    let all = Set(Backend.allCases)

    @Test(arguments: [
        ("5.10", true, true, Backend.loop, Backend.fuseBlob),
        ("5.10", false, true, .loop, .fuseBlob),
        ("5.10", false, false, .loop, .loop),
        ("6.1", true, false, .loop, .nbd),
        ("6.12", false, false, .file, .file),
        ("6.12", false, true, .file, .fuseBlob),
        ("6.1", false, true, .loop, .fuseBlob),
        ("6.14", false, false, .file, .fanotify),
        ("6.18", true, true, .file, .fanotify),
        ("6.18", false, false, .file, .fanotify),
    ])
    func choices(version: String, nbd: Bool, fuse: Bool, local: Backend, remote: Backend) {
        let f = Self.host(version, nbd: nbd, fuse: fuse)
        #expect(Planner.plan(f, source: .local, implemented: all).chosen == local)
        #expect(Planner.plan(f, source: .remote, implemented: all).chosen == remote)
    }

    @Test func everyBetterBackendHasAReason() {
        let plan = Planner.plan(Self.host("6.1", nbd: false, fuse: false), source: .remote, implemented: all)
        #expect(plan.chosen == .loop)
        for c in plan.candidates.prefix(while: { $0.backend != .loop }) {
            #expect(c.verdict == .rejected)
            #expect(!c.reasons.isEmpty)
        }
        let fan = plan.candidates.first { $0.backend == .fanotify }!
        #expect(fan.reasons.joined().contains("FAN_PRE_ACCESS"))
    }

    @Test func cacheOnTmpfsRulesOutFanotify() {
        let f = Self.host("6.18", nbd: false, fuse: true, preAccessFS: false)
        #expect(Planner.plan(f, source: .remote, implemented: all).chosen == .fuseBlob)
    }

    @Test func unimplementedBackendsAreRejectedWithThatReason() {
        let plan = Planner.plan(Self.host("6.18", nbd: true, fuse: true), source: .remote, implemented: [.file, .loop])
        #expect(plan.chosen == .file)
        let fan = plan.candidates.first { $0.backend == .fanotify }!
        #expect(fan.verdict == .rejected)
        #expect(fan.reasons.joined().contains("does not implement"))
    }

    @Test func unprivilegedIsUnverifiedNotViable() {
        let f = Self.host("6.18", nbd: false, fuse: false, privileged: false)
        let plan = Planner.plan(f, source: .local, implemented: all)
        #expect(plan.chosen == nil)
        #expect(plan.candidates.allSatisfy { $0.verdict != .viable })
        #expect(!Planner.hostCanMount(f, source: .local))
    }

    @Test func unprivilegedFuseWithFusermount() {
        let f = Self.host("6.18", nbd: false, fuse: true, privileged: false)
        #expect(Planner.plan(f, source: .local, implemented: all).chosen == .fuseErofs)
    }

    @Test func imageWithUnknownFeaturesOnlyLeavesFuse() {
        var f = Self.host("6.18", nbd: true, fuse: true)
        f.add(Finding("image.features", "", .absent, evidence: [.init("/sys/fs/erofs/features", "missing: metabox")]))
        let plan = Planner.plan(f, source: .local, implemented: all)
        #expect(plan.chosen == .fuseErofs)
        #expect(plan.candidates.first { $0.backend == .file }!.reasons.joined().contains("metabox"))
        #expect(plan.candidates.first { $0.backend == .fuseBlob }!.verdict == .rejected)
    }

    /// fuse-blob mounts its FUSE file file-backed where the kernel can (6.12+), else through loop;
    /// without either it is rejected and a remote image falls back to a whole download.
    @Test func fuseBlobNeedsFileBackedOrLoop() {
        let on61 = Planner.plan(Self.host("6.1", nbd: false, fuse: true), source: .remote, implemented: all)
        #expect(on61.candidates.first { $0.backend == .fuseBlob }!.reasons.joined().contains("loop device"))
        var f = Self.host("6.1", nbd: false, fuse: true)
        f.add(Finding("loop.module", "", .absent))
        let plan = Planner.plan(f, source: .remote, implemented: all)
        #expect(plan.candidates.first { $0.backend == .fuseBlob }!.verdict == .rejected)
        #expect(plan.chosen == .fuseErofs, "the user-space reader over the lazy blob")
    }

    @Test func localNeverUsesFanotify() {
        let plan = Planner.plan(Self.host("6.18", nbd: false, fuse: false), source: .local, implemented: all)
        #expect(plan.candidates.first { $0.backend == .fanotify }?.verdict == .rejected)
    }
}
