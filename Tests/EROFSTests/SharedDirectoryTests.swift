import Foundation
import Testing
@testable import EROFS
import TestSupport

/// A crafted image whose directories all share one data block, each listing all the others: the
/// metadata walk must visit each block and nid once (it used to re-parse the shared block for every
/// directory and queue its entries again each time: N² in time and memory).
@Suite(.enabled(if: mkfsAvailable, "needs mkfs.erofs (erofs-utils) to build the image it crafts"))
struct SharedDirectoryTests {
    /// The root lists d000…d399 (a full block and an inline tail); every d### is patched to a plain
    /// directory of one block: the root's first.
    static func craft() throws -> [UInt8] {
        let dir = try ScratchDir("shared-dirs")
        defer { dir.remove() }
        for i in 0..<400 {
            try FileManager.default.createDirectory(atPath: dir.file("tree/d" + String(format: "%03d", i)),
                                                    withIntermediateDirectories: true)
        }
        try Samples.mkfs(dir.file("tree"), dir.file("img"), ["-T0"])
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir.file("img"))))
        let img = try EROFSImage(source: MemorySource(bytes))
        let root = try img.root
        try #require(root.size > 4096 && root.layout != .chunkBased && !root.layout.isCompressed, "the root has a block of its own")
        for e in try img.entries(root) where e.name.hasPrefix("d") {
            let ino = try img.inode(e.nid)
            let at = Int(ino.position)
            // The layout bits to FLAT_PLAIN, i_size to one block, i_u (raw_blkaddr) to the root's.
            bytes[at] = UInt8(truncatingIfNeeded: ino.format & ~0x0E)
            for k in 0..<(ino.isExtended ? 8 : 4) { bytes[at + 8 + k] = UInt8(truncatingIfNeeded: UInt64(4096) >> (8 * k)) }
            for k in 0..<4 { bytes[at + 16 + k] = UInt8(truncatingIfNeeded: root.union >> (8 * k)) }
        }
        return bytes
    }

    @Test func eachSharedBlockIsReadOnce() throws {
        let bytes = try Self.craft()
        let source = RecordingSource(MemorySource(bytes))
        let img = try EROFSImage(source: source, verifyChecksum: false)
        let blocks = try img.dataRanges(try img.root, from: 0, to: 4096)
        let meta = try img.metadataRanges()
        let readOfShared = source.ranges.filter { r in blocks.contains { $0.offset < r.end && r.offset < $0.end } }
            .reduce(0) { $0 + $1.length }
        #expect(readOfShared <= 2 * blocks.reduce(0) { $0 + $1.length }, "the shared block was read \(readOfShared) bytes' worth")
        #expect(meta.inodes == 401)
    }
}
