import Foundation
import Glibc
import Testing
@testable import EROFS
@testable import Remote
import Syscall
import TestSupport

@Suite(.serialized, .enabled(if: NginxServer.available, "needs nginx (Debian nginx-light) on 127.0.0.1"))
struct RemoteTests {
    @Test func rangeReadsValidatorsAndRefusals() throws {
        let server = try NginxServer()
        defer { server.remove() }
        var bytes = [UInt8](repeating: 0, count: 300_000)
        var rng = SplitMix(seed: 3)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: rng.next()) }
        try Data(bytes).write(to: URL(fileURLWithPath: server.root + "/blob"))
        let blob = try HTTPBlob(url: server.base + "/blob")
        try blob.open(allowFullDownload: false)
        #expect(blob.size == 300_000)
        #expect(blob.etag != nil)
        #expect(try blob.read(offset: 12345, length: 1000) == Array(bytes[12345..<13345]))
        #expect(try blob.read(offset: 299_999, length: 1) == [bytes[299_999]])
        // A server that ignores Range is refused unless whole downloads are allowed.
        let whole = try HTTPBlob(url: server.base + "/norange/blob")
        #expect(throws: RemoteError.rangesUnsupported(url: server.base + "/norange/blob")) { try whole.open(allowFullDownload: false) }
        try whole.open(allowFullDownload: true)
        #expect(whole.wholeOnly && whole.size == 300_000)
        // The blob changes on the server: detected, not served.
        bytes[0] ^= 0xFF
        usleep(1_100_000)  // a new Last-Modified second, and a new ETag
        try Data(bytes).write(to: URL(fileURLWithPath: server.root + "/blob"))
        do {
            _ = try blob.read(offset: 0, length: 10)
            Issue.record("changed blob served")
        } catch let e as RemoteError {
            guard case .blobChanged = e else { Issue.record("\(e)"); return }
        }
        // 404 and a server that is down.
        let missing = try HTTPBlob(url: server.base + "/nope")
        #expect(throws: RemoteError.httpStatus(url: server.base + "/nope", status: 404)) { try missing.open(allowFullDownload: false) }
        server.stop()
        blob.attempts = 2
        blob.baseDelayMs = 10
        #expect(throws: RemoteError.self) { _ = try blob.read(offset: 0, length: 10) }
    }

    @Test func lazyBlobCoalescesPersistsAndVerifies() throws {
        let server = try NginxServer()
        defer { server.remove() }
        let size = 1_000_000
        var bytes = [UInt8](repeating: 0, count: size)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 2654435761 >> 13) }
        try Data(bytes).write(to: URL(fileURLWithPath: server.root + "/b"))
        let cache = try ScratchDir("cache")
        defer { cache.remove() }
        let blob = try HTTPBlob(url: server.base + "/b")
        try blob.open(allowFullDownload: false)
        let before = blob.requestCount.get()
        do {
            let lazy = try LazyBlob(blob: blob, dataPath: cache.file("data"), recordPath: cache.file("data.pop"))
            // Four readers of the same range: one download.
            DispatchQueue.concurrentPerform(iterations: 4) { _ in try? lazy.ensure(offset: 100_000, length: 50_000) }
            #expect(blob.requestCount.get() - before == 1)
            #expect(lazy.isAvailable(offset: 100_000, length: 50_000))
            #expect(!lazy.isAvailable(offset: 0, length: 10))
            #expect(try lazy.read(at: 120_000, count: 100) == Array(bytes[120_000..<120_100]))
            try lazy.commit()
        }
        // Reopened: what was committed is still present, nothing is fetched again.
        let again = try LazyBlob(blob: blob, dataPath: cache.file("data"), recordPath: cache.file("data.pop"))
        let n = blob.requestCount.get()
        #expect(again.isAvailable(offset: 100_000, length: 50_000))
        _ = try again.read(at: 100_000, count: 50_000)
        #expect(blob.requestCount.get() == n)
        try again.ensure(offset: 0, length: UInt64(size))
        try again.commit()
        #expect(again.record.isComplete)
        let digest = try run("/usr/bin/sha256sum", [server.root + "/b"]).stdout.prefix(64)
        try again.verify(sha256: String(digest))
        #expect(throws: RemoteError.self) { try again.verify(sha256: String(repeating: "0", count: 64)) }
    }

    /// Fetching only the metadata ranges through the lazy source is enough for the kernel to mount
    /// the cache file and list everything.
    @Test(.enabled(if: TestEnv.isRoot && TestEnv.which("mkfs.erofs") != nil, "needs root and mkfs.erofs"))
    func metadataFetchMakesTheCacheMountable() throws {
        let server = try NginxServer()
        defer { server.remove() }
        let work = try ScratchDir("lazy-meta")
        defer { work.remove() }
        try Samples.makeTree(at: work.file("tree"))
        try ReaderTrees.makeReal(at: work.file("tree/real"), budget: 1 << 20)
        try Samples.mkfs(work.file("tree"), server.root + "/img.erofs", ["-zlz4hc"])
        let blob = try HTTPBlob(url: server.base + "/img.erofs")
        try blob.open(allowFullDownload: false)
        let lazy = try LazyBlob(blob: blob, dataPath: work.file("cache"), recordPath: work.file("cache.pop"))
        let meta = try lazy.fetchMetadata()
        #expect(meta.totalBytes < blob.size)
        #expect(blob.bytesFetched.get() < blob.size)
        try FileManager.default.createDirectory(atPath: work.file("mnt"), withIntermediateDirectories: true)
        let fc = try MountAPI.fsopen("erofs")
        try MountAPI.setString(fc, "source", work.file("cache"))
        try MountAPI.setFlag(fc, "ro")
        try MountAPI.create(fc)
        try MountAPI.attach(fc, attributes: [.readOnly], at: work.file("mnt"))
        defer { try? MountAPI.umount(work.file("mnt"), detach: true) }
        let names = Set(FileManager.default.subpaths(atPath: work.file("mnt")) ?? [])
        #expect(names == Set(FileManager.default.subpaths(atPath: work.file("tree")) ?? []))
    }
}
