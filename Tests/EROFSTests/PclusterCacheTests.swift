import Foundation
import Testing
@testable import EROFS
import TestSupport

/// Reading a compressed file piece by piece decompresses each extent once.
@Suite(.enabled(if: TestEnv.which("mkfs.erofs") != nil, "needs mkfs.erofs (erofs-utils)"))
struct PclusterCacheTests {
    @Test func piecesOfAPclusterDecompressItOnce() throws {
        let dir = try ScratchDir("pcluster-cache")
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.file("tree"), withIntermediateDirectories: true)
        var rng = SplitMix(seed: 9)
        let words = (0..<500).map { _ in String(repeating: "abcdefgh".randomElement(using: &rng)!, count: 1 + Int(rng.next() % 7)) }
        var text = ""
        while text.utf8.count < 2 << 20 { text += words[Int(rng.next() % 500)] + " " }
        try text.write(toFile: dir.file("tree/text"), atomically: false, encoding: .utf8)
        try Samples.mkfs(dir.file("tree"), dir.file("img"), ["-zlz4hc", "-C65536"])
        let img = try EROFSImage(path: dir.file("img"))
        let ino = try img.resolve("/text")
        #expect(ino.layout.isCompressed)
        var got: [UInt8] = []
        while UInt64(got.count) < ino.size { got += try img.readData(ino, at: UInt64(got.count), count: 4096) }
        #expect(got == Array(text.utf8))
        let (hits, misses) = img.pclusters.counts
        let extents = try Compressed(image: img, inode: ino).extents().count
        #expect(misses == UInt64(extents), "\(misses) decompressions for \(extents) extents")
        #expect(hits >= UInt64(got.count / 4096) - UInt64(extents))
    }
}
