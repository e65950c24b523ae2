import ArgumentParser
import EROFS
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `erofs-compat image meta-ranges IMAGE [--json]`.
struct ImageMetaRanges: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "meta-ranges",
        abstract: "Print the block-aligned byte ranges a mount reads before any file data, and their total."
    )

    @Flag(help: "Print JSON.") var json = false
    @Argument(help: "The EROFS image.") var image: String

    func run() throws {
        let m = try withImage(image) { try $0.metadataRanges() }
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try enc.encode(m), as: UTF8.self))
            return
        }
        for r in m.ranges { print("\(r.offset)\t\(r.length)") }
        print("total \(m.totalBytes) bytes in \(m.ranges.count) ranges of a \(m.imageSize)-byte image (\(m.inodes) inodes, \(m.directories) directories)")
    }
}
