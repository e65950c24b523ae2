import Foundation
import Glibc
import Testing
@testable import EROFS
@testable import Probe
@testable import Runtime
import Syscall
import TestSupport

/// What the probe says of this host's EROFS and loop devices: the local-mount tests compare the
/// file and loop backends and gate on these findings, not on the machine they run on.
let localHostFindings = hostFindings([EROFSChecks.planning, BlockChecks.planning])

/// What `checks` find on this host, as the planner sees it (scratch files on ext4, no kernel config).
func hostFindings(_ checks: [(ProbeContext) -> [Finding]]) -> Findings {
    let ctx = ProbeContext(options: ProbeOptions(cacheDir: TestEnv.scratchBase), lightweight: true)
    var f = Findings()
    checks.flatMap { $0(ctx) }.forEach { f.add($0) }
    return f
}

/// The first of `needed` (finding id, what it is) that `findings` lacks, as a skip reason ending in
/// `consequence`; nil when all are present.
func firstMissing(_ needed: [(String, String)], in findings: Findings, _ consequence: String) -> String? {
    needed.first { !findings.isPresent($0.0) }.map { "the probe finds no \($0.1) on this kernel: \(consequence)" }
}

/// Why the local-mount tests cannot run here, or nil.
let localMountMissing: String? = {
    guard TestEnv.isRoot, TestEnv.which("mkfs.erofs") != nil else {
        return "needs root (CAP_SYS_ADMIN) and mkfs.erofs (erofs-utils) for real mounts"
    }
    return firstMissing([("erofs.file_backed", "file-backed EROFS mounts (Linux 6.12+)"),
                         ("loop.configure", "LOOP_CONFIGURE (Linux 5.8+)")],
                        in: localHostFindings, "the file and loop backends are compared here")
}()
let liveReason = localMountMissing ?? ""
let canMount = localMountMissing == nil

/// One scratch area per test: a tree, its image, a mountpoint and a private state directory.
struct Fixture {
    let dir: ScratchDir
    var tree: String { dir.file("tree") }
    var image: String { dir.file("image.erofs") }
    var mnt: String { dir.file("mnt") }
    let runtime: Runtime

    init(_ label: String, mkfs: [String] = ["-zlz4hc"]) throws {
        dir = try ScratchDir(label)
        try Samples.makeTree(at: dir.file("tree"))
        try Samples.mkfs(dir.file("tree"), dir.file("image.erofs"), mkfs)
        try FileManager.default.createDirectory(atPath: dir.file("mnt"), withIntermediateDirectories: false)
        runtime = Runtime(state: StateStore(root: dir.file("state")))
    }

    /// Asserts nothing of ours is left: no mount under the scratch dir, no loop device on its files, no record.
    func expectClean(_ loopsBefore: [String], sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(!currentMounts().contains { $0.hasPrefix(dir.path) }, "a mount is left", sourceLocation: sourceLocation)
        let newLoops = Set(boundLoopDevices(ignoringOtherTestsThan: dir)).subtracting(loopsBefore)
        #expect(newLoops.isEmpty, "a loop device is left: \(newLoops.sorted())", sourceLocation: sourceLocation)
        #expect(runtime.state.all().isEmpty, "a state record is left", sourceLocation: sourceLocation)
        let tmp = (try? FileManager.default.contentsOfDirectory(atPath: runtime.state.mountsDir)) ?? []
        #expect(tmp.isEmpty, "state files left: \(tmp)", sourceLocation: sourceLocation)
    }

    func remove() { dir.remove() }
}

@Suite(.serialized, .enabled(if: canMount, Comment(rawValue: liveReason)))
struct MountTests {
    @Test(arguments: [Backend.file, .loop], [["-zlz4hc"], []])
    func mountCompareUnmount(backend: Backend, mkfs: [String]) throws {
        let loops = boundLoopDevices()
        let f = try Fixture("m-\(backend.rawValue)", mkfs: mkfs)
        defer { f.remove() }
        let out = try f.runtime.mount(MountRequest(source: f.image, mountpoint: f.mnt, backend: backend))
        let rec = try #require(out.record)
        #expect(rec.backend == backend.rawValue)
        #expect((rec.device != nil) == (backend == .loop))
        #expect(Samples.compare(f.tree, f.mnt) == [])
        #expect(try f.runtime.status().map(\.stale) == [false])
        let (gone, stale) = try f.runtime.umount(f.mnt)
        #expect(gone == rec && !stale)
        f.expectClean(loops)
    }

    @Test func autoPicksFileAndOptionsReachTheKernel() throws {
        let loops = boundLoopDevices()
        let f = try Fixture("auto")
        defer { f.remove() }
        let opts = try MountOptions(parsing: ["nodev,noexec", "cache_strategy=disabled,noatime"])
        let out = try f.runtime.mount(MountRequest(source: f.image, mountpoint: f.mnt, options: opts))
        #expect(out.record?.backend == "file")
        #expect(out.plan.chosen == .file)
        let entry = try #require(MountInfo.mount(at: f.mnt, in: MountInfo.current()))
        #expect(entry.options.contains("nodev") && entry.options.contains("noexec") && entry.options.contains("noatime"))
        #expect(entry.superOptions.contains("cache_strategy=disabled"))
        #expect(entry.options.hasPrefix("ro"))
        try f.runtime.umount(f.mnt)
        f.expectClean(loops)
    }

    /// The planner told file-backed mounts are missing (as on 6.1) picks loop.
    @Test func plannerWithoutFileBackedFallsBackToLoop() throws {
        let loops = boundLoopDevices()
        let f = try Fixture("nofb")
        defer { f.remove() }
        let without = Finding("erofs.file_backed", "file-backed", .absent, evidence: [.init("simulated", "ENOTBLK (as on Linux 6.1)")])
        let out = try f.runtime.mount(MountRequest(source: f.image, mountpoint: f.mnt), override: [without])
        #expect(out.record?.backend == "loop")
        #expect(out.plan.candidates.first { $0.backend == .file }?.verdict == .rejected)
        #expect(Samples.compare(f.tree, f.mnt) == [])
        // A named backend the planner rejects is refused, not replaced.
        let f2 = try Fixture("nofb2")
        defer { f2.remove() }
        #expect(throws: RuntimeError.self) {
            try f2.runtime.mount(MountRequest(source: f2.image, mountpoint: f2.mnt, backend: .file), override: [without])
        }
        try f.runtime.umount(f.mnt)
        f.expectClean(loops)
        f2.expectClean(loops)
    }

    /// A runtime failure the planner could not foresee: file-backed EROFS refuses a file on tmpfs
    /// with ENOTBLK; auto says so and uses loop.
    @Test func runtimeENOTBLKFallsBackToLoopAndSaysSo() throws {
        let loops = boundLoopDevices()
        let f = try Fixture("tmpfs")
        defer { f.remove() }
        let tmp = f.dir.file("tmpfs")
        try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: false)
        try MountAPI.mount(source: "tmpfs", target: tmp, type: "tmpfs", flags: 0, data: "size=16m")
        defer { try? MountAPI.umount(tmp) }
        try FileManager.default.copyItem(atPath: f.image, toPath: tmp + "/image.erofs")
        var notes: [String] = []
        let out = try f.runtime.mount(MountRequest(source: tmp + "/image.erofs", mountpoint: f.mnt)) { notes.append($0) }
        #expect(out.record?.backend == "loop")
        #expect(notes.count == 1 && notes[0].contains("ENOTBLK") || notes[0].contains("Block device required"), "\(notes)")
        #expect(Samples.compare(f.tree, f.mnt) == [])
        // Named: no fallback.
        try f.runtime.umount(f.mnt)
        #expect(throws: RuntimeError.self) { try f.runtime.mount(MountRequest(source: tmp + "/image.erofs", mountpoint: f.mnt, backend: .file)) }
        try MountAPI.umount(tmp)
        f.expectClean(loops)
    }

    @Test func symlinkedAndRelativePathsAreCanonical() throws {
        let loops = boundLoopDevices()
        let f = try Fixture("canon")
        defer { f.remove() }
        try FileManager.default.createSymbolicLink(atPath: f.dir.file("mnt-link"), withDestinationPath: "mnt")
        let cwd = FileManager.default.currentDirectoryPath
        FileManager.default.changeCurrentDirectoryPath(f.dir.path)
        defer { FileManager.default.changeCurrentDirectoryPath(cwd) }
        let out = try f.runtime.mount(MountRequest(source: "./tree/../image.erofs", mountpoint: "mnt-link"))
        #expect(out.record?.mountpoint == f.mnt)
        #expect(out.record?.source == f.image)
        // The same image again, through another spelling of the path.
        #expect(throws: RuntimeError.alreadyMounted(f.mnt, source: f.image)) {
            try f.runtime.mount(MountRequest(source: f.image, mountpoint: f.dir.path + "/./mnt"))
        }
        FileManager.default.changeCurrentDirectoryPath("/")
        try f.runtime.umount(f.dir.path + "/mnt-link/")
        f.expectClean(loops)
    }

    @Test func badInputsLeaveNothingBehind() throws {
        let loops = boundLoopDevices()
        let f = try Fixture("bad")
        defer { f.remove() }
        let rt = f.runtime
        func code(_ body: () throws -> Void) -> RuntimeError.ExitCode? {
            do { try body(); return nil } catch let e as RuntimeError { return e.exitCode } catch { return nil }
        }
        #expect(code { _ = try rt.mount(MountRequest(source: f.dir.file("missing"), mountpoint: f.mnt)) } == .badSource)
        #expect(code { _ = try rt.mount(MountRequest(source: f.tree, mountpoint: f.mnt)) } == .badSource)
        // A FIFO is refused at once: opening the source never waits for a writer.
        #expect(mkfifo(f.dir.file("fifo"), 0o600) == 0)
        #expect(code { _ = try rt.mount(MountRequest(source: f.dir.file("fifo"), mountpoint: f.mnt)) } == .badSource)
        try Data(repeating: 0x41, count: 16384).write(to: URL(fileURLWithPath: f.dir.file("junk")))
        #expect(code { _ = try rt.mount(MountRequest(source: f.dir.file("junk"), mountpoint: f.mnt)) } == .badSource)
        // An ext4-formatted file is named as such by libblkid.
        if let mke2fs = TestEnv.which("mkfs.ext4") {
            try Data(count: 2 << 20).write(to: URL(fileURLWithPath: f.dir.file("ext4.img")))
            _ = try run(mke2fs, ["-q", "-F", f.dir.file("ext4.img")])
            do {
                _ = try rt.mount(MountRequest(source: f.dir.file("ext4.img"), mountpoint: f.mnt))
                Issue.record("ext4 image accepted")
            } catch let e as RuntimeError {
                #expect(e.description.contains("EROFS"))
            }
        }
        // Feature bits this kernel lacks (an unknown incompat bit, checksum recomputed).
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: f.image)))
        bytes[1024 + 80 + 1] |= 0x80  // feature_incompat bit 0x8000
        var area = Array(bytes[1024..<4096]); area[4] = 0; area[5] = 0; area[6] = 0; area[7] = 0
        let crc = CRC32C.update(~0, area)
        for i in 0..<4 { bytes[1028 + i] = UInt8(truncatingIfNeeded: crc >> (8 * i)) }
        try Data(bytes).write(to: URL(fileURLWithPath: f.dir.file("future.erofs")))
        do {
            _ = try rt.mount(MountRequest(source: f.dir.file("future.erofs"), mountpoint: f.mnt))
            Issue.record("image with unknown features accepted")
        } catch let e as RuntimeError {
            #expect(e.exitCode == .badSource)
            #expect(e.description.contains("0x8000"))
        }
        #expect(code { _ = try rt.mount(MountRequest(source: f.image, mountpoint: f.dir.file("nomnt"))) } == .badMountpoint)
        #expect(code { _ = try rt.mount(MountRequest(source: f.image, mountpoint: f.image)) } == .badMountpoint)
        #expect(code { _ = try MountOptions(parsing: ["nodev,bogus"]) } == .usage)
        #expect(code { _ = try MountOptions(parsing: ["rw"]) } == .usage)
        #expect(code { _ = try MountOptions(parsing: ["cache_strategy=fast"]) } == .usage)
        // An image 512 bytes into a file: found at fsoffset=512, but not block aligned.
        let image = try Data(contentsOf: URL(fileURLWithPath: f.image))
        try (Data(count: 512) + image).write(to: URL(fileURLWithPath: f.dir.file("at512")))
        #expect(code { _ = try rt.mount(MountRequest(source: f.dir.file("at512"), mountpoint: f.mnt, options: try MountOptions(parsing: ["fsoffset=512"]))) } == .usage)
        #expect(code { _ = try rt.mount(MountRequest(source: f.dir.file("at512"), mountpoint: f.mnt)) } == .badSource)
        // A foreign mount on the mountpoint: mount refuses, umount and status name the owner.
        try MountAPI.mount(source: "erofs-compat-test", target: f.mnt, type: "tmpfs", flags: 0, data: "size=1m")
        defer { try? MountAPI.umount(f.mnt) }
        #expect(code { _ = try rt.mount(MountRequest(source: f.image, mountpoint: f.mnt)) } == .badMountpoint)
        do {
            try rt.umount(f.mnt)
            Issue.record("foreign mount unmounted")
        } catch let e as RuntimeError {
            #expect(e.exitCode == .notOurs)
            #expect(e.description.contains("tmpfs mount of erofs-compat-test"))
        }
        try MountAPI.umount(f.mnt)
        #expect(code { try rt.umount(f.mnt) } == .notOurs)
        f.expectClean(loops)
    }

    /// An image 4 KiB into a file: fsoffset= for file-backed (Linux 6.16+), lo_offset for loop.
    @Test(arguments: [Backend.file, .loop])
    func fsOffset(backend: Backend) throws {
        let loops = boundLoopDevices()
        let f = try Fixture("off-\(backend.rawValue)")
        defer { f.remove() }
        let image = try Data(contentsOf: URL(fileURLWithPath: f.image))
        try (Data(repeating: 0xEE, count: 4096) + image).write(to: URL(fileURLWithPath: f.dir.file("at4k")))
        let out = try f.runtime.mount(MountRequest(source: f.dir.file("at4k"), mountpoint: f.mnt, backend: backend,
                                                   options: try MountOptions(parsing: ["fsoffset=4096"])))
        #expect(out.record?.options.contains("fsoffset=4096") == true)
        #expect(Samples.compare(f.tree, f.mnt) == [])
        try f.runtime.umount(f.mnt)
        f.expectClean(loops)
    }

    @Test func plainUmountLeavesStaleStateThatIsCleaned() throws {
        let loops = boundLoopDevices()
        let f = try Fixture("stale")
        defer { f.remove() }
        _ = try f.runtime.mount(MountRequest(source: f.image, mountpoint: f.mnt, backend: .loop))
        try MountAPI.umount(f.mnt)
        let st = try f.runtime.status()
        #expect(st.count == 1 && st[0].stale)
        #expect(try f.runtime.prune().count == 1)
        f.expectClean(loops)
        _ = try f.runtime.mount(MountRequest(source: f.image, mountpoint: f.mnt))
        try MountAPI.umount(f.mnt)
        let (_, stale) = try f.runtime.umount(f.mnt)
        #expect(stale)
        f.expectClean(loops)
    }

    /// Concurrent mounts are serialised by the state lock: of two racing mounts on one mountpoint
    /// exactly one wins; mounts on different mountpoints both succeed.
    @Test func concurrentMounts() throws {
        let loops = boundLoopDevices()
        let f = try Fixture("conc")
        defer { f.remove() }
        try FileManager.default.createDirectory(atPath: f.dir.file("mnt2"), withIntermediateDirectories: false)
        let results = Locked<[String]>([])
        let group = DispatchGroup()
        for (i, mp) in [f.mnt, f.mnt, f.dir.file("mnt2")].enumerated() {
            group.enter()
            DispatchQueue.global().async {
                defer { group.leave() }
                do {
                    _ = try f.runtime.mount(MountRequest(source: f.image, mountpoint: mp, backend: i == 2 ? .loop : nil))
                    results.withLock { $0.append("ok \(mp)") }
                } catch {
                    results.withLock { $0.append("fail \(mp): \(error)") }
                }
            }
        }
        group.wait()
        let r = results.get()
        #expect(r.filter { $0.hasPrefix("ok") }.count == 2, "\(r)")
        #expect(r.contains("ok \(f.dir.file("mnt2"))"))
        #expect(try f.runtime.status().count == 2)
        try f.runtime.umount(f.mnt)
        try f.runtime.umount(f.dir.file("mnt2"))
        f.expectClean(loops)
    }

    /// How a lazy worker knows its cache file is still in use: a file-backed superblock holds the
    /// file open until it is shut down — also after a lazy umount while a file on it is open — and a
    /// write lease on the only other open (the writer) sees that.
    @Test func writeLeaseSeesTheSuperblockHoldingItsFile() throws {
        let loops = boundLoopDevices()
        let f = try Fixture("lease")
        defer { f.remove() }
        let writer = try Sys.open(f.image, O_RDWR)
        defer { Sys.close(writer.rawValue) }
        #expect(try !Sys.fileIsShared(writer.rawValue), "nothing else has the image open yet")
        _ = try f.runtime.mount(MountRequest(source: f.image, mountpoint: f.mnt, backend: .file))
        #expect(try Sys.fileIsShared(writer.rawValue), "the mounted superblock holds the image")
        let open = try Sys.open(f.mnt + "/dir/a.txt", O_RDONLY)
        try f.runtime.umount(f.mnt, lazy: true)
        #expect(!currentMounts().contains(f.mnt), "detached")
        usleep(200_000)
        #expect(try Sys.fileIsShared(writer.rawValue), "a file is still open on the detached superblock")
        Sys.close(open.rawValue)
        var shared = true
        for _ in 0..<40 where shared {
            usleep(50_000)
            shared = try Sys.fileIsShared(writer.rawValue)
        }
        #expect(!shared, "the superblock was shut down with the last file")
        f.expectClean(loops)
    }
}
