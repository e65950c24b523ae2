import Foundation
import Glibc
import Testing
@testable import EROFS
@testable import Probe
@testable import Remote
@testable import Runtime
import Syscall
import TestSupport

/// What the probe says of this host's fanotify and EROFS, as the planner sees it: the lazy-mount
/// tests gate on these findings, not on the machine they run on (the same suite runs on kernels
/// without pre-content fanotify and skips them, naming what is missing).
let lazyHostFindings = hostFindings([FanotifyChecks.run, EROFSChecks.planning])

/// Why an image cannot be served over HTTP here with the kernel's own mount of it as the oracle
/// (`RemoteFixture`), or nil.
let remoteFixtureMissing: String? = TestEnv.isRoot && TestEnv.which("mkfs.erofs") != nil && NginxServer.available ? nil
    : "needs root, mkfs.erofs and nginx (Debian nginx-light) to serve an image over HTTP"

/// Why lazy fanotify mounts over HTTP cannot be tested here, or nil.
let lazyMountMissing: String? = {
    if let missing = remoteFixtureMissing { return missing }
    return firstMissing([("fanotify.pre_access", "fanotify pre-content events (FAN_PRE_ACCESS, Linux 6.14+)"),
                         ("fanotify.deny_errno", "FAN_DENY_ERRNO (Linux 6.14+)"),
                         ("erofs.file_backed", "file-backed EROFS mounts (Linux 6.12+), which mount the cache file")],
                        in: lazyHostFindings, "lazy fanotify mounts cannot run here")
}()
let remoteReason = lazyMountMissing ?? ""
let canMountRemote = lazyMountMissing == nil

/// An image served by nginx, a private state and cache directory, and the kernel's view of the
/// same image mounted locally as the oracle.
struct RemoteFixture {
    let server: NginxServer
    let dir: ScratchDir
    let runtime: Runtime
    var url: String { server.base + "/img.erofs" }
    var mnt: String { dir.file("mnt") }
    var remote: RemoteOptions { RemoteOptions(cacheDir: dir.file("cache")) }

    /// `build` makes the tree to serve (default: the reader's edge and real trees, lz4hc).
    init(_ label: String, mkfs: [String] = ["-zlz4hc"], build: ((String) throws -> Void)? = nil) throws {
        server = try NginxServer()
        do { dir = try ScratchDir(label) } catch { server.remove(); throw error }
        // A fixture that cannot be built leaves nothing behind: no nginx, no directory.
        do {
            if let build {
                try build(dir.file("tree"))
            } else {
                try ReaderTrees.makeEdge(at: dir.file("tree/edge"))
                try ReaderTrees.makeReal(at: dir.file("tree/real"), budget: 3 << 20)
            }
            try Samples.mkfs(dir.file("tree"), server.root + "/img.erofs", mkfs)
            for d in ["mnt", "mnt2", "oracle"] {
                try FileManager.default.createDirectory(atPath: dir.file(d), withIntermediateDirectories: true)
            }
        } catch {
            server.remove()
            dir.remove()
            throw error
        }
        runtime = Runtime(state: StateStore(root: dir.file("state")))
        Runtime.workerExecutable = cliBinary
    }

    /// Every file of the image as the kernel shows it from the complete local image.
    func oracle() throws -> TreeFactsLite {
        try withKernelMount(server.root + "/img.erofs", dir.file("oracle")) { TreeFactsLite(dir.file("oracle")) }
    }

    /// The workers' logs (for failure messages).
    func workerLogs() -> String {
        let d = dir.file("state/workers")
        return ((try? FileManager.default.contentsOfDirectory(atPath: d)) ?? []).filter { $0.hasSuffix(".log") }.sorted()
            .map { (try? String(contentsOfFile: d + "/" + $0, encoding: .utf8)) ?? "" }.joined()
    }

    func remove() {
        for m in currentMounts().filter({ $0.hasPrefix(dir.path) }).reversed() { try? MountAPI.umount(m, detach: true) }
        for r in runtime.state.all() { if let pid = r.workerPID { try? Sys.kill(pid, SIGKILL) } }
        server.remove()
        dir.remove()
    }
}

/// Names, types, sizes and full contents (a read error is recorded as such, never as bytes).
struct TreeFactsLite: Equatable {
    var entries: [String: String] = [:]
    init(_ root: String) {
        for p in (FileManager.default.subpaths(atPath: root) ?? []).sorted() {
            var st = stat()
            lstat(root + "/" + p, &st)
            var d = "mode \(String(st.st_mode, radix: 8))"
            if st.st_mode & S_IFMT == S_IFREG { d += " " + Self.digest(root + "/" + p) }
            entries[p] = d
        }
    }
    static func digest(_ path: String) -> String {
        guard let fd = try? Sys.open(path, O_RDONLY) else { return "open-error" }
        defer { Sys.close(fd.rawValue) }
        return digest(fd: fd.rawValue)
    }

    static func digest(fd: Int32) -> String {
        var h: UInt64 = 1469598103934665603
        var pos: Int64 = 0
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n: Int
            do { n = try buf.withUnsafeMutableBytes { try Sys.pread(fd, into: $0, at: pos) } } catch { return "read-error \(error)" }
            if n == 0 { break }
            for b in buf[0..<n] { h = (h ^ UInt64(b)) &* 1099511628211 }
            pos += Int64(n)
        }
        return "size \(pos) sum \(h)"
    }
}

func workerRunning(_ pid: Int32?) -> Bool {
    guard let pid else { return false }
    _ = Sys.reap(pid)
    return Sys.processExists(pid)
}

@Suite(.serialized, .enabled(if: canMountRemote, Comment(rawValue: remoteReason)))
struct RemoteMountTests {
    @Test func coldLazyMountServesEveryByte() throws {
        let f = try RemoteFixture("lazy")
        defer { f.remove() }
        let expected = try f.oracle()
        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote))
        let rec = try #require(out.record)
        #expect(rec.backend == "fanotify")
        #expect(workerRunning(rec.workerPID))
        // Right after mounting, the metadata the supervisor fetched is already in the figures.
        let first = try #require(try f.runtime.status().first?.progress)
        #expect(first.bytesFetched > 0 && first.requests > 0 && first.population > 0, "\(first)")
        usleep(600_000)
        let before = try #require(try f.runtime.status().first?.progress)
        #expect(before.population < 100, "only metadata before reading")
        #expect(before.bytesFetched >= first.bytesFetched && before.requests >= first.requests)
        let got = TreeFactsLite(f.mnt)
        #expect(got == expected, "\(Set(got.entries.map { "\($0.key) \($0.value)" }).symmetricDifference(expected.entries.map { "\($0.key) \($0.value)" }).prefix(4))")
        usleep(600_000)
        let after = try #require(try f.runtime.status().first?.progress)
        #expect(after.events > 0 && after.denied == 0)
        try f.runtime.umount(f.mnt)
        for _ in 0..<50 where workerRunning(rec.workerPID) { usleep(100_000) }
        #expect(!workerRunning(rec.workerPID), "worker exits with its mount")
        #expect(f.runtime.state.all().isEmpty)
    }

    /// Readahead: a read that continues no stream fetches little beyond itself; a sequential reader
    /// has the data after it fetched before it asks; every byte read is the source's.
    @Test func readaheadFollowsSequentialReadersOnly() throws {
        let big = [UInt8]((0..<(24 << 20)).map { i in UInt8(truncatingIfNeeded: (i &* 2_654_435_761) >> 13) })
        let f = try RemoteFixture("readahead", mkfs: []) { tree in
            try FileManager.default.createDirectory(atPath: tree, withIntermediateDirectories: true)
            try Data(big).write(to: URL(fileURLWithPath: tree + "/big.bin"))
        }
        defer { f.remove() }
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote))
        defer { try? f.runtime.umount(f.mnt) }
        func fetched() throws -> UInt64 { try #require(try f.runtime.status().first?.progress).bytesFetched }
        /// Waits (up to 5 s) for the worker's figures (written within 0.1 s of a change) to reach
        /// `atLeast` bytes and then hold still for 0.75 s.
        func settle(atLeast: UInt64 = 0) throws -> UInt64 {
            var last = try fetched(), still = 0
            for _ in 0..<20 where still < 3 {
                usleep(250_000)
                let now = try fetched()
                still = now >= atLeast && now == last ? still + 1 : 0
                last = now
            }
            return last
        }
        let meta = try settle()
        let fd = try Sys.open(f.mnt + "/big.bin", O_RDONLY)
        defer { Sys.close(fd.rawValue) }
        _ = posix_fadvise(fd.rawValue, 0, 0, POSIX_FADV_RANDOM)
        // One random 4 KiB read: the worker fetches its range and a small readahead, not megabytes.
        let at = 12 << 20 + 12_345
        #expect(try Sys.preadFully(fd.rawValue, count: 4096, at: Int64(at)) == Array(big[at..<at + 4096]))
        let afterRandom = try settle()
        #expect(afterRandom - meta <= 512 << 10, "a random 4 KiB read fetched \(afterRandom - meta) bytes")
        // Sequential reads of the first 4 MiB: the worker runs ahead of the reader.
        _ = posix_fadvise(fd.rawValue, 0, 0, POSIX_FADV_SEQUENTIAL)
        var pos = 0
        while pos < 4 << 20 {
            let chunk = try Sys.preadFully(fd.rawValue, count: 256 << 10, at: Int64(pos))
            try #require(chunk == Array(big[pos..<pos + chunk.count]), "bytes at \(pos)")
            pos += chunk.count
        }
        let ahead = try settle(atLeast: afterRandom + (5 << 20))
        #expect(ahead >= afterRandom + (5 << 20), "read 4 MiB sequentially; fetched \(ahead - afterRandom) bytes")
        // The rest of the file, through the page cache as any reader would.
        let all = try Sys.preadFully(fd.rawValue, count: big.count, at: 0)
        #expect(all == big)
        #expect(try #require(try f.runtime.status().first?.progress).denied == 0)
    }

    /// The server goes away mid-way: unfetched ranges fail with EIO, never zeros; fetched data
    /// stays readable; when the server is back the same reads succeed.
    @Test func serverDownMeansEIONotZeros() throws {
        let f = try RemoteFixture("down")
        defer { f.remove() }
        let expected = try f.oracle()
        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote))
        defer { try? f.runtime.umount(f.mnt) }
        let first = "edge/sizes/r4096"
        #expect(TreeFactsLite.digest(f.mnt + "/" + first) == expected.entries[first]!.split(separator: " ", maxSplits: 2).last.map(String.init))
        f.server.stop()
        var eio = 0, correct = 0
        // Each failing read costs the worker's retries (about 3 s): sample the files.
        for (path, facts) in expected.entries.sorted(by: { $0.key < $1.key }) where facts.contains("size") {
            if eio >= 4 { break }
            let got = TreeFactsLite.digest(f.mnt + "/" + path)
            if got.hasPrefix("read-error") {
                #expect(got.contains("I/O error") || got.contains("EIO") || got.contains("Input/output"), "\(path): \(got)")
                eio += 1
            } else {
                #expect(facts.hasSuffix(got), "\(path): wrong bytes while the server was down")
                correct += 1
            }
        }
        #expect(eio > 0, "some unfetched file failed with EIO")
        try f.server.start()
        #expect(TreeFactsLite(f.mnt) == expected, "after the server returned")
        _ = out
    }

    @Test func serverWithoutRangeIsRefusedOrDownloadedWhole() throws {
        let f = try RemoteFixture("norange")
        defer { f.remove() }
        let url = f.server.base + "/norange/img.erofs"
        do {
            _ = try f.runtime.mount(MountRequest(source: url, mountpoint: f.mnt, remote: f.remote))
            Issue.record("a server without Range support was accepted")
        } catch let e as RuntimeError {
            #expect(e.exitCode == .badSource)
            #expect(e.description.contains("--allow-full-download"))
        }
        #expect(!currentMounts().contains(f.mnt))
        var opts = f.remote
        opts.allowFullDownload = true
        let out = try f.runtime.mount(MountRequest(source: url, mountpoint: f.mnt, remote: opts))
        #expect(out.record?.backend == "file")
        #expect(TreeFactsLite(f.mnt) == (try f.oracle()))
        try f.runtime.umount(f.mnt)
    }

    @Test func wrongDigestFailsLoudly() throws {
        let f = try RemoteFixture("digest")
        defer { f.remove() }
        var opts = f.remote
        opts.digest = String(repeating: "ab", count: 32)
        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: opts))
        defer { try? f.runtime.umount(f.mnt) }
        _ = TreeFactsLite(f.mnt)  // reads everything, completing the cache
        var status: MountStatus?
        for _ in 0..<40 {
            usleep(250_000)
            status = try f.runtime.status().first
            if status?.progress?.verified != nil { break }
        }
        #expect(status?.progress?.verified == false)
        #expect(status?.stale == true)
        #expect(!FileManager.default.fileExists(atPath: out.record!.cachePath!), "the cache entry is discarded")
    }

    /// --record-profile writes the ranges readers used; --prefetch PROFILE fetches them before anyone
    /// asks (the same reads are then answered from the cache); --prefetch all completes the cache in
    /// the background; a bad profile is refused before anything starts.
    @Test func prefetchAndProfiles() throws {
        let f = try RemoteFixture("prefetch")
        defer { f.remove() }
        let expected = try f.oracle()
        func size(_ p: String) -> Int { Int(expected.entries[p]!.split(separator: " ").drop { $0 != "size" }.dropFirst().first ?? "0") ?? 0 }
        let picks = expected.entries.filter { $0.value.contains("size") }.map(\.key).sorted { size($0) > size($1) }.prefix(3)
        let profile = f.dir.file("profile.txt")
        var opts = f.remote
        opts.recordProfile = profile
        let first = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: opts))
        for p in picks { #expect(expected.entries[p]!.hasSuffix(TreeFactsLite.digest(f.mnt + "/" + p))) }
        try f.runtime.umount(f.mnt)
        // The serving worker writes the profile every 250 ms and when it exits after the umount.
        for _ in 0..<50 where workerRunning(first.record?.workerPID) || !FileManager.default.fileExists(atPath: profile) { usleep(100_000) }
        let ranges = try PrefetchProfile.load(profile)
        #expect(!ranges.isEmpty)

        func waitForProgress(_ until: (FanotifyServer.Stats) -> Bool) -> FanotifyServer.Stats? {
            for _ in 0..<200 {
                if let p = try? f.runtime.status().first?.progress, until(p) { return p }
                usleep(100_000)
            }
            return try? f.runtime.status().first?.progress
        }
        opts = RemoteOptions(cacheDir: f.dir.file("cache2"), prefetch: .profile(profile))
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: opts))
        var last: UInt64 = 0
        _ = waitForProgress { p in defer { last = p.bytesFetched }; return p.bytesFetched > 0 && p.bytesFetched == last }
        for p in picks { #expect(expected.entries[p]!.hasSuffix(TreeFactsLite.digest(f.mnt + "/" + p))) }
        // Settled figures: every event counted has been answered (the figures are written as they change).
        let after = try #require(waitForProgress { $0.events > 0 && $0.events == $0.allowedFromCache + $0.fetched + $0.denied })
        #expect(after.fetched == 0 && after.allowedFromCache > 0, "profiled reads came from the cache: \(after)")
        try f.runtime.umount(f.mnt)

        let digest = String(try run("/usr/bin/sha256sum", [f.server.root + "/img.erofs"]).stdout.prefix(64))
        opts = RemoteOptions(cacheDir: f.dir.file("cache3"), digest: digest, prefetch: .all)
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: opts))
        let done = waitForProgress { $0.complete }
        #expect(done?.complete == true && done?.verified == true, "background prefetch completed and verified: \(String(describing: done))")
        #expect(TreeFactsLite(f.mnt) == expected)
        try f.runtime.umount(f.mnt)

        try "not a profile\n".write(toFile: f.dir.file("bad.txt"), atomically: false, encoding: .utf8)
        for bad in [f.dir.file("bad.txt"), f.dir.file("missing.txt")] {
            #expect(throws: RuntimeError.self) {
                try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: RemoteOptions(cacheDir: f.dir.file("cache4"), prefetch: .profile(bad))))
            }
        }
        #expect(f.runtime.state.all().isEmpty && currentMounts().filter { $0.hasPrefix(f.dir.path) }.isEmpty)
    }

    /// One writer per cache entry: a second tool instance (another state directory) cannot fill the
    /// same entry concurrently; it is told why, and nothing is left behind.
    @Test func cacheEntryHasOneWriter() throws {
        let f = try RemoteFixture("onewriter")
        defer { f.remove() }
        let a = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote))
        let other = Runtime(state: StateStore(root: f.dir.file("state-other")))
        for backend in [Backend?.none, .file] {
            do {
                _ = try other.mount(MountRequest(source: f.url, mountpoint: f.dir.file("mnt2"), backend: backend, remote: f.remote))
                Issue.record("a second writer was allowed (\(String(describing: backend)))")
            } catch let e as RuntimeError {
                #expect(e.description.contains("being filled by another erofs-compat process"), "\(e)")
            }
        }
        #expect(other.state.all().isEmpty && !currentMounts().contains(f.dir.file("mnt2")))
        #expect(CacheManager(directory: f.dir.file("cache"), runtime: other).entries().first?.usedBy.isEmpty == false, "seen as in use")
        try f.runtime.umount(f.mnt)
        for _ in 0..<50 where workerRunning(a.record?.workerPID) { usleep(100_000) }
        _ = try other.mount(MountRequest(source: f.url, mountpoint: f.dir.file("mnt2"), remote: f.remote))
        #expect(TreeFactsLite(f.dir.file("mnt2")) == (try f.oracle()))
        try other.umount(f.dir.file("mnt2"))
    }

    /// `umount --lazy` while a file is open: the worker keeps serving it (correct bytes, never zeros)
    /// and exits once the file is closed and the superblock is gone.
    @Test func lazyUmountKeepsServingOpenFiles() throws {
        let f = try RemoteFixture("lazyumount")
        defer { f.remove() }
        let expected = try f.oracle()
        func size(_ p: String) -> Int { Int(expected.entries[p]!.split(separator: " ").drop { $0 != "size" }.dropFirst().first ?? "0") ?? 0 }
        let big = try #require(expected.entries.filter { $0.value.contains("size") }.map(\.key).max { size($0) < size($1) })
        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote))
        let supervisor = try #require(out.record?.workerPID)
        // The serving worker must have seen the mount (it watches each mount's superblock from then on):
        // wait for its first progress report, then one mountinfo poll period.
        for _ in 0..<100 where (try? f.runtime.status().first?.progress) == nil { usleep(50_000) }
        usleep(1_200_000)
        let fd = try Sys.open(f.mnt + "/" + big, O_RDONLY)
        try f.runtime.umount(f.mnt, lazy: true)
        #expect(!currentMounts().contains(f.mnt) && f.runtime.state.all().isEmpty)
        usleep(2_500_000)
        #expect(workerRunning(supervisor), "the worker outlives a lazy umount while a file is open")
        #expect(expected.entries[big]!.hasSuffix(TreeFactsLite.digest(fd: fd.rawValue)), "\(big) read after the lazy umount")
        Sys.close(fd.rawValue)
        for _ in 0..<100 where workerRunning(supervisor) { usleep(100_000) }
        #expect(!workerRunning(supervisor), "the worker exits once the superblock is gone")
    }

    @Test func twoMountsOfOneBlobShareTheWorker() throws {
        let f = try RemoteFixture("shared")
        defer { f.remove() }
        let a = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote))
        let b = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.dir.file("mnt2"), remote: f.remote))
        #expect(a.record?.workerPID == b.record?.workerPID)
        try f.runtime.umount(f.mnt)
        usleep(300_000)
        #expect(workerRunning(b.record?.workerPID), "the second mount still has its worker")
        #expect(TreeFactsLite(f.dir.file("mnt2")) == (try f.oracle()))
        try f.runtime.umount(f.dir.file("mnt2"))
        for _ in 0..<50 where workerRunning(b.record?.workerPID) { usleep(100_000) }
        #expect(!workerRunning(b.record?.workerPID))
    }
}

@Suite(.serialized, .enabled(if: canMountRemote, Comment(rawValue: remoteReason)))
struct CacheCommandTests {
    @Test func lsVerifyPruneNeverTouchABlobInUse() throws {
        let f = try RemoteFixture("cachecmd")
        defer { f.remove() }
        let digest = String(try run("/usr/bin/sha256sum", [f.server.root + "/img.erofs"]).stdout.prefix(64))
        var opts = f.remote
        opts.digest = digest
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: opts))
        let manager = CacheManager(directory: opts.cacheDir, runtime: f.runtime)
        var entries = manager.entries()
        let partial = BlobCache.partialKey(source: f.url)
        #expect(entries.count == 1)
        #expect(entries.first?.key == partial, "filled under its source, not its digest")
        #expect(entries.first?.usedBy == [f.mnt])
        #expect((entries.first?.presentPercent ?? 100) < 100)
        #expect(try manager.verify().map(\.1) == [.incomplete], "a partial entry is reported unverified")
        #expect(try manager.prune(maxSize: 0).isEmpty, "a blob in use is never pruned")
        _ = TreeFactsLite(f.mnt)
        for _ in 0..<50 where manager.entries().count < 2 { usleep(100_000) }
        // Complete and verified: linked under its digest too (one file), both in use.
        entries = manager.entries()
        #expect(Set(entries.map(\.key)) == [partial, digest])
        #expect(entries.allSatisfy { $0.presentPercent == 100 && $0.usedBy == [f.mnt] && $0.info?.verified == true })
        #expect(try manager.verify().map(\.1) == [.ok, .ok])
        #expect(try manager.prune(maxSize: 0).isEmpty, "a blob in use is never pruned, under either name")
        try f.runtime.umount(f.mnt)
        usleep(300_000)
        let removed = try manager.prune(maxSize: nil)
        #expect(Set(removed.map(\.key)) == [partial, digest])
        #expect(manager.entries().isEmpty)
        #expect(CacheManager.parseSize("10G") == 10 << 30 && CacheManager.parseSize("x") == nil)
    }
}
