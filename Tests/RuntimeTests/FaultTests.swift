import Dispatch
import Foundation
import Glibc
import Testing
@testable import Runtime
import Syscall
import TestSupport

let faultReason = lazyMountMissing ?? "needs python3 (the fault-injecting proxy)"
let canInjectFaults = canMountRemote && FaultProxy.missing == nil

/// Reads every regular file of `files` on 4 threads, running `during` meanwhile; each result is a
/// digest or "read-error …".
func parallelRead(_ root: String, _ files: [String], during: () -> Void = {}) -> [String: String] {
    let results = Locked<[String: String]>([:])
    let group = DispatchGroup()
    for chunk in 0..<4 {
        group.enter()
        DispatchQueue.global().async {
            defer { group.leave() }
            for (i, p) in files.enumerated() where i % 4 == chunk {
                let got = TreeFactsLite.digest(root + "/" + p)
                results.withLock { $0[p] = got }
            }
        }
    }
    during()
    group.wait()
    return results.get()
}

/// A fixture's image mounted lazily through a fault proxy in front of its nginx (`config` set before
/// the mount, so the metadata fetch meets the faults too); everything is removed afterwards.
func withProxiedMount(_ label: String, config: String? = nil,
                      _ body: (RemoteFixture, FaultProxy, TreeFactsLite, MountOutcome) throws -> Void) throws {
    let f = try RemoteFixture(label)
    defer { f.remove() }
    let proxy = try FaultProxy(upstream: f.server.base)
    defer { proxy.remove() }
    let expected = try f.oracle()
    if let config { try proxy.set(config) }
    let out = try f.runtime.mount(MountRequest(source: proxy.base + "/img.erofs", mountpoint: f.mnt, remote: f.remote))
    defer { try? f.runtime.umount(f.mnt) }
    try body(f, proxy, expected, out)
}

/// Lazy mounts through tests/Fixtures/faultproxy.py in front of nginx: every injected fault is
/// either retried away (correct bytes) or ends in EIO, never in wrong bytes, and the mount recovers.
@Suite(.serialized, .enabled(if: canInjectFaults, Comment(rawValue: faultReason)))
struct FaultTests {
    @Test(arguments: [
        ("{\"fault\":\"status\",\"status\":503,\"every\":2,\"match\":\"/img.erofs\"}", "status"),
        ("{\"fault\":\"status\",\"status\":429,\"every\":3,\"match\":\"/img.erofs\"}", "status"),
        ("{\"fault\":\"reset\",\"every\":2,\"match\":\"/img.erofs\"}", "reset"),
        ("{\"fault\":\"truncate\",\"every\":2,\"match\":\"/img.erofs\"}", "truncate"),
        ("{\"fault\":\"stall\",\"seconds\":1.5,\"every\":4,\"match\":\"/img.erofs\"}", "stall"),
    ])
    func transientFaultsAreRetried(config: String, kind: String) throws {
        // Cold: the metadata fetch before the mount goes through the faults too.
        try withProxiedMount("fault-\(kind)", config: config) { f, proxy, expected, out in
            #expect(out.record?.backend == "fanotify")
            let files = expected.entries.filter { $0.value.contains("size") }.map(\.key).sorted()
            let got = parallelRead(f.mnt, files)
            for p in files { #expect(expected.entries[p]!.hasSuffix(got[p] ?? "missing"), "\(kind): \(p): \(got[p] ?? "missing")") }
            let injected = proxy.log.filter { $0.hasPrefix(kind + " ") }.count
            #expect(injected > 0, "the proxy injected \(kind) faults")
        }
    }

    /// A server that keeps failing: unfetched reads fail with EIO after the retries; when it is
    /// healthy again the same files read correctly. Then the server goes down in the middle of a
    /// parallel cold read: every file is correct or EIO, and all correct once it is back.
    @Test func persistentFailureIsEIOAndTheMountRecovers() throws {
        try withProxiedMount("fault-down") { f, proxy, expected, out in
            let files = expected.entries.filter { $0.value.contains("size") && !$0.value.contains("size 0 ") }.map(\.key).sorted()
            try proxy.set("{\"fault\":\"status\",\"status\":503,\"every\":1,\"match\":\"/img.erofs\"}")
            // A worker that dies while the server is failing is restarted and serves (it does not need
            // the server to start).
            let supervisor = try #require(out.record?.workerPID)
            func worker() -> Int32? {
                (try? String(contentsOfFile: "/proc/\(supervisor)/task/\(supervisor)/children", encoding: .utf8))?
                    .split(separator: " ").first.flatMap { Int32($0) }
            }
            for _ in 0..<100 where worker() == nil { usleep(50_000) }
            let first = try #require(worker())
            try Sys.kill(first, SIGKILL)
            for _ in 0..<100 where worker() == nil || worker() == first { usleep(50_000) }
            // The two largest files: not fetched yet (only metadata and inline tails were).
            func size(_ p: String) -> Int { Int(expected.entries[p]!.split(separator: " ").drop { $0 != "size" }.dropFirst().first ?? "0") ?? 0 }
            let sample = Array(files.sorted { size($0) > size($1) }.prefix(2))
            for p in sample {
                let got = TreeFactsLite.digest(f.mnt + "/" + p)
                #expect(got.hasPrefix("read-error") && got.contains("Input/output"), "\(p) (\(size(p)) bytes) while failing: \(got)")
            }
            try proxy.set("{}")
            for p in sample {
                let got = TreeFactsLite.digest(f.mnt + "/" + p)
                #expect(expected.entries[p]!.hasSuffix(got), "\(p) after recovery: \(got); mounted: \(currentMounts().contains(f.mnt)); worker log:\n\(f.workerLogs().suffix(3000))")
            }
            try #require(expected.entries[sample[0]]!.hasSuffix(TreeFactsLite.digest(f.mnt + "/" + sample[0])))
            #expect(!f.workerLogs().contains("worker failed to start"), "\(f.workerLogs().suffix(2000))")

            // Down mid-read, from a cold cache again (readahead has fetched most of this small image by
            // now): every data request is held back 0.3 s, so none has finished when the proxy stops
            // 150 ms into the read; it is restarted only after it has stopped (never two on one port).
            try f.runtime.umount(f.mnt)
            try FileManager.default.removeItem(atPath: f.remote.cacheDir)
            _ = try f.runtime.mount(MountRequest(source: proxy.base + "/img.erofs", mountpoint: f.mnt, remote: f.remote))
            try proxy.set("{\"fault\":\"stall\",\"seconds\":0.3,\"every\":1,\"match\":\"/img.erofs\"}")
            let rest = files.filter { !sample.contains($0) }
            let stopped = DispatchSemaphore(value: 0)
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(150)) { proxy.stop(); stopped.signal() }
            let got = parallelRead(f.mnt, rest)
            stopped.wait()
            try proxy.set("{}")
            var eio = 0
            for p in rest {
                let g = got[p] ?? "missing"
                if g.hasPrefix("read-error") {
                    #expect(g.contains("Input/output"), "\(p): \(g)")
                    eio += 1
                } else {
                    #expect(expected.entries[p]!.hasSuffix(g), "\(p): wrong bytes while the server went down")
                }
            }
            try #require(try proxy.start())
            #expect(TreeFactsLite(f.mnt) == expected, "after the server came back (\(eio) reads had failed with EIO)")
        }
    }

    /// SIGKILL of the serving worker during a parallel cold read of every file: the supervisor keeps
    /// the fanotify group alive and restarts the worker, which answers the events its predecessor
    /// had read; every reader gets correct bytes (never zeros). Every data request is held back 0.1 s
    /// by the proxy, so the kills land while reads are still waiting however fast fetching gets.
    @Test func killedWorkerNeverHandsOutZeros() throws {
        try withProxiedMount("kill") { f, proxy, expected, out in
            try proxy.set("{\"fault\":\"stall\",\"seconds\":0.1,\"every\":1,\"match\":\"/img.erofs\"}")
            let supervisor = try #require(out.record?.workerPID)
            func worker() -> Int32? {
                (try? String(contentsOfFile: "/proc/\(supervisor)/task/\(supervisor)/children", encoding: .utf8))?
                    .split(separator: " ").first.flatMap { Int32($0) }
            }
            let files = expected.entries.filter { $0.value.contains("size") }.map(\.key).sorted()
            var kills = 0
            var traffic: [UInt64] = [], events: [Int] = []
            let results = parallelRead(f.mnt, files) {
                for _ in 0..<3 {
                    usleep(150_000)
                    if let w = worker() {
                        try? Sys.kill(w, SIGKILL)
                        kills += 1
                    }
                    for _ in 0..<3 {
                        usleep(200_000)
                        if let p = try? f.runtime.status().first?.progress { traffic.append(p.bytesFetched); events.append(p.events) }
                    }
                }
            }
            #expect(kills > 0)
            for p in files {
                let got = results[p] ?? "missing"
                #expect(expected.entries[p]!.hasSuffix(got), "\(p): \(got)")
            }
            // Restarted workers carry their predecessors' figures on: they never go backwards.
            #expect(traffic == traffic.sorted(), "\(traffic)")
            #expect(events == events.sorted() && events.last ?? 0 > 0, "\(events)")
            #expect(workerRunning(supervisor), "the supervisor survives")
        }
    }
}
