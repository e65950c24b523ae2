import Foundation
import Testing
@testable import EROFS
import TestSupport

/// Corrupt or truncated images give typed errors naming the structure and offset: never a crash,
/// an unbounded allocation or an endless loop.
@Suite(.enabled(if: mkfsAvailable, "needs mkfs.erofs (erofs-utils) to build the images it mutates"))
struct CorruptionTests {
    static func image(_ mkfs: [String]) throws -> [UInt8] {
        let dir = try ScratchDir("corrupt")
        defer { dir.remove() }
        try Samples.makeTree(at: dir.file("tree"))
        try FileManager.default.createDirectory(atPath: dir.file("tree/many"), withIntermediateDirectories: true)
        for i in 0..<300 { try Data("\(i)\n".utf8).write(to: URL(fileURLWithPath: dir.file("tree/many/n\(i)"))) }
        try Samples.mkfs(dir.file("tree"), dir.file("img"), mkfs)
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir.file("img"))))
    }

    /// Reads everything the reader can reach, bounded per file; returns how many inodes it saw.
    @discardableResult
    static func walkAll(_ img: EROFSImage, readLimit: Int = 1 << 20) throws -> Int {
        var seen = Set<UInt64>()
        var queue = [img.superblock.rootNid]
        while let nid = queue.popLast(), seen.count < 100_000 {
            guard seen.insert(nid).inserted else { continue }
            let ino = try img.inode(nid)
            _ = try img.xattrs(ino)
            switch ino.type {
            case .directory:
                let list = try img.entries(ino)
                for e in list where e.name != "." && e.name != ".." { queue.append(e.nid) }
                for e in [list.first, list.last].compactMap({ $0 }) { _ = try img.lookup(e.nameBytes, in: ino) }
            case .regular: _ = try img.readData(ino, at: 0, count: readLimit)
            case .symlink: _ = try img.symlinkTarget(ino)
            default: break
            }
        }
        _ = try img.metadataRanges()
        return seen.count
    }

    @Test func truncatedImages() throws {
        let bytes = try Self.image(["-zlz4hc"])
        #expect(try Self.walkAll(EROFSImage(source: MemorySource(bytes))) > 300)
        for cut in [0, 100, 1024, 1100, 4096, bytes.count / 2] {
            do {
                try Self.walkAll(EROFSImage(source: MemorySource(Array(bytes.prefix(cut)))))
                Issue.record("truncated at \(cut) but fully readable")
            } catch let e as EROFSError {
                #expect(!e.description.isEmpty)
            }
        }
    }

    @Test func namedStructures() throws {
        var bytes = try Self.image([])
        let img = try EROFSImage(source: MemorySource(bytes))
        let root = try img.root
        // A directory block whose first name offset is nonsense.
        let dirData = try img.extents(root).first!.physical!.offset
        bytes[Int(dirData) + 8] = 7
        bytes[Int(dirData) + 9] = 0
        do {
            _ = try EROFSImage(source: MemorySource(bytes), verifyChecksum: false).entries(root)
            Issue.record("corrupt directory accepted")
        } catch let EROFSError.corrupt(structure, offset, detail) {
            #expect(structure.contains("directory block"))
            #expect(offset == 0)
            #expect(detail.contains("first name offset"))
        }
    }

    @Test func unknownAlgorithmIsNamed() throws {
        var bytes = try Self.image(["-zlz4hc"])
        let img = try EROFSImage(source: MemorySource(bytes))
        // The text file compresses; patch its map header's head-1 algorithm to 7.
        let text = try img.resolve("/dir/a.txt")
        #expect(text.layout.isCompressed)
        let header = Int((text.bodyEnd + 7) & ~7)
        bytes[header + 6] = 0x7
        let bad = try EROFSImage(source: MemorySource(bytes), verifyChecksum: false)
        #expect(throws: EROFSError.unsupportedAlgorithm("algorithm 7")) { _ = try bad.readData(try bad.resolve("/dir/a.txt"), at: 0, count: 100) }
    }

    /// Thousands of random byte flips and truncations of real images (fixed seed, bounded time):
    /// every outcome is data or a typed error.
    @Test(arguments: [[String](), ["-zlz4hc"], ["-zlz4", "-Elegacy-compress", "-Eztailpacking"], ["--chunksize=8192", "-Eforce-chunk-indexes"]])
    func mutationFuzz(mkfs: [String]) throws {
        let original = try Self.image(mkfs)
        let meta = try EROFSImage(source: MemorySource(original)).metadataRanges()
        // EROFS_FUZZ_SEED / EROFS_FUZZ_SECONDS allow longer local runs; CI uses the fixed defaults.
        let env = ProcessInfo.processInfo.environment
        var rng = SplitMix(seed: (env["EROFS_FUZZ_SEED"].flatMap { UInt64($0) } ?? 0xE20F5) &+ UInt64(mkfs.count))
        let seconds = env["EROFS_FUZZ_SECONDS"].flatMap { Double($0) } ?? 10
        let deadline = Date().addingTimeInterval(seconds)
        var runs = 0, errors = 0
        while runs < (seconds > 10 ? Int.max : 2000), Date() < deadline {
            var b = original
            let flips = Int(rng.next() % 8) + 1
            for _ in 0..<flips {
                // Mostly metadata (where structure lives), sometimes anywhere.
                let pos: Int
                if rng.next() % 4 != 0, let r = meta.ranges.randomElement(using: &rng) {
                    pos = Int(r.offset + rng.next() % r.length)
                } else {
                    pos = Int(rng.next() % UInt64(b.count))
                }
                b[pos] = UInt8(truncatingIfNeeded: rng.next())
            }
            if rng.next() % 10 == 0 { b = Array(b.prefix(Int(rng.next() % UInt64(b.count)))) }
            do {
                try Self.walkAll(EROFSImage(source: MemorySource(b), verifyChecksum: rng.next() % 2 == 0), readLimit: 65536)
            } catch is EROFSError {
                errors += 1
            }
            runs += 1
        }
        #expect(runs >= 150, "only \(runs) mutants in the time budget")
        #expect(errors > 0)
    }
}

extension SplitMix: RandomNumberGenerator {}
