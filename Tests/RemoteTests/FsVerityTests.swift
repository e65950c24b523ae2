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
}
