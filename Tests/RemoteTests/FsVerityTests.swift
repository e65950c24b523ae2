import Foundation
import Testing
@testable import Remote
import Syscall
import TestSupport

/// The fs-verity digest and tree equal what Debian's fsverity-utils computes for the same bytes
/// (issue 15's format: SHA-256, 4 KiB blocks, no salt).
@Suite(.enabled(if: TestEnv.which("fsverity") != nil, "needs fsverity (Debian's fsverity-utils)"))
struct FsVerityTests {
    /// Sizes around every boundary: empty, one block, one block and a byte, one full tree block of
    /// hashes (128 data blocks) and one more, and a second tree level.
    @Test(arguments: [0, 1, 4096, 4097, 128 * 4096, 128 * 4096 + 1, 128 * 128 * 4096 + 5])
    func digestAndTreeMatchFsverityUtils(size: Int) throws {
        let dir = try ScratchDir("verity")
        defer { dir.remove() }
        var rng = SplitMix(seed: UInt64(size) &+ 1)
        let bytes = (0..<size).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        try Data(bytes).write(to: URL(fileURLWithPath: dir.file("data")))
        let r = try run(TestEnv.which("fsverity")!, ["digest", dir.file("data"), "--out-merkle-tree=" + dir.file("tree")])
        #expect(r.status == 0, "\(r.stderr)")
        let tree = try FsVerityTree(size: UInt64(size)) { off, n in Array(bytes[Int(off)..<(Int(off) + n)]) }
        let hex = tree.digest.map { String(format: "%02x", $0) }.joined()
        #expect(r.stdout.hasPrefix("sha256:" + hex + " "), "\(r.stdout) vs \(hex)")
        let theirs = (try? Data(contentsOf: URL(fileURLWithPath: dir.file("tree")))).map { [UInt8]($0) } ?? []
        #expect(tree.treeBytes == theirs, "tree of \(tree.treeBytes.count) bytes vs \(theirs.count)")
    }

    /// The verifier passes every block of the blob, fetches only the tree blocks a check needs, and
    /// refuses a flipped byte, a tampered tree block and a wrong digest.
    @Test func verifierChecksBlocksAgainstTheDigest() throws {
        var rng = SplitMix(seed: 99)
        let size = 300 * 4096 + 123
        let data = (0..<size).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        let tree = try FsVerityTree(size: UInt64(size)) { off, n in Array(data[Int(off)..<(Int(off) + n)]) }
        let treeBytes = tree.treeBytes
        let requests = Locked(0)
        func verifier(tree bytes: [UInt8], digest: [UInt8] = tree.digest) -> VerityVerifier {
            VerityVerifier(digest: digest, dataSize: UInt64(size)) { off, n in
                requests.withLock { $0 += 1 }
                return Array(bytes[Int(off)..<min(Int(off) + n, bytes.count)])
            }
        }
        let v = verifier(tree: treeBytes)
        #expect(v.treeSize == UInt64(treeBytes.count))
        try v.check(offset: 65536, data: Array(data[65536..<(65536 + 65536)]))
        #expect(requests.get() <= 3 && v.treeBytesFetched.get() <= 3 * 4096, "\(requests.get()) requests for one granule")
        for off in stride(from: 0, to: size, by: 65536) { try v.check(offset: UInt64(off), data: Array(data[off..<min(off + 65536, size)])) }
        var flipped = Array(data[131072..<(131072 + 65536)])
        flipped[777] ^= 1
        #expect(throws: RemoteError.self) { try v.check(offset: 131072, data: flipped) }
        var tampered = treeBytes
        tampered[treeBytes.count - 10] ^= 1  // the last leaf block: covers the blob's last blocks
        let t = verifier(tree: tampered)
        try t.check(offset: 0, data: Array(data[0..<65536]))
        #expect(throws: RemoteError.self) { try t.check(offset: UInt64(size - 123), data: Array(data[(size - 123)...])) }
        var wrong = tree.digest
        wrong[0] ^= 1
        #expect(throws: RemoteError.self) { try verifier(tree: treeBytes, digest: wrong).check(offset: 0, data: Array(data[0..<4096])) }
    }
}
