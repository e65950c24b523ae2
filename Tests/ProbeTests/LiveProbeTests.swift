import Foundation
import Glibc
import Testing
@testable import Probe
import EROFS
import Syscall
import SystemPackage
import TestSupport

/// The probe against this host's kernel: every "present" must really work when performed, and a probe
/// must leave nothing behind.
@Suite(.serialized) struct LiveProbeTests {
    static let report: ProbeReport = HostProbe.run(ProbeOptions(cacheDir: TestEnv.scratchBase + "/erofs-compat-cache-probe"), implemented: Set(Backend.allCases))

    static func has(_ id: String) -> Bool { report.findings.isPresent(id) }

    @Test(.enabled(if: TestEnv.isRoot, "needs root (CAP_SYS_ADMIN) for live kernel trials"))
    func rootProbeDecidesPrivilegedFindings() {
        for id in ["erofs.file_backed", "fanotify.pre_access", "loop.configure", "fanotify.deny_errno"] {
            #expect(Self.report.findings.status(id) != .unknown, "a root probe decides \(id)")
        }
    }

    @Test(.enabled(if: TestEnv.isRoot && has("erofs.file_backed"), "needs root and file-backed EROFS mounts (Linux 6.12+)"))
    func fileBackedPresentMeansAMountWorks() throws {
        let dir = try ScratchDir("fb")
        defer { dir.remove() }
        let img = dir.file("tiny.erofs")
        try Data(TinyImage.bytes()).write(to: URL(fileURLWithPath: img))
        try FileManager.default.createDirectory(atPath: dir.file("mnt"), withIntermediateDirectories: false)
        let fc = try MountAPI.fsopen("erofs")
        try MountAPI.setString(fc, "source", img)
        try MountAPI.create(fc)
        try MountAPI.attach(fc, attributes: [.readOnly], at: dir.file("mnt"))
        defer { try? MountAPI.umount(dir.file("mnt")) }
        #expect(currentMounts().contains(dir.file("mnt")))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.file("mnt")).isEmpty)
        #expect(try Sys.filesystemType(dir.file("mnt")) == 0xE0F5_E1E2)
    }

    @Test(.enabled(if: TestEnv.isRoot && has("fanotify.pre_access") && has("fanotify.deny_errno"),
                   "needs root, FAN_PRE_ACCESS on the scratch filesystem (Linux 6.14+) and FAN_DENY_ERRNO"))
    func preAccessPresentMeansEventsArrive() throws {
        let f = Self.report.findings
        #expect(f.status("fanotify.range_info") == .present)
        // Independent round trip: deny with EIO and see the reader fail with EIO.
        let dir = try ScratchDir("fan")
        defer { dir.remove() }
        let path = dir.file("sparse")
        let fd = try Sys.open(path, O_RDWR | O_CREAT)
        defer { Sys.close(fd.rawValue) }
        try Sys.ftruncate(fd.rawValue, 65536)
        let group = try Fanotify.initGroup(Fanotify.classPreContent | Fanotify.cloexec)
        defer { Sys.close(group.rawValue) }
        try Fanotify.mark(group, flags: Fanotify.markAdd, mask: Fanotify.preAccess, path: path)
        let readerResult = LockedResult()
        let t = Thread {
            do {
                let r = try Sys.open(path, O_RDONLY)
                defer { Sys.close(r.rawValue) }
                var b = [UInt8](repeating: 0, count: 100)
                _ = try b.withUnsafeMutableBytes { try Sys.pread(r.rawValue, into: $0, at: 20000) }
                readerResult.set("ok")
            } catch {
                readerResult.set("\(error)")
            }
        }
        t.start()
        #expect(try Sys.poll(group.rawValue, timeoutMs: 3000))
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = try buf.withUnsafeMutableBytes { try Sys.read(group.rawValue, into: $0) }
        let events = try buf.withUnsafeBytes { try Fanotify.decode(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        let ev = try #require(events.first { $0.mask & Fanotify.preAccess != 0 })
        #expect(ev.range?.offset == 16384)
        #expect(ev.range?.count == 4096)
        try Fanotify.respond(group, fd: ev.fd, response: Fanotify.denyErrno(.ioError))
        Sys.close(ev.fd)
        for _ in 0..<300 where readerResult.get() == nil { usleep(10_000) }
        #expect(readerResult.get() == "\(Errno.ioError)")
    }

    @Test(.enabled(if: TestEnv.isRoot && has("loop.configure"), "needs root and LOOP_CONFIGURE (Linux 5.8+)"))
    func loopConfigurePresentMeansABindWorks() throws {
        let dir = try ScratchDir("loop")
        defer { dir.remove() }
        let img = dir.file("tiny.erofs")
        try Data(TinyImage.bytes()).write(to: URL(fileURLWithPath: img))
        let backing = try Sys.open(img, O_RDONLY)
        defer { Sys.close(backing.rawValue) }
        let n = try Loop.getFree()
        let dev = try Sys.open("/dev/loop\(n)", O_RDONLY)
        defer { Sys.close(dev.rawValue) }
        try Loop.configure(device: dev.rawValue, backing: backing.rawValue, flags: [.readOnly, .autoClear])
        let backingFile = try String(contentsOfFile: "/sys/block/loop\(n)/loop/backing_file", encoding: .utf8)
        #expect(backingFile.hasPrefix(img))
        try Loop.clear(device: dev.rawValue)
    }

    @Test(.enabled(if: TestEnv.isRoot && has("fuse.device"), "needs root and /dev/fuse"))
    func fuseDevicePresentMeansItOpens() throws {
        let fd = try Sys.open("/dev/fuse", O_RDWR)
        Sys.close(fd.rawValue)
    }

    @Test func nbdAbsentAgreesWithSysfs() {
        let f = Self.report.findings
        let sysfs = FileManager.default.fileExists(atPath: "/sys/module/nbd")
        #expect(f.status("nbd.module") == (sysfs ? .present : .absent) || f["nbd.module"]?.value == "loadable")
    }

    @Test(.enabled(if: TestEnv.isRoot, "needs root for the privileged trials whose leftovers are checked"))
    func probeLeavesNothingBehind() throws {
        let cache = try ScratchDir("leak")
        defer { cache.remove() }
        // Other suites mount and bind loop devices in their own scratch directories meanwhile.
        let mounts = { currentMounts().filter { !inOtherTestsScratch($0, mine: cache) } }
        let loops = { boundLoopDevices(ignoringOtherTestsThan: cache) }
        let mountsBefore = mounts(), loopsBefore = loops()
        let report = HostProbe.run(ProbeOptions(cacheDir: cache.path), implemented: [])
        #expect(report.findings.status("fanotify.pre_access") != .unknown)
        #expect(mounts() == mountsBefore)
        #expect(Set(loops()).subtracting(loopsBefore).isEmpty, "a loop device is left")
        #expect(try FileManager.default.contentsOfDirectory(atPath: cache.path).isEmpty)
    }

    @Test(.enabled(if: TestEnv.isRoot && TestEnv.which("mkfs.erofs") != nil, "needs root and mkfs.erofs (erofs-utils)"))
    func imageFindings() throws {
        let dir = try ScratchDir("img")
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.file("tree"), withIntermediateDirectories: true)
        try "hello\n".write(toFile: dir.file("tree/a.txt"), atomically: false, encoding: .utf8)
        let mk = try run(TestEnv.which("mkfs.erofs")!, ["--quiet", "-zlz4hc", dir.file("img.erofs"), dir.file("tree")])
        #expect(mk.status == 0, "\(mk.stderr)")
        let report = HostProbe.run(ProbeOptions(cacheDir: dir.path, image: dir.file("img.erofs")), implemented: [.file])
        #expect(report.findings.status("image.blkid") == .present)
        #expect(report.findings["image.blkid"]?.value?.contains("TYPE=erofs") == true)
        #expect(report.findings.status("image.superblock") == .present)
        #expect(report.findings.status("image.features") == .present)
        #expect(report.findings.status("image.mountable") == .present)

        try Data(repeating: 0x5A, count: 8192).write(to: URL(fileURLWithPath: dir.file("junk")))
        let bad = HostProbe.run(ProbeOptions(cacheDir: dir.path, image: dir.file("junk")), implemented: [.file])
        #expect(bad.findings.status("image.superblock") == .absent)
        #expect(bad.findings.status("image.mountable") == .absent)
        #expect(bad.plans[0].chosen == nil)
    }

    @Test(.enabled(if: TestEnv.which("mkfs.erofs") != nil, "needs mkfs.erofs (erofs-utils)"))
    func tinyImageIsWhatMkfsWrites() throws {
        let dir = try ScratchDir("tiny")
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.file("empty"), withIntermediateDirectories: true)
        let mk = try run(TestEnv.which("mkfs.erofs")!, ["--quiet", "-T0", "-U", "00000000-0000-0000-0000-000000000000", "--all-root",
                                                        dir.file("e.img"), dir.file("empty")])
        #expect(mk.status == 0, "\(mk.stderr)")
        let theirs = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir.file("e.img"))))
        var ours = TinyImage.bytes()
        // mkfs stamps the directory's own mtime into the superblock build time only when not -T0; compare all.
        #expect(theirs.count == ours.count)
        if theirs != ours {
            let diff = zip(theirs, ours).enumerated().filter { $0.element.0 != $0.element.1 }.map(\.offset)
            Issue.record("differs at offsets \(diff.prefix(16))")
            ours = theirs
        }
        #expect(try Superblock(parsing: Array(theirs[1024...])).rootNid == 36)
    }
}

final class LockedResult: @unchecked Sendable {
    private var v: String?
    private let l = NSLock()
    func set(_ s: String) { l.lock(); v = s; l.unlock() }
    func get() -> String? { l.lock(); defer { l.unlock() }; return v }
}
