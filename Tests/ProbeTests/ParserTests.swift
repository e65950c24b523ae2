import Foundation
import Testing
@testable import Probe
@testable import Syscall
import TestSupport

@Suite struct ParserTests {
    @Test func procFilesystems() {
        let text = "nodev\tsysfs\nnodev\ttmpfs\n\text4\n\terofs\nnodev\tfuse\n"
        let fs = ProcFilesystems.parse(text)
        #expect(fs == ["sysfs", "tmpfs", "ext4", "erofs", "fuse"])
        #expect(!fs.contains("nodev"))
    }

    @Test func kernelConfig() {
        let cfg = KernelConfig(parsing: """
            # comment
            CONFIG_EROFS_FS=y
            CONFIG_FUSE_FS=m
            # CONFIG_BLK_DEV_NBD is not set
            CONFIG_LOCALVERSION="-test"
            """, source: "fixture")
        #expect(cfg.value("CONFIG_EROFS_FS") == "y")
        #expect(cfg.enabled("CONFIG_FUSE_FS"))
        #expect(cfg.value("CONFIG_BLK_DEV_NBD") == "n")
        #expect(!cfg.enabled("CONFIG_BLK_DEV_NBD"))
        #expect(cfg.value("CONFIG_MISSING") == "n")
        #expect(cfg.value("CONFIG_LOCALVERSION") == "-test")
    }

    @Test func mountinfoWithEscapes() throws {
        let text = """
            22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
            40 22 0:45 / /mnt/with\\040space ro,relatime shared:2 - erofs /var/img\\040a.erofs ro,user_xattr
            41 22 0:46 / /mnt/fuse rw - fuse.erofs-compat erofs-compat rw,user_id=0
            """
        let e = MountInfo.parse(text)
        #expect(e.count == 3)
        #expect(e[1].mountPoint == "/mnt/with space")
        #expect(e[1].source == "/var/img a.erofs")
        #expect(e[1].fsType == "erofs")
        #expect(e[2].fsType == "fuse.erofs-compat")
        #expect(MountInfo.mount(containing: "/mnt/with space/x", in: e)?.mountID == 40)
        #expect(MountInfo.mount(containing: "/mnt/withspace", in: e)?.mountID == 22)
        #expect(MountInfoEntry(line: "garbage line") == nil)
    }

    @Test func capabilitiesAndUserNamespace() {
        #expect(ProcStatus.effectiveCapabilities("Name:\tx\nCapEff:\t000001fffeffffff\n") == 0x1fffeffffff)
        #expect(ProcStatus.effectiveCapabilities("Name:\tx\n") == nil)
        #expect(UIDMap.isInitialNamespace("         0          0 4294967295\n"))
        #expect(!UIDMap.isInitialNamespace("         0       1000          1\n"))
    }

    @Test func procDevices() {
        let (chr, blk) = ProcDevices.parse("Character devices:\n  1 mem\n 10 misc\n\nBlock devices:\n  7 loop\n 43 nbd\n")
        #expect(chr["misc"] == 10)
        #expect(blk["nbd"] == 43)
        #expect(blk["misc"] == nil)
    }

    /// A host with erofs as a loadable, not yet loaded module (Debian 6.1): the probe does not trigger
    /// an autoload unless allowed, and says so.
    @Test func loadableErofsIsNotAutoloaded() throws {
        let root = try FixtureRoot()
        defer { root.remove() }
        try root.write("/proc/filesystems", "nodev\ttmpfs\n\text4\n")
        try root.write("/proc/sys/kernel/osrelease", "6.1.0-fixture\n")
        try root.write("/boot/config-6.1.0-fixture", "CONFIG_EROFS_FS=m\nCONFIG_BLK_DEV_NBD=m\n")
        try root.write("/lib/modules/6.1.0-fixture/modules.dep", "kernel/fs/erofs/erofs.ko:\n")
        let report = HostProbe.run(ProbeOptions(host: Host(root: root.root)), implemented: [])
        #expect(report.findings["erofs.module"]?.value == "loadable")
        #expect(report.findings["nbd.module"]?.value == "loadable")
        let fb = try #require(report.findings["erofs.file_backed"])
        #expect(fb.status == .unknown)
        #expect(fb.evidence.contains { $0.result.contains("--allow-module-load") })
        let allowed = HostProbe.run(ProbeOptions(allowModuleLoad: true, host: Host(root: root.root)), implemented: [])
        #expect(allowed.findings["erofs.file_backed"]?.evidence.contains { $0.result.contains("--allow-module-load") } == false)
    }

    /// The parsers as the probe uses them, on a fixture host root.
    @Test func fixtureHostRoot() throws {
        let root = try FixtureRoot()
        defer { root.remove() }
        try root.write("/proc/filesystems", "nodev\ttmpfs\n\text4\n")
        try root.write("/proc/sys/kernel/osrelease", "6.1.0-fixture\n")
        try root.write("/proc/self/status", "CapEff:\t0000000000000000\n")
        try root.mkdir("/sys/module/loop/parameters")
        try root.write("/sys/module/fuse/initstate", "live\n")
        try root.write("/lib/modules/6.1.0-fixture/modules.builtin", "kernel/drivers/block/loop.ko\n")
        try root.mkdir("/sys/fs/erofs/features")
        let host = Host(root: root.root)
        #expect(!host.isLive)
        let report = HostProbe.run(ProbeOptions(host: host), implemented: [.file, .loop])
        let f = report.findings
        #expect(f["kernel.release"]?.value == "6.1.0-fixture")
        #expect(f.status("privileges.cap_sys_admin") == .absent)
        #expect(f.status("erofs.registered") == .absent)
        #expect(f["loop.module"]?.value == "built-in")
        #expect(f["fuse.module"]?.value == "loaded")
        #expect(f["erofs.module"]?.value == "absent")
        // No live syscalls against a fixture root: the live-only findings are unknown or missing.
        #expect(f.status("erofs.file_backed") == .unknown)
        #expect(report.exitCode == 1)
    }
}
