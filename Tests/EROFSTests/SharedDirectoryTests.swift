import Foundation
import Testing
@testable import EROFS
import TestSupport

/// A crafted image whose directories all share one data block, each listing all the others: the
/// metadata walk must visit each block and nid once (it used to re-parse the shared block for every
/// directory and queue its entries again each time: N² in time and memory).
@Suite(.enabled(if: mkfsAvailable, "needs mkfs.erofs (erofs-utils) to build the image it crafts"))
struct SharedDirectoryTests {
    /// The root lists d000…d199; every d### is patched to point at the root's own data block.
    static func craft() throws -> [UInt8] {
        let dir = try ScratchDir("shared-dirs")
        defer { dir.remove() }
        for i in 0..<200 {
            try FileManager.default.createDirectory(atPath: dir.file("tree/d" + String(format: "%03d", i)),
                                                    withIntermediateDirectories: true)
        }
        try Samples.mkfs(dir.file("tree"), dir.file("img"), ["-Enoinline_data"])
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir.file("img"))))
        let img = try EROFSImage(source: MemorySource(bytes))
        let root = try img.root
        #expect(root.layout == .flatPlain, "noinline_data keeps the root's entries in a block of their own")
        for e in try img.entries(root) where e.name.hasPrefix("d") {
            let ino = try img.inode(e.nid)
            let at = Int(ino.position)
            // i_size and i_u (raw_blkaddr) of a compact inode; the layout bits to FLAT_PLAIN.
            bytes[at] = UInt8(truncatingIfNeeded: ino.format & ~0x0E)
            for k in 0..<4 { bytes[at + 8 + k] = UInt8(truncatingIfNeeded: UInt32(root.size) >> (8 * k)) }
            for k in 0..<4 { bytes[at + 16 + k] = UInt8(truncatingIfNeeded: root.union >> (8 * k)) }
            #expect(!ino.isExtended)
        }
        return bytes
    }

    @Test func eachSharedBlockIsReadOnce() throws {
        let bytes = try Self.craft()
        let source = RecordingSource(MemorySource(bytes))
        let img = try EROFSImage(source: source, verifyChecksum: false)
        let blocks = try img.dataRanges(try img.root, from: 0, to: try img.root.size)
        let meta = try img.metadataRanges()
        let readOfShared = source.ranges.filter { r in blocks.contains { $0.offset < r.end && r.offset < $0.end } }
            .reduce(0) { $0 + $1.length }
        #expect(readOfShared <= 2 * blocks.reduce(0) { $0 + $1.length }, "the shared block was read \(readOfShared) bytes' worth")
        #expect(meta.directories >= 201)
        #expect(meta.inodes == 201)
    }
}
