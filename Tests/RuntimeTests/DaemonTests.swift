import Dispatch
import Foundation
import Glibc
import Remote
import Testing
@testable import Runtime
import Syscall
import TestSupport

/// `erofs-compat daemon` started by hand (its keeper and the daemon child), with its own state
/// directory; stopped and reaped by `stop()` / `kill()`.
final class DaemonProcess {
    let keeper: Int32
    let state: String
    let log: String
    var socket: String { state + "/daemon.sock" }

    init(state: String) throws {
        self.state = state
        log = state + "-daemon.log"
        var env = ProcessInfo.processInfo.environment
        env["EROFS_COMPAT_STATE_DIR"] = state
        env["NOTIFY_SOCKET"] = nil
        keeper = try Sys.spawnDetached(cliBinary, ["daemon"], keep: [], logPath: log, environment: env)
        for _ in 0..<200 {
            if let fd = try? Sys.unixConnect(socket) {
                Sys.close(fd)
                if child() != nil { return }
            }
            usleep(50_000)
        }
        kill()
        throw RuntimeError.state("the daemon did not listen on \(socket) within 10 s: \(logText())")
    }

    /// The serving daemon (the keeper's child).
    func child() -> Int32? {
        (try? String(contentsOfFile: "/proc/\(keeper)/task/\(keeper)/children", encoding: .utf8))?
            .split(separator: " ").first.flatMap { Int32($0) }
    }

    func logText() -> String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

    /// SIGTERM to the keeper; its exit status (nil: still running after 20 s, then killed).
    @discardableResult
    func stop() -> Int32? {
        _ = Glibc.kill(keeper, SIGTERM)
        for _ in 0..<400 {
            var status: Int32 = 0
            if waitpid(keeper, &status, WNOHANG) == keeper { return (status >> 8) & 0xff }
            usleep(50_000)
        }
        kill()
        return nil
    }

    func kill() {
        if let c = child() { _ = Glibc.kill(c, SIGKILL) }
        _ = Glibc.kill(keeper, SIGKILL)
        var status: Int32 = 0
        _ = waitpid(keeper, &status, 0)
        try? FileManager.default.removeItem(atPath: log)
    }
}

/// systemd runs this host (its notify socket directory exists), so `systemd-run` can start the daemon
/// as a service with an fd store.
let systemdRuns = access("/run/systemd/system", F_OK) == 0 && TestEnv.which("systemd-run") != nil
let systemdReason = "needs systemd as PID 1 (here PID 1 is \((try? String(contentsOfFile: "/proc/1/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "unknown")), for the service's fd store"

/// `mount` through a running daemon: CLI in, lazy serving in the daemon's threads, the fanotify group
/// in the keeper's fd store across a crash, and a hand-over to supervisors on a clean stop.
@Suite(.serialized, .enabled(if: canInjectFaults, Comment(rawValue: faultReason)))
struct DaemonTests {
    /// Runs the CLI with this state directory (killed after 60 s: a hang fails the test, not the suite).
    func cli(_ state: String, _ args: [String]) throws -> RunResult {
        var env = ProcessInfo.processInfo.environment
        env["EROFS_COMPAT_STATE_DIR"] = state
        let r = try Sys.run(cliBinary, args, input: [], environment: env, timeoutMs: 60_000)
        return RunResult(status: r.status ?? -1, stdout: String(decoding: r.stdout, as: UTF8.self), stderr: String(decoding: r.stderr, as: UTF8.self))
    }

    /// A fixture with a daemon of its own (state directory in the fixture), its image mounted with the
    /// CLI, which hands the mount to the daemon — through a fault proxy when `proxied`; everything is
    /// stopped and removed afterwards.
    func withDaemonMount(_ label: String, proxied: Bool = false, args: [String] = [],
                         _ body: (RemoteFixture, DaemonProcess, TreeFactsLite, FaultProxy?) throws -> Void) throws {
        let f = try RemoteFixture(label)
        defer { f.remove() }
        let proxy = proxied ? try FaultProxy(upstream: f.server.base) : nil
        defer { proxy?.remove() }
        let daemon = try DaemonProcess(state: f.runtime.state.root)
        defer { daemon.kill() }
        let expected = try f.oracle()
        let r = try cli(f.runtime.state.root, ["mount", "--cache-dir", f.remote.cacheDir] + args
                        + [(proxy?.base ?? f.server.base) + "/img.erofs", f.mnt])
        try #require(r.status == 0 && r.stdout.contains("served by the daemon"), Comment(rawValue: r.stdout + r.stderr + daemon.logText()))
        try body(f, daemon, expected, proxy)
    }

    /// A parallel cold read of every file, each data request held back 0.1 s by the proxy, while the
    /// daemon is SIGKILLed `kills` times: every reader gets the image's bytes, everything reads after,
    /// and the record follows the restarted daemon. Returns the daemon's log.
    func readWhileKillingTheDaemon(_ f: RemoteFixture, _ daemon: DaemonProcess, _ expected: TreeFactsLite,
                                   _ proxy: FaultProxy, kills: Int, everyMicros: UInt32) throws -> String {
        try proxy.set("{\"fault\":\"stall\",\"seconds\":0.1,\"every\":1,\"match\":\"/img.erofs\"}")
        let files = expected.entries.filter { $0.value.contains("size") }.map(\.key).sorted()
        var killed = 0
        let results = parallelRead(f.mnt, files) {
            for _ in 0..<kills {
                usleep(everyMicros)
                if let c = daemon.child() {
                    _ = Glibc.kill(c, SIGKILL)
                    killed += 1
                }
            }
        }
        #expect(killed > 0)
        for p in files {
            let got = results[p] ?? "missing"
            #expect(expected.entries[p]!.hasSuffix(got), "\(p): \(got)")
        }
        try proxy.set("{}")
        #expect(TreeFactsLite(f.mnt) == expected)
        // The record follows the restarted daemon.
        var follows = false
        for _ in 0..<40 where !follows {
            follows = f.runtime.state.load(f.mnt)?.workerPID == daemon.child()
            if !follows { usleep(50_000) }
        }
        #expect(follows)
        return daemon.logText()
    }

    func specs(_ state: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: state + "/workers")) ?? []).filter { $0.hasSuffix(".spec") }
    }

    @Test func mountsThroughTheDaemonAndCleansUp() throws {
        try withDaemonMount("daemon-mount") { f, daemon, expected, _ in
            let state = f.runtime.state.root
            let record = try #require(f.runtime.state.load(f.mnt))
            #expect(record.servedBy == "daemon" && record.workerPID == daemon.child(), "\(record)")
            #expect(TreeFactsLite(f.mnt) == expected)
            let st = try #require(try f.runtime.status().first)
            #expect(st.problems.isEmpty && st.workerAlive == true, "\(st.problems)")
            #expect((st.progress?.events ?? 0) > 0)
            #expect(specs(state).count == 1)
            let shown = try cli(state, ["status", f.mnt])
            #expect(shown.stdout.contains("worker   \(record.workerPID!) (erofs-compat daemon)"), Comment(rawValue: shown.stdout))

            // A second daemon on the same socket is refused and the first one keeps serving.
            let second = try cli(state, ["daemon"])
            #expect(second.status == 1 && second.stderr.contains("already listens"), "\(second.status) \(second.stderr)")
            #expect(daemon.child() != nil && FileManager.default.fileExists(atPath: daemon.socket))
            // A socket that cannot be created: one line, exit 1, no process left behind.
            let badSocket = try cli(state, ["daemon", "--socket", f.dir.file("missing-dir/d.sock")])
            #expect(badSocket.status == 1 && badSocket.stderr.contains("cannot listen"), "\(badSocket.status) \(badSocket.stderr)")

            // A bad source through the daemon: its error and exit code, nothing left behind.
            let bad = try cli(state, ["mount", "--cache-dir", f.remote.cacheDir, f.server.base + "/missing.erofs", f.dir.file("mnt2")])
            #expect(bad.status == 3, "\(bad.status) \(bad.stderr)")
            #expect(bad.stderr.contains("missing.erofs"), "\(bad.stderr)")
            #expect(f.runtime.state.load(f.dir.file("mnt2")) == nil && !currentMounts().contains(f.dir.file("mnt2")))

            // --no-daemon: the same command mounts by itself (a per-mount supervisor).
            let own = try cli(state, ["mount", "--no-daemon", "--cache-dir", f.dir.file("cache2"), f.url, f.dir.file("mnt2")])
            try #require(own.status == 0, Comment(rawValue: own.stderr))
            #expect(f.runtime.state.load(f.dir.file("mnt2"))?.servedBy == nil)
            #expect(try cli(state, ["umount", f.dir.file("mnt2")]).status == 0)

            // umount: the daemon stops serving by itself and the keeper lets go of the descriptors (the
            // cache entry's lock is one of them), while the daemon keeps running.
            let u = try cli(state, ["umount", f.mnt])
            #expect(u.status == 0, Comment(rawValue: u.stderr))
            var unlocked = false
            for _ in 0..<60 where !unlocked {
                unlocked = !BlobCache.isLocked(entry: record.cachePath!) && specs(state).isEmpty
                if !unlocked { usleep(50_000) }
            }
            #expect(unlocked, "the cache entry is still held after umount: \(daemon.logText())")
            #expect(daemon.child() != nil)
            #expect(daemon.stop() == 0, Comment(rawValue: daemon.logText()))
            #expect(!FileManager.default.fileExists(atPath: daemon.socket))
        }
    }

    /// SIGKILL of the daemon during a parallel cold read of every file: the keeper holds the group,
    /// restarts the daemon with the stored descriptors, and the new daemon answers what the old one
    /// had read: every reader gets correct bytes. Every data request is held back 0.1 s by the proxy.
    @Test func killedDaemonNeverHandsOutZeros() throws {
        try withDaemonMount("daemon-kill", proxied: true) { f, daemon, expected, proxy in
            let state = f.runtime.state.root
            let log = try readWhileKillingTheDaemon(f, daemon, expected, proxy!, kills: 3, everyMicros: 250_000)
            #expect(log.contains("serving again after a restart"), Comment(rawValue: log))
            #expect(try cli(state, ["umount", f.mnt]).status == 0)
            #expect(daemon.stop() == 0, Comment(rawValue: daemon.logText()))
        }
    }

    /// Two mounts of one blob requested at the same time: the daemon serves both from one cache file
    /// (the second shares the first's serving), every byte is right in both, and unmounting both lets
    /// go of the cache entry.
    @Test func concurrentMountsOfOneBlobShare() throws {
        try withDaemonMount("daemon-two") { f, daemon, expected, _ in
            let state = f.runtime.state.root
            try f.runtime.umount(f.mnt)
            // The daemon lets go of that mount before its cache file's path is used again (otherwise
            // a new mount of the same path there could look like the old one still being there).
            for _ in 0..<100 where !specs(state).isEmpty { usleep(50_000) }
            try FileManager.default.removeItem(atPath: f.remote.cacheDir)
            let results = Locked<[Int32]>([])
            let group = DispatchGroup()
            for m in [f.mnt, f.dir.file("mnt2")] {
                group.enter()
                DispatchQueue.global().async {
                    defer { group.leave() }
                    let r = try? cli(state, ["mount", "--cache-dir", f.remote.cacheDir, f.url, m])
                    results.withLock { $0.append(r?.status ?? -1) }
                }
            }
            group.wait()
            try #require(results.get() == [0, 0], Comment(rawValue: daemon.logText()))
            let records = f.runtime.state.all()
            #expect(records.count == 2 && Set(records.map(\.cachePath)).count == 1 && records.allSatisfy { $0.servedBy == "daemon" })
            #expect(TreeFactsLite(f.mnt) == expected)
            #expect(TreeFactsLite(f.dir.file("mnt2")) == expected)
            #expect(try cli(state, ["umount", f.mnt]).status == 0)
            #expect(TreeFactsLite(f.dir.file("mnt2")) == expected, "the other mount still served")
            #expect(try cli(state, ["umount", f.dir.file("mnt2")]).status == 0)
            var released = false
            for _ in 0..<200 where !released {
                released = !BlobCache.isLocked(entry: records[0].cachePath!) && specs(state).isEmpty
                if !released { usleep(50_000) }
            }
            #expect(released, Comment(rawValue: daemon.logText()))
        }
    }

    /// The daemon's threads do not grow with its mounts: every lazy mount is served on the threads
    /// the process shares (one poller, one ticker, one pool). Six mounts, each its own cache entry,
    /// against one; a server with threads of its own per mount had 16 more per mount.
    @Test func threadsDoNotGrowWithMounts() throws {
        try withDaemonMount("daemon-threads") { f, daemon, expected, _ in
            let state = f.runtime.state.root
            let pid = try #require(daemon.child())
            func threads() -> Int {
                let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
                return status.split(separator: "\n").first { $0.hasPrefix("Threads:") }
                    .flatMap { Int($0.dropFirst("Threads:".count).trimmingCharacters(in: .whitespaces)) } ?? -1
            }
            usleep(300_000)
            let one = threads()
            var mounts: [String] = []
            defer { for m in mounts { _ = try? cli(state, ["umount", m]) } }
            for i in 2...6 {
                let m = f.dir.file("mnt\(i)")
                try FileManager.default.createDirectory(atPath: m, withIntermediateDirectories: true)
                let r = try cli(state, ["mount", "--cache-dir", f.dir.file("cache\(i)"), f.url, m])
                try #require(r.status == 0, Comment(rawValue: r.stderr + daemon.logText()))
                mounts.append(m)
            }
            #expect(TreeFactsLite(f.dir.file("mnt6")) == expected)
            usleep(300_000)
            let six = threads()
            #expect(one > 0 && six - one < 16, "threads: \(one) with one mount, \(six) with six")
        }
    }

    /// The same crash under systemd itself: a transient Type=notify service with an fd store; systemd
    /// restarts the killed daemon and hands the stored descriptors back (LISTEN_FDS).
    @Test(.enabled(if: canInjectFaults && systemdRuns, Comment(rawValue: systemdReason)))
    func systemdKeepsTheGroupsAcrossACrash() throws {
        let f = try RemoteFixture("daemon-systemd")
        defer { f.remove() }
        let proxy = try FaultProxy(upstream: f.server.base)
        defer { proxy.remove() }
        let state = f.runtime.state.root
        let unit = "erofs-compat-test-\(getpid())"
        let systemctl = TestEnv.which("systemctl") ?? "/bin/systemctl"
        defer {
            _ = try? run(systemctl, ["stop", unit])
            _ = try? run(systemctl, ["reset-failed", unit])
        }
        let started = try run(TestEnv.which("systemd-run")!, ["--unit=" + unit, "-p", "Type=notify", "-p", "FileDescriptorStoreMax=64",
                                                           "-p", "Restart=on-failure", "-p", "RestartSec=100ms", "-p", "KillMode=process",
                                                           "--setenv=EROFS_COMPAT_STATE_DIR=" + state, cliBinary, "daemon"])
        try #require(started.status == 0, Comment(rawValue: started.stderr))
        let expected = try f.oracle()
        let r = try cli(state, ["mount", "--cache-dir", f.remote.cacheDir, proxy.base + "/img.erofs", f.mnt])
        try #require(r.status == 0 && r.stdout.contains("served by the daemon"), Comment(rawValue: r.stdout + r.stderr))
        try proxy.set("{\"fault\":\"stall\",\"seconds\":0.1,\"every\":1,\"match\":\"/img.erofs\"}")
        let files = expected.entries.filter { $0.value.contains("size") }.map(\.key).sorted()
        let results = parallelRead(f.mnt, files) {
            usleep(250_000)
            _ = try? run(systemctl, ["kill", "--signal=KILL", "--kill-who=main", unit])
        }
        for p in files {
            #expect(expected.entries[p]!.hasSuffix(results[p] ?? "missing"), "\(p): \(results[p] ?? "missing")")
        }
        try proxy.set("{}")
        #expect(TreeFactsLite(f.mnt) == expected)
        #expect(try cli(state, ["umount", f.mnt]).status == 0)
    }

    /// A stop right after an umount (before the daemon's watch looked) hands nothing over: no
    /// supervisor is left waiting for a mount that is gone (one was, for up to 120 s).
    @Test func stopRightAfterUmountLeavesNoSupervisor() throws {
        try withDaemonMount("daemon-umount-stop") { f, daemon, _, _ in
            let record = try #require(f.runtime.state.load(f.mnt))
            #expect(try cli(f.runtime.state.root, ["umount", f.mnt]).status == 0)
            #expect(daemon.stop() == 0, Comment(rawValue: daemon.logText()))
            let servers = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap(Int32.init)
                .filter { Runtime.isWorker($0, serving: record) }
            #expect(servers.isEmpty, "left serving a gone mount: \(servers) \(daemon.logText())")
            #expect(!daemon.logText().contains("handed to supervisor"), Comment(rawValue: daemon.logText()))
        }
    }

    /// A clean stop hands each lazy mount to its own supervisor: the mount keeps working (cold data
    /// still fetched), `umount` then stops that supervisor.
    @Test func stopHandsMountsToSupervisors() throws {
        try withDaemonMount("daemon-stop") { f, daemon, expected, _ in
            let state = f.runtime.state.root
            #expect(daemon.stop() == 0, Comment(rawValue: daemon.logText()))
            let record = try #require(f.runtime.state.load(f.mnt))
            #expect(record.servedBy == nil && workerRunning(record.workerPID), "\(record)")
            #expect(TreeFactsLite(f.mnt) == expected)
            #expect(specs(state).isEmpty)
            try f.runtime.umount(f.mnt)
            var gone = false
            for _ in 0..<60 where !gone {
                gone = !workerRunning(record.workerPID)
                if !gone { usleep(50_000) }
            }
            #expect(gone, "the supervisor outlived its mount")
        }
    }

    /// What is left of a FUSE mount in the fixture's state directory: specs, figures, private mounts.
    func fuseLeftovers(_ f: RemoteFixture) -> [String] {
        let state = f.runtime.state.root
        let workers = (try? FileManager.default.contentsOfDirectory(atPath: state + "/workers")) ?? []
        let fuse = (try? FileManager.default.contentsOfDirectory(atPath: state + "/fuse")) ?? []
        return workers.filter { !$0.hasSuffix(".lock") } + fuse + currentMounts().filter { $0.hasPrefix(state) }
    }

    /// A FUSE mount served by the daemon itself (no server process), its /dev/fuse descriptor in the
    /// keeper's fd store: SIGKILL of the daemon during a parallel cold read of every file, each data
    /// request held back 0.1 s — the restarted daemon serves the same connection and the kernel
    /// resends what the dead one had read, so every reader gets correct bytes; umount leaves nothing.
    @Test(.enabled(if: fuseSkipReason == nil, Comment(rawValue: fuseSkipReason ?? "")),
          arguments: ["fuse-blob", "fuse-erofs"])
    func hostedFuseSurvivesACrash(backend: String) throws {
        let args = ["--backend", backend]
        try withDaemonMount("daemon-" + backend, proxied: true, args: args) { f, daemon, expected, proxy in
            let state = f.runtime.state.root
            let record = try #require(f.runtime.state.load(f.mnt))
            #expect(record.servedBy == "daemon" && record.workerPID == daemon.child() && record.backend == backend,
                    "\(record)")
            #expect(fuseServers(under: f.dir).isEmpty, "no FUSE server process of its own")
            #expect(specs(state).count == 1)
            let log = try readWhileKillingTheDaemon(f, daemon, expected, proxy!, kills: 2, everyMicros: 300_000)
            #expect(log.contains("serving again after a restart") && log.contains("from its journal"),
                    Comment(rawValue: log))
            let st = try #require(try f.runtime.status().first)
            #expect(st.problems.isEmpty && (st.fuse?.requests ?? 0) > 0,
                    "\(st.problems) \(String(describing: st.fuse))")
            let u = try cli(state, ["umount", f.mnt])
            #expect(u.status == 0, Comment(rawValue: u.stderr))
            #expect(fuseLeftovers(f).isEmpty, "left after umount: \(fuseLeftovers(f))")
            #expect(daemon.stop() == 0, Comment(rawValue: daemon.logText()))
        }
    }

    /// A fuse-blob mount the daemon serves takes the bytes the mount's probe fetched (the first
    /// 256 KiB) into the cache entry: the EROFS mount's own reads of the superblock area fetch
    /// nothing again. Fails when the hosted server opens a fetcher of its own.
    @Test(.enabled(if: fuseSkipReason == nil, Comment(rawValue: fuseSkipReason ?? "")))
    func hostedFuseTakesTheProbesBytes() throws {
        try withDaemonMount("daemon-fuse-head", proxied: true, args: ["--backend", "fuse-blob"]) { f, _, expected, proxy in
            #expect(TreeFactsLite(f.mnt) == expected)
            let ranges = proxy!.log.compactMap { line -> (Int, Int)? in
                guard let r = line.split(separator: " ").last, r.hasPrefix("bytes=") else { return nil }
                let p = r.dropFirst(6).split(separator: "-").compactMap { Int($0) }
                return p.count == 2 ? (p[0], p[1]) : nil
            }
            #expect(ranges.first.map { $0 == (0, (256 << 10) - 1) } == true, "the probe first: \(ranges)")
            #expect(ranges.dropFirst().allSatisfy { $0.1 >= 256 << 10 && $0.0 > 0 }, "fetched again: \(ranges)")
            let u = try cli(f.runtime.state.root, ["umount", f.mnt])
            #expect(u.status == 0, Comment(rawValue: u.stderr))
        }
    }

    /// A hosted fuse-blob mount of a complete cache entry is passed through (no read reaches the
    /// daemon). Every later open must name the backing file too, or the kernel refuses it: after a
    /// SIGKILL of the daemon (the restored mount keeps the backing id) and after a clean stop (the
    /// supervisor is told it), the image file opens and reads the blob's bytes. umount leaves nothing.
    @Test(.enabled(if: passthroughSkipReason == nil, Comment(rawValue: passthroughSkipReason ?? "")))
    func hostedPassthroughSurvivesARestartAndAHandOver() throws {
        try withDaemonMount("daemon-passthrough", args: ["--backend", "fuse-blob", "--prefetch", "all"]) { f, daemon, expected, _ in
            let state = f.runtime.state.root
            let entry = BlobCache(directory: f.remote.cacheDir).paths(key: BlobCache.partialKey(source: f.url)).data
            for _ in 0..<100 where (PopulationRecord.presentFraction(path: entry + ".pop") ?? 0) < 1 { usleep(100_000) }
            #expect(try cli(state, ["umount", f.mnt]).status == 0)
            let r = try cli(state, ["mount", "--cache-dir", f.remote.cacheDir, "--backend", "fuse-blob", f.url, f.mnt])
            try #require(r.status == 0 && r.stdout.contains("served by the daemon"), Comment(rawValue: r.stdout + r.stderr))
            #expect(TreeFactsLite(f.mnt) == expected)
            var st = try #require(try f.runtime.status(f.mnt).first)
            for _ in 0..<40 where st.fuse?.passthroughOpens == nil {
                usleep(100_000)
                st = try #require(try f.runtime.status(f.mnt).first)
            }
            #expect(st.fuse?.passthroughOpens == 1 && st.fuse?.reads == 0, "\(String(describing: st.fuse))")
            let blob = try Sys.readFile(f.server.root + "/img.erofs")
            let image = try #require(f.runtime.state.load(f.mnt)?.fuseMount) + "/image"
            let before = daemon.child()
            _ = Glibc.kill(before ?? 0, SIGKILL)
            for _ in 0..<100 where daemon.child() == before || !daemon.logText().contains("serving again after a restart") {
                usleep(100_000)
            }
            #expect(try Sys.readFile(image) == blob, "the restarted daemon opens the file for passthrough")
            #expect(daemon.stop() == 0, Comment(rawValue: daemon.logText()))
            #expect(try Sys.readFile(image) == blob, "the supervisor opens the file for passthrough")
            #expect(TreeFactsLite(f.mnt) == expected)
            #expect(try cli(state, ["umount", f.mnt]).status == 0)
            #expect(fuseLeftovers(f).isEmpty, "left after umount: \(fuseLeftovers(f))")
        }
    }

    /// A clean stop hands a hosted FUSE mount to a `__fuse-serve` supervisor on the same connection:
    /// the mount keeps working (cold data still fetched) and `umount` ends that supervisor.
    @Test(.enabled(if: fuseSkipReason == nil, Comment(rawValue: fuseSkipReason ?? "")))
    func stopHandsHostedFuseToASupervisor() throws {
        try withDaemonMount("daemon-fuse-stop", args: ["--backend", "fuse-blob"]) { f, daemon, expected, _ in
            #expect(daemon.stop() == 0, Comment(rawValue: daemon.logText()))
            let record = try #require(f.runtime.state.load(f.mnt))
            #expect(record.servedBy == nil && fuseServers(under: f.dir).contains(record.workerPID!), "\(record)")
            #expect(TreeFactsLite(f.mnt) == expected)
            #expect(specs(f.runtime.state.root).isEmpty)
            try f.runtime.umount(f.mnt)
            #expect(fuseServers(under: f.dir).isEmpty, "the supervisor outlived its mount")
            #expect(fuseLeftovers(f).isEmpty, "left after umount: \(fuseLeftovers(f))")
        }
    }
}
