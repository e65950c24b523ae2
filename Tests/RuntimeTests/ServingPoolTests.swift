import Dispatch
import FUSE
import Foundation
import Glibc
@testable import Runtime
import Syscall
import Testing
import TestSupport

/// The threads lazy servers share: bounded, per-server limits, demand before background, idle
/// threads ending, periodic tasks. No root, no kernel features.
@Suite struct ServingPoolTests {
    /// Runs `jobs` jobs of `ms` each through `submit` and returns the most that ran at once.
    func peakConcurrency(jobs: Int, ms: UInt32, _ submit: (@escaping () -> Void) -> Void) -> Int {
        let now = Locked(0), peak = Locked(0)
        let done = DispatchSemaphore(value: 0)
        for _ in 0..<jobs {
            submit {
                let n = now.withLock { $0 += 1; return $0 }
                peak.withLock { $0 = max($0, n) }
                usleep(ms * 1000)
                now.withLock { $0 -= 1 }
                done.signal()
            }
        }
        for _ in 0..<jobs { done.wait() }
        return peak.get()
    }

    @Test func poolIsBoundedAndIdleThreadsEnd() {
        let pool = ServingPool(maxThreads: 4, idleSeconds: 1)
        let peak = peakConcurrency(jobs: 20, ms: 30) { job in pool.submit(.demand, job) }
        #expect(peak == 4, "peak \(peak)")
        #expect(pool.threadCount <= 4)
        for _ in 0..<40 where pool.threadCount > 0 { usleep(100_000) }
        #expect(pool.threadCount == 0, "idle threads left: \(pool.threadCount)")
    }

    @Test func laneLimitsOneServer() {
        let pool = ServingPool(maxThreads: 16, idleSeconds: 1)
        let lane = PoolLane(limit: 3, priority: .demand, pool: pool)
        let peak = peakConcurrency(jobs: 12, ms: 30) { job in lane.submit(job) }
        #expect(peak == 3, "peak \(peak)")
        lane.waitIdle()
        #expect(lane.pending == 0)
    }

    @Test func demandRunsBeforeBackground() {
        let pool = ServingPool(maxThreads: 1, idleSeconds: 1)
        let order = Locked<[String]>([])
        let gate = DispatchSemaphore(value: 0), done = DispatchSemaphore(value: 0)
        pool.submit(.demand) { gate.wait() }
        pool.submit(.background) { order.withLock { $0.append("background") }; done.signal() }
        pool.submit(.demand) { order.withLock { $0.append("demand") }; done.signal() }
        gate.signal()
        done.wait(); done.wait()
        #expect(order.get() == ["demand", "background"])
    }

    @Test func tickerRunsUntilFalseAndRemoveWaits() {
        let ticker = ServingTicker(pool: ServingPool(maxThreads: 4, idleSeconds: 1))
        let runs = Locked(0)
        ticker.every(10) { runs.withLock { $0 += 1; return $0 } < 3 }
        let inside = Locked(false), finished = Locked(false)
        let slow = ticker.every(10) {
            inside.set(true)
            usleep(200_000)
            finished.set(true)
            return true
        }
        for _ in 0..<100 where !inside.get() { usleep(10_000) }
        ticker.remove(slow)
        #expect(finished.get(), "remove returned while the task ran")
        usleep(200_000)
        #expect(runs.get() == 3)
    }
}

/// `__serve` is told everything through its spec, yet `umount` must still recognise a recorded pid
/// as the server of its mount from the command line alone (the pid may since be another process's).
@Suite struct ServeSpecTests {
    @Test func umountRecognisesTheServerItStarted() throws {
        let blob = BlobSpec(url: "http://127.0.0.1:1/i.erofs", size: 4096, cacheDir: "/c", entry: "/c/blobs/sha256/e")
        var serve = ServeSpec(frontend: .fanotify, filesystem: .blob, source: blob.url, mountpoint: "/mnt",
                              statsPath: "/s", blob: blob)
        serve.credentials = Array("secret".utf8)
        let spec = LazyWorker.Options(serve: serve)
        let argv = ["/usr/bin/erofs-compat"] + LazyWorker.serveArguments(spec, specFD: 7)
        #expect(Runtime.isServeCommandLine(argv, serving: "/c/blobs/sha256/e"))
        #expect(!Runtime.isServeCommandLine(argv, serving: "/c/blobs/sha256/other"))
        #expect(!Runtime.isServeCommandLine(["/usr/bin/sleep", "30"], serving: "/c/blobs/sha256/e"))
        // Nothing of the spec but the cache file's path is on the command line.
        #expect(!argv.contains(blob.url) && !argv.contains("/mnt") && !argv.joined().contains("secret"))
    }

    /// What the daemon writes beside a hosted mount has no secrets; a fanotify spec an earlier
    /// version wrote (its own shape) is still read, with the fd-store names it used.
    @Test func hostedSpecsKeepNoSecretsAndOldOnesAreRead() throws {
        let dir = try ScratchDir("hosted-spec")
        defer { dir.remove() }
        var serve = ServeSpec(frontend: .fuse, filesystem: .erofs, source: "oci://r/x", mountpoint: "/m",
                              statsPath: "/s",
                              remote: RemoteOptions(oci: OCIOptions(username: "u", password: "pw")))
        serve.credentials = Array("token".utf8)
        let text = String(decoding: try JSONEncoder().encode(serve.stored), as: UTF8.self)
        #expect(!text.contains("pw") && !text.contains("credentials") && !text.contains("\"u\""), "\(text)")
        let old = """
            {"id":"0a1b2c3d4e5f","url":"http://127.0.0.1:9/img.erofs","dataPath":"/c/blobs/sha256/ab",
             "recordPath":"/c/blobs/sha256/ab.pop","mountpoint":"/mnt/x","statsPath":"/st/workers/mnt-x",
             "digest":null,"prefetch":"all","size":8192,"etag":"\\"e1\\"","lastModified":null}
            """
        try old.write(toFile: dir.file("old.spec"), atomically: true, encoding: .utf8)
        let read = try #require(ServeSpec.readHosted(dir.file("old.spec")))
        #expect(read.frontend == .fanotify && read.hostID == "0a1b2c3d4e5f" && read.mountpoint == "/mnt/x")
        #expect(read.blob?.entry == "/c/blobs/sha256/ab" && read.blob?.cacheDir == "/c" && read.blob?.size == 8192)
        #expect(read.blob?.prefetch == .all && read.blob?.etag == "\"e1\"")
        #expect(read.fdName("g") == "lazy-0a1b2c3d4e5f-g" && ServeSpec.parseFDName("lazy-0a1b2c3d4e5f-g")?.kind == "g")
    }
}

/// A served mount's stats file: the FUSE server's figures where they always were (top level, as
/// earlier versions read them) and the lazy reader's under `lazy`.
@Suite struct ServedStatsTests {
    @Test func fuseFiguresStayFlatAndTheReaderSitsBeside() throws {
        var fuse = FUSEStats()
        (fuse.requests, fuse.reads, fuse.readBytes, fuse.kernelMinor) = (12, 5, 4096, 45)
        var lazy = LazyFigures()
        (lazy.bytesFetched, lazy.requests, lazy.population, lazy.complete) = (65536, 2, 12.5, false)
        let data = try ServedStats.encode(lazy: lazy, fuse: fuse)
        #expect(try JSONDecoder().decode(FUSEStats.self, from: data) == fuse)
        #expect(ServedStats.lazyFigures(data) == lazy)
        let object = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(object["reads"] as? Int == 5 && object["lazy"] is [String: Any], "\(object)")
        // A file an earlier version wrote (FUSEStats alone) still reads; it has no reader part.
        let old = try JSONEncoder().encode(fuse)
        #expect(try JSONDecoder().decode(FUSEStats.self, from: old) == fuse && ServedStats.lazyFigures(old) == nil)
    }
}
