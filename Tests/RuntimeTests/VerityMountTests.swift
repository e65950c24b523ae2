import Foundation
import Glibc
import Testing
@testable import EROFS
@testable import Remote
@testable import Runtime
import Syscall
import TestSupport

/// Lazy mounts checked block by block against an fs-verity tree (`--verity`): issue 15's reading side.
@Suite(.serialized, .enabled(if: canInjectFaults, Comment(rawValue: faultReason)))
struct VerityMountTests {
    /// The image's digest, its tree written beside it as IMAGE.verity (what a publisher serves).
    static func publishTree(_ image: String) throws -> String {
        let r = try run(cliBinary, ["image", "verity", image, "--tree", image + ".verity"])
        try #require(r.status == 0, "\(r.stderr)")
        return String(r.stdout.dropFirst("sha256:".count).prefix(64))
    }

    /// A data byte inside the image's largest regular file (its first physical extent).
    static func dataOffset(_ image: String) throws -> (path: String, offset: UInt64) {
        let img = try EROFSImage(path: image)
        var best: (String, UInt64, UInt64)?
        var queue = [("", img.superblock.rootNid)]
        while let (path, nid) = queue.popLast() {
            let ino = try img.inode(nid)
            if ino.type == .directory {
                for e in try img.entries(ino) where e.name != "." && e.name != ".." { queue.append((path + "/" + e.name, e.nid)) }
            } else if ino.type == .regular, ino.size > (best?.2 ?? 65536),
                      let p = try img.extents(ino).first(where: { $0.physical != nil && $0.kind != "inline" })?.physical {
                best = (String(path.dropFirst()), p.offset + p.length / 2, ino.size)
            }
        }
        let b = try #require(best)
        return (b.0, b.1)
    }

    /// Reading one small file of a 48 MiB image fetches a small part of its tree; reading everything
    /// gives the image's bytes.
    @Test func verifiedLazyMountFetchesTheTreeLazily() throws {
        try withVerityFixture("verity-lazy", build: { root in
            try FileManager.default.createDirectory(atPath: root + "/d", withIntermediateDirectories: true)
            var rng = SplitMix(seed: 5)
            try Data((0..<(48 << 20)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }).write(to: URL(fileURLWithPath: root + "/big"))
            try "small\n".write(toFile: root + "/d/small", atomically: false, encoding: .utf8)
        }) { f, proxy, digest, expected in
            var opts = f.remote
            opts.verity = VeritySource(digest: digest, treeURL: "")
            _ = try f.runtime.mount(MountRequest(source: proxy.base + "/img.erofs", mountpoint: f.mnt, remote: opts))
            defer { try? f.runtime.umount(f.mnt) }
            #expect(try String(contentsOfFile: f.mnt + "/d/small", encoding: .utf8) == "small\n")
            let treeSize = try #require(try FileManager.default.attributesOfItem(atPath: f.server.root + "/img.erofs.verity")[.size] as? Int)
            let treeRequests = proxy.log.filter { $0.contains("/img.erofs.verity bytes=") }
            let fetched = treeRequests.compactMap { $0.split(separator: "=").last }.compactMap { r -> Int? in
                let p = r.split(separator: "-").compactMap { Int($0) }
                return p.count == 2 ? p[1] - p[0] + 1 : nil
            }.reduce(0, +)
            #expect(fetched < treeSize / 4, "\(fetched) of the tree's \(treeSize) bytes fetched for one small file")
            #expect(TreeFactsLite(f.mnt) == expected)
            let key = BlobCache.partialKey(source: proxy.base + "/img.erofs", verity: digest)
            let info = BlobCache.readInfo(f.dir.file("cache/blobs/sha256/" + key) + ".json")
            #expect(info?.verity == digest)
        }
    }

    /// Tree blocks fetched by one mount are kept beside the entry: a later mount of the same entry
    /// asks the server for none of them again (the top block is fetched once); a kept block gone bad
    /// is fetched again and the bytes stay right.
    @Test func treeBlocksAreKeptAcrossMounts() throws {
        try withVerityFixture("verity-kept", build: { root in
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
            var rng = SplitMix(seed: 9)
            for name in ["a", "b"] {
                try Data((0..<(24 << 20)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }).write(to: URL(fileURLWithPath: root + "/" + name))
            }
        }) { f, proxy, digest, expected in
            var opts = f.remote
            opts.verity = VeritySource(digest: digest, treeURL: "")
            let src = proxy.base + "/img.erofs"
            // The top block is the tree's first 4 KiB (a range from 0 longer than the size probe's 2 bytes).
            func topBlockRequests() -> Int {
                proxy.log.filter { $0.contains("/img.erofs.verity bytes=0-") && !$0.hasSuffix("bytes=0-1") }.count
            }
            _ = try f.runtime.mount(MountRequest(source: src, mountpoint: f.mnt, remote: opts))
            _ = TreeFactsLite.digest(f.mnt + "/a")
            try f.runtime.umount(f.mnt)
            let afterFirst = topBlockRequests()
            #expect(afterFirst >= 1, "\(proxy.log.suffix(5))")
            _ = try f.runtime.mount(MountRequest(source: src, mountpoint: f.mnt, remote: opts))
            #expect(expected.entries["b"]?.hasSuffix(" " + TreeFactsLite.digest(f.mnt + "/b")) == true)
            try f.runtime.umount(f.mnt)
            #expect(topBlockRequests() == afterFirst, "the second mount fetched the top block again: \(proxy.log.filter { $0.contains(".verity") })")
            // A kept top block gone bad: fetched again, every byte right.
            let key = BlobCache.partialKey(source: src, verity: digest)
            let kept = BlobCache(directory: f.dir.file("cache")).paths(key: key).data + ".verity"
            let fd = try Sys.open(kept, O_RDWR)
            _ = try [UInt8](repeating: 0xa5, count: 64).withUnsafeBytes { try Sys.pwrite(fd.rawValue, $0, at: 0) }
            Sys.close(fd.rawValue)
            try? FileManager.default.removeItem(atPath: BlobCache(directory: f.dir.file("cache")).paths(key: key).data)
            try? FileManager.default.removeItem(atPath: BlobCache(directory: f.dir.file("cache")).paths(key: key).record)
            _ = try f.runtime.mount(MountRequest(source: src, mountpoint: f.mnt, remote: opts))
            defer { try? f.runtime.umount(f.mnt) }
            #expect(TreeFactsLite(f.mnt) == expected)
            #expect(topBlockRequests() == afterFirst + 1, "the bad kept block was fetched again")
        }
    }

    /// A server that flips one byte: that file's read is EIO, every other byte right; without the
    /// tree the same server's byte would have been served.
    @Test func aFlippedByteIsNeverServed() throws {
        try withVerityFixture("verity-flip") { f, proxy, digest, expected in
            let (victim, at) = try Self.dataOffset(f.server.root + "/img.erofs")
            try proxy.set("{\"fault\":\"flip\",\"at\":\(at),\"match\":\"/img.erofs\"}")
            var opts = f.remote
            opts.verity = VeritySource(digest: digest, treeURL: f.server.base + "/img.erofs.verity")
            _ = try f.runtime.mount(MountRequest(source: proxy.base + "/img.erofs", mountpoint: f.mnt, remote: opts))
            defer { try? f.runtime.umount(f.mnt) }
            let got = TreeFactsLite(f.mnt)
            #expect(got.entries[victim]?.contains("read-error") == true, "\(victim): \(got.entries[victim] ?? "missing")")
            for (path, facts) in expected.entries where path != victim { #expect(got.entries[path] == facts, "\(path)") }
            // status counts the failed block (fetched twice, so at least 2 checks failed).
            var failures = 0
            for _ in 0..<30 where failures < 2 {
                failures = (try? f.runtime.status(f.mnt).first?.progress?.verityFailures ?? 0) ?? 0
                if failures < 2 { usleep(100_000) }
            }
            #expect(failures >= 2, "status shows \(failures) failed checks")
            // The same server without the tree (another cache): the flipped byte reaches the reader.
            var plain = RemoteOptions(cacheDir: f.dir.file("cache-plain"))
            plain.prepareTimeout = 60
            _ = try f.runtime.mount(MountRequest(source: proxy.base + "/img.erofs", mountpoint: f.dir.file("mnt2"), remote: plain))
            defer { try? f.runtime.umount(f.dir.file("mnt2")) }
            #expect(TreeFactsLite.digest(f.dir.file("mnt2") + "/" + victim) != expected.entries[victim]?.split(separator: " ", maxSplits: 2).last.map(String.init))
            // Nor was the bad block ever written to the checked mount's cache file: once nothing serves
            // it (no mark), it reads back as the hole it was.
            try f.runtime.umount(f.mnt)
            let key = BlobCache.partialKey(source: proxy.base + "/img.erofs", verity: digest)
            let fd = try Sys.open(BlobCache(directory: f.dir.file("cache")).paths(key: key).data, O_RDONLY)
            defer { Sys.close(fd.rawValue) }
            let block = try Sys.preadFully(fd.rawValue, count: 4096, at: Int64(at / 4096 * 4096))
            #expect(block.count == 4096 && block.allSatisfy { $0 == 0 }, "the flipped block reached the cache file")
        }
    }

    /// Blocks are hashed while they arrive: a response for the wrong range (retried) leaves no hash
    /// behind, so every byte is right and no check fails.
    @Test func aRetriedResponseIsHashedAfresh() throws {
        try withVerityFixture("verity-retry") { f, proxy, digest, expected in
            try proxy.set("{\"fault\":\"shiftrange\",\"shift\":4096,\"every\":3,\"match\":\"/img.erofs\"}")
            var opts = f.remote
            opts.verity = VeritySource(digest: digest, treeURL: f.server.base + "/img.erofs.verity")
            _ = try f.runtime.mount(MountRequest(source: proxy.base + "/img.erofs", mountpoint: f.mnt, remote: opts))
            defer { try? f.runtime.umount(f.mnt) }
            #expect(TreeFactsLite(f.mnt) == expected)
            #expect(proxy.log.contains { $0.hasPrefix("shiftrange") }, "no response was shifted")
            #expect((try f.runtime.status(f.mnt).first?.progress?.verityFailures) == 0)
        }
    }

    /// A mount with --verity never joins a worker serving the same source without it (that worker's
    /// bytes are unchecked): it gets an entry and a worker of its own.
    @Test func checkedAndUncheckedMountsShareNothing() throws {
        try withVerityFixture("verity-share") { f, proxy, digest, expected in
            let plain = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote))
            defer { try? f.runtime.umount(f.mnt) }
            var opts = f.remote
            opts.verity = VeritySource(digest: digest, treeURL: "")
            let checked = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.dir.file("mnt2"), remote: opts))
            defer { try? f.runtime.umount(f.dir.file("mnt2")) }
            #expect(plain.record?.cachePath != checked.record?.cachePath && plain.record?.workerPID != checked.record?.workerPID)
            #expect(TreeFactsLite(f.dir.file("mnt2")) == expected)
        }
    }

    /// A wrong digest (or a tree that does not match it) fails the mount with one line; nothing is left.
    @Test func aWrongRootFailsTheMount() throws {
        try withVerityFixture("verity-wrong") { f, proxy, digest, _ in
            var opts = f.remote
            opts.verity = VeritySource(digest: String(digest.reversed()), treeURL: "")
            let msg = remoteMessage { _ = try f.runtime.mount(MountRequest(source: proxy.base + "/img.erofs", mountpoint: f.mnt, remote: opts)) }
            #expect(msg?.contains("fs-verity") == true, "\(msg ?? "mounted")")
            #expect(!currentMounts().contains(f.mnt) && f.runtime.state.all().isEmpty)
        }
    }
}

/// A RemoteFixture whose image has its tree published beside it, behind a fault proxy.
func withVerityFixture(_ label: String, build: ((String) throws -> Void)? = nil,
                       _ body: (RemoteFixture, FaultProxy, String, TreeFactsLite) throws -> Void) throws {
    let f = try RemoteFixture(label, mkfs: build == nil ? ["-zlz4hc"] : [], build: build)
    defer { f.remove() }
    let digest = try VerityMountTests.publishTree(f.server.root + "/img.erofs")
    let proxy = try FaultProxy(upstream: f.server.base)
    defer { proxy.remove() }
    try body(f, proxy, digest, try f.oracle())
}
