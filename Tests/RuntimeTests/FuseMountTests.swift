import Foundation
import Glibc
import Testing
@testable import EROFS
@testable import Probe
@testable import Remote
@testable import Runtime
import Syscall
import TestSupport

/// What the probe says of this host's FUSE and EROFS, as the planner sees it (the tests gate on
/// these findings, not on which machine they run on).
let fuseHostFindings = hostFindings([FuseChecks.planning, EROFSChecks.planning])

/// Why the FUSE mount tests cannot run here, or nil.
/// Why the directio test cannot run: the kernel's EROFS refuses the `directio` flag (before ~6.13), or
/// fincore (util-linux) is missing.
let directioSkipReason: String? = {
    if let fuseSkipReason { return fuseSkipReason }
    if TestEnv.which("fincore") == nil { return "needs fincore (util-linux)" }
    guard let fc = try? MountAPI.fsopen("erofs"), (try? MountAPI.setFlag(fc, "directio")) != nil else {
        return "this kernel's EROFS has no directio option"
    }
    return nil
}()

let fuseSkipReason: String? = {
    if !TestEnv.isRoot { return "needs root (mounts FUSE with its own /dev/fuse descriptor)" }
    if fuseHostFindings.status("fuse.device") != .present { return "the probe finds no usable /dev/fuse" }
    if fuseHostFindings.status("erofs.file_backed") != .present {
        return "the probe finds no file-backed EROFS (the kernel's own mount is the oracle)"
    }
    if TestEnv.which("mkfs.erofs") == nil { return "needs mkfs.erofs (erofs-utils)" }
    return nil
}()

/// Why the passthrough test cannot run here (the probe's live FUSE trial and loop findings), or nil.
let passthroughSkipReason: String? = {
    if let fuseSkipReason { return fuseSkipReason }
    let f = hostFindings([FuseChecks.run, BlockChecks.planning])
    if f.status("fuse.kernel_passthrough") != .present { return "the probe finds no FUSE passthrough in the kernel" }
    if f.status("loop.configure") != .present { return "the probe finds no LOOP_CONFIGURE (passthrough mounts use loop)" }
    return nil
}()

/// The processes of this test's FUSE servers that are still running.
func fuseServers(under dir: ScratchDir) -> [Int32] {
    ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap(Int32.init).filter { pid in
        guard let raw = try? Sys.readFile("/proc/\(pid)/cmdline") else { return false }
        let argv = String(decoding: raw, as: UTF8.self)
        guard argv.contains("__fuse-serve") else { return false }
        // The spec names this test's state directory; argv does not, so look at the log it writes to.
        let log = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/2")) ?? ""
        return log.hasPrefix(dir.path)
    }
}

/// A scratch directory with a private state directory, and the CLI as the servers' executable;
/// `remove` detaches whatever is still mounted under it.
struct LocalFixture {
    let dir: ScratchDir
    let runtime: Runtime

    init(_ label: String) throws {
        dir = try ScratchDir(label)
        runtime = Runtime(state: StateStore(root: dir.file("state")))
        Runtime.workerExecutable = cliBinary
    }

    func remove() {
        for m in currentMounts().filter({ $0.hasPrefix(dir.path) }).reversed() { try? MountAPI.umount(m, detach: true) }
        dir.remove()
    }
}

/// umount, retried for a moment while the mount is busy: a test running in parallel may be walking
/// the scratch directories and briefly hold a file of this mount.
func umountRetryingBusy(_ runtime: Runtime, _ mnt: String) throws {
    for attempt in 0..<20 {
        do { try runtime.umount(mnt); return } catch let e as RuntimeError where attempt < 19 && e.description.contains("busy") {
            usleep(100_000)
        }
    }
}

/// The children (serving processes) of a supervisor.
func children(of pid: Int32) -> [Int32] {
    let raw = (try? Sys.readFile("/proc/\(pid)/task/\(pid)/children")) ?? []
    return String(decoding: raw, as: UTF8.self).split(separator: " ").compactMap { Int32($0) }
}

/// mkfs.erofs 1.5 variants (as the reader's oracle tests): uncompressed, lz4 and lz4hc with full and
/// compact indexes, big pclusters, ztailpacking, chunked files, inode forms, no inline data.
let fuseVariants: [[String]] = [
    [], ["-zlz4"], ["-zlz4hc"], ["-zlz4hc,9", "-C65536"], ["-zlz4hc", "-Eztailpacking"], ["-zlz4", "-Elegacy-compress"],
    ["--chunksize=8192"], ["--chunksize=16384", "-Eforce-chunk-indexes"], ["-T0", "-Eforce-inode-compact"],
    ["-x-1", "-Eforce-inode-extended"], ["-Enoinline_data"],
]

@Suite(.serialized, .enabled(if: fuseSkipReason == nil, Comment(rawValue: fuseSkipReason ?? "")))
struct FuseMountTests {
    /// Everything the kernel shows (bytes, modes, owners, symlinks, hard links, devices, xattrs,
    /// mtimes) equals what fuse-erofs shows, for every mkfs.erofs variant of the reader's oracle
    /// tests and every image made by erofs-utils 1.9.3 (the reader's newer formats).
    @Test func fuseErofsMatchesTheKernel() throws {
        let f = try LocalFixture("fuse-oracle")
        defer { f.remove() }
        let (dir, runtime) = (f.dir, f.runtime)
        try ReaderTrees.makeEdge(at: dir.file("tree/edge"))
        try ReaderTrees.makeReal(at: dir.file("tree/real"), budget: 1 << 20)
        for d in ["mnt", "oracle"] { try FileManager.default.createDirectory(atPath: dir.file(d), withIntermediateDirectories: false) }
        var images: [(String, String)] = []
        for (i, mkfs) in fuseVariants.enumerated() {
            try Samples.mkfs(dir.file("tree"), dir.file("img\(i)"), mkfs)
            images.append((dir.file("img\(i)"), "mkfs \(mkfs)"))
        }
        let fixtures = TestEnv.repoRoot + "/Tests/Fixtures/mkfs-erofs-1.9.3"
        for name in ((try? FileManager.default.contentsOfDirectory(atPath: fixtures)) ?? []).sorted() where name.hasSuffix(".erofs") {
            images.append((fixtures + "/" + name, name))
        }
        #expect(images.count >= fuseVariants.count + 11)
        for (image, what) in images {
            let kernel = try withKernelMount(image, dir.file("oracle")) { TreeFacts(dir.file("oracle"), content: true) }
            let out = try runtime.mount(MountRequest(source: image, mountpoint: dir.file("mnt"), backend: .fuseErofs))
            #expect(out.record?.backend == "fuse-erofs")
            let ours = TreeFacts(dir.file("mnt"), content: true)
            try umountRetryingBusy(runtime, dir.file("mnt"))
            let d = kernel.diff(ours)
            #expect(d.isEmpty && kernel.entries.count > 3, "\(what): \(d.count) differences, first: \(d.prefix(4))")
        }
        #expect(fuseServers(under: dir).isEmpty, "every server exits with its mount")
        #expect(runtime.state.all().isEmpty)
    }

    /// A walk of a directory of small files in listing order reads most of them from the page cache:
    /// the server pushes each READ's next files into it (FUSE_NOTIFY_STORE), and every byte is the
    /// kernel's. Fails when nothing is pushed (one READ per file).
    @Test func smallFilesAreReadAheadIntoThePageCache() throws {
        let f = try LocalFixture("fuse-push")
        defer { f.remove() }
        let tree = f.dir.file("tree/d")
        try FileManager.default.createDirectory(atPath: tree, withIntermediateDirectories: true)
        for i in 0..<200 {
            let bytes = (0..<(1000 + i * 37)).map { UInt8(truncatingIfNeeded: $0 &* (i + 3)) }
            try Data(bytes).write(to: URL(fileURLWithPath: tree + String(format: "/f%03d", i)))
        }
        try Samples.mkfs(f.dir.file("tree"), f.dir.file("img"), ["-zlz4hc"])
        for d in ["mnt", "oracle"] { try FileManager.default.createDirectory(atPath: f.dir.file(d), withIntermediateDirectories: false) }
        let kernel = try withKernelMount(f.dir.file("img"), f.dir.file("oracle")) { TreeFacts(f.dir.file("oracle"), content: true) }
        _ = try f.runtime.mount(MountRequest(source: f.dir.file("img"), mountpoint: f.dir.file("mnt"), backend: .fuseErofs))
        let names = try FileManager.default.contentsOfDirectory(atPath: f.dir.file("mnt/d"))
        #expect(names.count == 200)
        let ours = TreeFacts(f.dir.file("mnt"), content: true)
        var st = try #require(try f.runtime.status(f.dir.file("mnt")).first)
        for _ in 0..<40 where (st.fuse?.reads ?? 0) == 0 {
            usleep(100_000)
            st = try #require(try f.runtime.status(f.dir.file("mnt")).first)
        }
        let reads = try #require(st.fuse).reads
        #expect(reads > 0 && reads < 60, "\(reads) READs for 200 files read in listing order")
        try umountRetryingBusy(f.runtime, f.dir.file("mnt"))
        #expect(kernel.diff(ours).isEmpty, "\(kernel.diff(ours).prefix(4))")
    }

    /// An image whose compression the kernel lacks (as Debian's 6.1 lacks zstd; simulated in the
    /// planner's findings only) is mounted by auto with fuse-erofs; naming a kernel backend is refused
    /// with that reason.
    @Test func anImageTheKernelCannotReadGoesToFuseErofs() throws {
        let f = try LocalFixture("fuse-features")
        defer { f.remove() }
        let (dir, runtime) = (f.dir, f.runtime)
        try Samples.makeTree(at: dir.file("tree"))
        try Samples.mkfs(dir.file("tree"), dir.file("img"), ["-zlz4hc"])
        for d in ["mnt", "oracle"] { try FileManager.default.createDirectory(atPath: dir.file(d), withIntermediateDirectories: false) }
        let missing = Finding("image.features", "image features supported by this kernel", .absent,
                              evidence: [.init("/sys/fs/erofs/features", "missing: zstd compression (Linux 6.10+)")])
        let out = try runtime.mount(MountRequest(source: dir.file("img"), mountpoint: dir.file("mnt")), override: [missing])
        #expect(out.record?.backend == "fuse-erofs")
        #expect(out.plan.candidates.first { $0.backend == .file }?.reasons.joined().contains("zstd") == true)
        let kernel = try withKernelMount(dir.file("img"), dir.file("oracle")) { TreeFacts(dir.file("oracle"), content: true) }
        #expect(kernel.diff(TreeFacts(dir.file("mnt"), content: true)).isEmpty)
        try runtime.umount(dir.file("mnt"))
        #expect(throws: RuntimeError.self) {
            try runtime.mount(MountRequest(source: dir.file("img"), mountpoint: dir.file("mnt"), backend: .file), override: [missing])
        }
        #expect(!currentMounts().contains(dir.file("mnt")) && runtime.state.all().isEmpty)
    }

    /// `umount --lazy` with a file open: the file keeps reading the image's bytes, the server
    /// exits once it is closed, and nothing is left.
    @Test(arguments: [Backend.fuseBlob, .fuseErofs])
    func lazyUmountKeepsOpenFilesServed(backend: Backend) throws {
        let f = try RemoteFixture("fuse-lazy")
        defer { f.remove() }
        let expected = try f.oracle()
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: backend, remote: f.remote))
        let path = try #require(expected.entries.keys.sorted().first { expected.entries[$0]!.hasPrefix("mode 100") && $0.hasPrefix("real") })
        let fd = try Sys.open(f.mnt + "/" + path, O_RDONLY)
        try f.runtime.umount(f.mnt, lazy: true)
        #expect(!currentMounts().contains(f.mnt))
        #expect(expected.entries[path]!.hasSuffix(" " + TreeFactsLite.digest(fd: fd.rawValue)), "the open file still reads right")
        #expect(!fuseServers(under: f.dir).isEmpty, "its server still runs while the file is open")
        Sys.close(fd.rawValue)
        for _ in 0..<150 where !fuseServers(under: f.dir).isEmpty { usleep(20_000) }
        #expect(fuseServers(under: f.dir).isEmpty, "the server exits after the last close")
        #expect(!currentMounts().contains { $0.hasPrefix(f.dir.path) }, "\(currentMounts())")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: f.dir.file("state/workers"))) ?? []).isEmpty)
    }

    /// fuse-blob and fuse-erofs over nginx: the kernel's view of the local image, status shows the
    /// server's figures, and umount leaves no mount, server, FUSE directory or state file.
    @Test(arguments: [Backend.fuseBlob, .fuseErofs])
    func remoteOverNginx(backend: Backend) throws {
        let f = try RemoteFixture("fuse-remote")
        defer { f.remove() }
        let expected = try f.oracle()
        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: backend, remote: f.remote))
        let record = try #require(out.record)
        #expect(record.backend == backend.rawValue)
        #expect(TreeFactsLite(f.mnt) == expected, "\(f.workerLogs())")
        var st = try #require(try f.runtime.status(f.mnt).first)
        // The server writes its figures every half second.
        for _ in 0..<40 where (st.fuse?.reads ?? 0) == 0 {
            usleep(100_000)
            st = try #require(try f.runtime.status(f.mnt).first)
        }
        #expect(st.problems.isEmpty && st.workerAlive == true, "\(st.problems)")
        let fuse = try #require(st.fuse)
        #expect(fuse.reads > 0 && fuse.readBytes > 0)
        // The lazy reader's figures, the same type status shows for every backend (population counts
        // what is committed: within a commit and a figures interval of the read).
        for _ in 0..<40 where (st.lazy?.population ?? 0) == 0 {
            usleep(100_000)
            st = try #require(try f.runtime.status(f.mnt).first)
        }
        let lazy = try #require(st.lazy, "no reader figures in \(st)")
        #expect(lazy.bytesFetched > 0 && lazy.requests > 0 && lazy.population > 0, "\(lazy)")
        // Mounted nosuid,nodev like every remote mount.
        let line = try #require(MountInfo.current().first { $0.mountPoint == f.mnt })
        #expect(line.options.contains("nosuid") && line.options.contains("nodev"))
        try f.runtime.umount(f.mnt)
        #expect(!currentMounts().contains { $0.hasPrefix(f.dir.path) }, "\(currentMounts())")
        #expect(fuseServers(under: f.dir).isEmpty)
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: f.dir.file("state/fuse"))) ?? []).isEmpty)
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: f.dir.file("state/workers"))) ?? []).isEmpty)
        // The blob stayed in the cache, complete and verified-free (no digest given): a second mount is warm.
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: backend, remote: f.remote))
        #expect(TreeFactsLite(f.mnt) == expected)
        try f.runtime.umount(f.mnt)
    }

    /// A fuse-blob mount of a complete cache entry passes the image file through to the cache file
    /// (FUSE passthrough, over a buffered loop device): every byte is the image's, and no read reaches
    /// the server. A mount of an incomplete entry is served as before. Fails when opens are not
    /// answered with FOPEN_PASSTHROUGH (the reads then reach the server).
    @Test(.enabled(if: passthroughSkipReason == nil, Comment(rawValue: passthroughSkipReason ?? "")))
    func aCompleteCacheIsPassedThrough() throws {
        let f = try RemoteFixture("fuse-passthrough")
        defer { f.remove() }
        let expected = try f.oracle()
        var opts = f.remote
        opts.prefetch = .all
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: .fuseBlob, remote: opts))
        let record = BlobCache(directory: f.dir.file("cache")).paths(key: BlobCache.partialKey(source: f.url)).data
        for _ in 0..<100 where (PopulationRecord.presentFraction(path: record + ".pop") ?? 0) < 1 { usleep(100_000) }
        var cold = try #require(try f.runtime.status(f.mnt).first)
        for _ in 0..<40 where cold.fuse == nil {
            usleep(100_000)
            cold = try #require(try f.runtime.status(f.mnt).first)
        }
        #expect((cold.fuse?.passthroughOpens ?? 0) == 0, "an incomplete entry is served, not passed through")
        try f.runtime.umount(f.mnt)
        #expect(PopulationRecord.presentFraction(path: record + ".pop") == 1)

        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: .fuseBlob, remote: f.remote))
        #expect(out.record?.device?.hasPrefix("/dev/loop") == true, "passthrough goes through a loop device")
        #expect(TreeFactsLite(f.mnt) == expected, "\(f.workerLogs())")
        var st = try #require(try f.runtime.status(f.mnt).first)
        for _ in 0..<40 where st.fuse?.passthroughOpens == nil {
            usleep(100_000)
            st = try #require(try f.runtime.status(f.mnt).first)
        }
        let fuse = try #require(st.fuse)
        #expect(fuse.passthroughOpens == 1 && fuse.reads == 0, "\(fuse)")
        #expect(st.problems.isEmpty, "\(st.problems)")
        try f.runtime.umount(f.mnt)
        #expect(!currentMounts().contains { $0.hasPrefix(f.dir.path) }, "\(currentMounts())")
        #expect(fuseServers(under: f.dir).isEmpty)
    }

    /// Where the kernel's EROFS takes `directio` (asked of the kernel: fsconfig accepts the flag),
    /// fuse-blob's EROFS mount uses it: after a read of every file the FUSE file's page cache (fincore)
    /// holds only the metadata EROFS reads through it (a quarter of this small-file image), while the
    /// bytes are the image's. Without directio it held the whole image.
    @Test(.enabled(if: directioSkipReason == nil, Comment(rawValue: directioSkipReason ?? "")))
    func fuseBlobKeepsNoSecondPageCache() throws {
        let f = try RemoteFixture("fuse-directio")
        defer { f.remove() }
        let req = MountRequest(source: f.url, mountpoint: f.mnt, backend: .fuseBlob, remote: f.remote)
        let out = try f.runtime.mount(req)
        let line = try #require(MountInfo.current().first { $0.mountPoint == f.mnt })
        #expect(line.superOptions.contains("directio"), "\(line.superOptions)")
        #expect(TreeFactsLite(f.mnt) == (try f.oracle()))
        // EROFS still reads its metadata through the file's page cache; the file data bypasses it.
        let file = try #require(out.record?.fuseMount) + "/image"
        let fincore = try run("/usr/bin/fincore", ["--bytes", "--noheadings", "--output", "RES", file])
        let cached = try #require(UInt64(fincore.stdout.trimmingCharacters(in: .whitespacesAndNewlines)), "\(fincore)")
        let size = UInt64(try Sys.lstat(f.server.root + "/img.erofs").st_size)
        #expect(cached * 2 < size, "FUSE file page cache: \(cached) of \(size) bytes (all of it without directio)")
        try f.runtime.umount(f.mnt)
        #expect(fuseServers(under: f.dir).isEmpty && f.runtime.state.all().isEmpty)
    }

    /// On a host without pre-content fanotify (findings shaped like Debian's 6.12; simulated in the
    /// planner only) auto serves a cold remote image with fuse-blob; once the entry is complete a new
    /// mount of it is the kernel's own mount of the cache file (no FUSE server, no READs), with the
    /// image's bytes, and it leaves nothing behind. A named `--backend fuse-blob` still gets FUSE.
    @Test func aCompleteEntryIsMountedByTheKernelWhenAutoWouldServeIt() throws {
        let f = try RemoteFixture("fuse-complete")
        defer { f.remove() }
        let expected = try f.oracle()
        let noPreContent = Finding("fanotify.pre_access", "FAN_PRE_ACCESS", .absent,
                                   evidence: [.init("fanotify_mark", "EINVAL (simulated: Linux 6.12)")])
        var opts = f.remote
        opts.prefetch = .all
        let cold = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: opts), override: [noPreContent])
        #expect(cold.record?.backend == "fuse-blob", "\(cold.plan.candidates)")
        let record = BlobCache(directory: f.dir.file("cache")).paths(key: BlobCache.partialKey(source: f.url)).data
        for _ in 0..<100 where (PopulationRecord.presentFraction(path: record + ".pop") ?? 0) < 1 { usleep(100_000) }
        try f.runtime.umount(f.mnt)
        try #require(PopulationRecord.presentFraction(path: record + ".pop") == 1)

        let warm = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote), override: [noPreContent])
        #expect(warm.record?.backend == "file" || warm.record?.backend == "loop", "\(String(describing: warm.record))")
        #expect(warm.notes.contains("cached and complete"), "\(warm.notes)")
        #expect(fuseServers(under: f.dir).isEmpty, "no server for a complete entry")
        #expect(TreeFactsLite(f.mnt) == expected)
        #expect(try f.runtime.status(f.mnt).first?.problems.isEmpty == true)
        try f.runtime.umount(f.mnt)

        let named = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: .fuseBlob, remote: f.remote),
                                        override: [noPreContent])
        #expect(named.record?.backend == "fuse-blob")
        try f.runtime.umount(f.mnt)
        #expect(!currentMounts().contains { $0.hasPrefix(f.dir.path) }, "\(currentMounts())")
        #expect(fuseServers(under: f.dir).isEmpty && f.runtime.state.all().isEmpty)
    }

    /// `--prefetch all` on a served mount: the server fills the whole cache in the background
    /// without a reader asking (the record reaches 100 %), and the bytes are the image's.
    @Test func servedMountsPrefetchEverything() throws {
        let f = try RemoteFixture("fuse-prefetch")
        defer { f.remove() }
        var opts = f.remote
        opts.prefetch = .all
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: .fuseBlob, remote: opts))
        defer { try? f.runtime.umount(f.mnt) }
        let record = BlobCache(directory: f.dir.file("cache")).paths(key: BlobCache.partialKey(source: f.url)).data
        var present = 0.0
        for _ in 0..<100 where present < 1 {
            present = PopulationRecord.presentFraction(path: record + ".pop") ?? 0
            if present < 1 { usleep(100_000) }
        }
        #expect(present == 1, "\(present * 100) % present after 10 s with --prefetch all; \(f.workerLogs())")
        #expect(TreeFactsLite(f.mnt) == (try f.oracle()))
    }

    /// SIGKILL of the serving process during a parallel cold read of every file: every read gets
    /// the image's bytes or EIO, never other bytes; the supervisor restarts the server on the same
    /// connection (the kernel resends what the dead one had read), and afterwards everything reads.
    @Test func killedServerIsReplacedWithoutWrongBytes() throws {
        let f = try RemoteFixture("fuse-kill")
        defer { f.remove() }
        let expected = try f.oracle()
        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: .fuseBlob, remote: f.remote))
        let supervisor = try #require(out.record?.workerPID)
        let files = expected.entries.keys.filter { expected.entries[$0]!.hasPrefix("mode 100") }.sorted()
        let results = Locked<[String: String]>([:])
        let group = DispatchGroup()
        for part in 0..<4 {
            group.enter()
            Threads.detach {
                defer { group.leave() }
                for (k, p) in files.enumerated() where k % 4 == part {
                    let got = TreeFactsLite.digest(f.mnt + "/" + p)
                    results.withLock { $0[p] = got }
                }
            }
        }
        for _ in 0..<200 where results.get().count < 3 { usleep(2_000) }
        let victims = children(of: supervisor)
        #expect(victims.count == 1)
        for pid in victims { try? Sys.kill(pid, SIGKILL) }
        let doneAtKill = results.get().count
        #expect(doneAtKill < files.count / 2, "the kill lands during the read (\(doneAtKill) of \(files.count) files done)")
        guard group.wait(timeout: .now() + 60) == .success else {
            // A request the dead server had read was never answered: end the connection so the
            // readers get ENOTCONN and the test can clean up.
            Issue.record("readers hung after the server was killed: \(f.workerLogs())")
            for pid in children(of: supervisor) + [supervisor] { try? Sys.kill(pid, SIGKILL) }
            _ = group.wait(timeout: .now() + 10)
            return
        }
        var wrong: [String] = []
        for (p, sum) in results.get() where !sum.hasPrefix("read-error") && !expected.entries[p]!.hasSuffix(" " + sum) { wrong.append(p) }
        #expect(wrong.isEmpty, "wrong bytes in \(wrong.prefix(5))")
        #expect(results.get().count == files.count)
        for _ in 0..<100 where children(of: supervisor) == victims || children(of: supervisor).isEmpty { usleep(20_000) }
        #expect(children(of: supervisor).count == 1 && children(of: supervisor) != victims, "a new server runs")
        #expect(f.workerLogs().contains("restart 1"))
        #expect(TreeFactsLite(f.mnt) == expected, "\(f.workerLogs())")
        try f.runtime.umount(f.mnt)
        #expect(fuseServers(under: f.dir).isEmpty)
    }

    /// The web server down mid-read: a file not yet fetched fails with EIO (never other bytes) and
    /// reads right once the server is back; the mount stays usable throughout.
    @Test(arguments: [Backend.fuseBlob, .fuseErofs])
    func serverDownIsEIOThenRecovers(backend: Backend) throws {
        let f = try RemoteFixture("fuse-down")
        defer { f.remove() }
        let expected = try f.oracle()
        var remote = f.remote
        remote.prepareTimeout = 20
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: backend, remote: remote))
        let files = expected.entries.keys.sorted().filter { expected.entries[$0]!.hasPrefix("mode 100") && $0.hasPrefix("real") }
        func size(_ p: String) -> Int { Int(expected.entries[p]!.split(separator: " ")[3]) ?? 0 }
        let victim = try #require(files.max { size($0) < size($1) })
        f.server.stop()
        // Its metadata was not fetched either: the open may fail already; either way with EIO.
        let fd = open(f.mnt + "/" + victim, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            #expect(errno == EIO, "open of \(victim) with the server down: errno \(errno)")
        } else {
            let down = TreeFactsLite.digest(fd: fd)
            close(fd)
            #expect(down.hasPrefix("read-error") && down.contains("EIO") || down.contains("Input/output"),
                    "\(victim) (\(size(victim)) bytes, never read) with the server down: \(down)")
        }
        try f.server.start()
        #expect(expected.entries[victim]!.hasSuffix(" " + TreeFactsLite.digest(f.mnt + "/" + victim)))
        #expect(TreeFactsLite(f.mnt) == expected, "\(f.workerLogs())")
        try f.runtime.umount(f.mnt)
    }

    /// With its supervisor and server gone, a FUSE mount answers ENOTCONN; status says it is broken
    /// and how to clear it; umount clears it.
    @Test func deadServerIsReportedAndCleared() throws {
        let f = try RemoteFixture("fuse-dead")
        defer { f.remove() }
        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: .fuseErofs, remote: f.remote))
        let supervisor = try #require(out.record?.workerPID)
        let child = children(of: supervisor)
        try Sys.kill(supervisor, SIGKILL)
        for pid in child { try? Sys.kill(pid, SIGKILL) }
        for _ in 0..<100 where Sys.processExists(supervisor) || child.contains(where: Sys.processExists) {
            _ = Sys.reap(supervisor)
            usleep(20_000)
        }
        var st = stat()
        #expect(lstat(f.mnt + "/edge", &st) != 0 && errno == ENOTCONN)
        let status = try #require(try f.runtime.status(f.mnt).first)
        #expect(status.workerAlive == false)
        #expect(status.problems.joined().contains("ENOTCONN") && status.problems.joined().contains("erofs-compat umount"))
        try f.runtime.umount(f.mnt)
        #expect(!currentMounts().contains { $0.hasPrefix(f.dir.path) })
        #expect(f.runtime.state.all().isEmpty)
    }
}

/// fuse-erofs for a user without CAP_SYS_ADMIN (uid 65534 through setpriv), through Debian's setuid
/// fusermount3, with the user's state under $XDG_RUNTIME_DIR.
@Suite(.serialized, .enabled(if: fuseSkipReason == nil && TestEnv.which("setpriv") != nil && fuseHostFindings.isPresent("fuse.fusermount3"),
                             "needs root to set up, setpriv (util-linux) and a setuid fusermount3 (fuse3)"))
struct UnprivilegedFuseTests {
    /// Runs `argv` as uid/gid 65534 with no capabilities and the user's runtime directory.
    static func asNobody(_ dir: ScratchDir, _ argv: [String]) throws -> RunResult {
        var env = ProcessInfo.processInfo.environment
        env["EROFS_COMPAT_STATE_DIR"] = nil
        env["XDG_RUNTIME_DIR"] = dir.file("xdg")
        return try run(TestEnv.which("setpriv")!, ["--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all"] + argv,
                       environment: env)
    }

    /// sha256 of every file under `root`, by relative path, computed as `user` sees them.
    static func sums(_ dir: ScratchDir, _ root: String, asNobody: Bool) throws -> String {
        let script = "cd \(root) && find . -type f -print0 | sort -z | xargs -0 sha256sum"
        let r = asNobody ? try Self.asNobody(dir, ["/bin/sh", "-c", script]) : try run("/bin/sh", ["-c", script])
        #expect(r.status == 0, "\(r.stderr)")
        return r.stdout
    }

    @Test func nobodyMountsReadsAndUnmountsALocalImage() throws {
        let dir = try ScratchDir("fuse-nobody")
        // fusermount3 opens /dev/fuse as the user: where this host keeps it 0600, give it the mode
        // Debian's udev rule gives it (0666) for this test, and put it back after.
        var dev = stat()
        stat("/dev/fuse", &dev)
        if dev.st_mode & 0o006 != 0o006 { chmod("/dev/fuse", 0o666) }
        defer {
            chmod("/dev/fuse", dev.st_mode & 0o7777)
            for m in currentMounts().filter({ $0.hasPrefix(dir.path) }).reversed() { try? MountAPI.umount(m, detach: true) }
            dir.remove()
        }
        chmod(dir.path, 0o755)
        try Samples.makeTree(at: dir.file("tree"))
        for d in ["mnt", "oracle", "xdg"] { try FileManager.default.createDirectory(atPath: dir.file(d), withIntermediateDirectories: false) }
        #expect(try run("/bin/chown", ["-R", "65534:65534", dir.file("tree"), dir.file("mnt"), dir.file("xdg")]).status == 0)
        chmod(dir.file("xdg"), 0o700)
        try Samples.mkfs(dir.file("tree"), dir.file("img.erofs"))
        chmod(dir.file("img.erofs"), 0o644)
        let expected = try withKernelMount(dir.file("img.erofs"), dir.file("oracle")) { try Self.sums(dir, dir.file("oracle"), asNobody: false) }

        let m = try Self.asNobody(dir, [cliBinary, "mount", dir.file("img.erofs"), dir.file("mnt")])
        #expect(m.status == 0 && m.stdout.contains("backend fuse-erofs"), "\(m.stderr)")
        #expect(try Self.sums(dir, dir.file("mnt"), asNobody: true) == expected)
        let st = try Self.asNobody(dir, [cliBinary, "status", dir.file("mnt")])
        #expect(st.status == 0 && st.stdout.contains("fuse-erofs") && st.stdout.contains("health   ok"), "\(st.stdout)\(st.stderr)")
        #expect(FileManager.default.fileExists(atPath: dir.file("xdg/erofs-compat/mounts/") + StateStore.key(for: dir.file("mnt"))))
        let u = try Self.asNobody(dir, [cliBinary, "umount", dir.file("mnt")])
        #expect(u.status == 0, "\(u.stderr)")
        #expect(!currentMounts().contains(dir.file("mnt")))
        for _ in 0..<100 where !fuseServers(under: dir).isEmpty { usleep(20_000) }
        #expect(fuseServers(under: dir).isEmpty)
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: dir.file("xdg/erofs-compat/mounts"))) ?? ["?"]).isEmpty)

        // An image the user cannot read: one line, exit 3, nothing mounted or started.
        chmod(dir.file("img.erofs"), 0o600)
        let refused = try Self.asNobody(dir, [cliBinary, "mount", dir.file("img.erofs"), dir.file("mnt")])
        #expect(refused.status == 3 && refused.stderr.contains("cannot be read"), "\(refused.stderr)")
        #expect(refused.stderr.split(separator: "\n").count == 1)
        #expect(!currentMounts().contains(dir.file("mnt")) && fuseServers(under: dir).isEmpty)
        // A mount that went away behind the user's back (a lazy umount by root) is pruned by the user.
        chmod(dir.file("img.erofs"), 0o644)
        #expect(try Self.asNobody(dir, [cliBinary, "mount", dir.file("img.erofs"), dir.file("mnt")]).status == 0)
        try MountAPI.umount(dir.file("mnt"), detach: true)
        let stale = try Self.asNobody(dir, [cliBinary, "status", "--prune"])
        #expect(stale.status == 0 && stale.stdout.contains("pruned"), "\(stale.stdout)\(stale.stderr)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: dir.file("xdg/erofs-compat/mounts"))) ?? ["?"]).isEmpty)
        for _ in 0..<100 where !fuseServers(under: dir).isEmpty { usleep(20_000) }
        #expect(fuseServers(under: dir).isEmpty)
        // Root's mounts are not the user's to unmount.
        #expect(try Self.asNobody(dir, [cliBinary, "umount", dir.file("oracle")]).status == 5)
    }
}

/// `--backend nbd` on a host the probe finds without the NBD driver is refused naming it, leaving
/// nothing; where the driver is present, the mount shows the image's bytes and umount frees the device.
@Suite(.serialized, .enabled(if: TestEnv.isRoot && TestEnv.which("mkfs.erofs") != nil, "needs root and mkfs.erofs"))
struct NbdBackendTests {
    @Test func nbdMountsOrIsRefusedNamingTheDriver() throws {
        let f = try LocalFixture("nbd-backend")
        defer { f.remove() }
        let (dir, runtime) = (f.dir, f.runtime)
        try Samples.makeTree(at: dir.file("tree"))
        try Samples.mkfs(dir.file("tree"), dir.file("img"), ["-zlz4hc"])
        try FileManager.default.createDirectory(atPath: dir.file("mnt"), withIntermediateDirectories: false)
        let plan = try runtime.mount(MountRequest(source: dir.file("img"), mountpoint: dir.file("mnt"), dryRun: true)).plan
        let nbd = try #require(plan.candidates.first { $0.backend == .nbd })
        let request = MountRequest(source: dir.file("img"), mountpoint: dir.file("mnt"), backend: .nbd)
        guard nbd.verdict == .viable else {
            #expect(nbd.reasons.joined().contains("nbd driver"), "\(nbd.reasons)")
            do {
                _ = try runtime.mount(request)
                Issue.record("mounted with nbd although the planner rejected it")
            } catch let e as RuntimeError {
                #expect(e.description.contains("nbd driver"), "\(e)")
            }
            #expect(!currentMounts().contains(dir.file("mnt")) && runtime.state.all().isEmpty)
            return
        }
        let out = try runtime.mount(request)
        #expect(out.record?.device?.hasPrefix("/dev/nbd") == true)
        #expect(Samples.compare(dir.file("tree"), dir.file("mnt")).isEmpty)
        try runtime.umount(dir.file("mnt"))
        #expect(!currentMounts().contains(dir.file("mnt")) && runtime.state.all().isEmpty)
    }
}
