import ArgumentParser
import EROFS
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `erofs-compat image extract IMAGE DIR`.
struct ImageExtract: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "extract",
        abstract: "Extract the whole image into an empty directory (modes, owners as root, symlinks, hard links, devices, xattrs where permitted)."
    )

    @Argument(help: "The EROFS image.") var image: String
    @Argument(help: "An existing empty directory, or a path to create.") var directory: String

    func run() throws {
        let fm = FileManager.default
        if fm.fileExists(atPath: directory) {
            guard let items = try? fm.contentsOfDirectory(atPath: directory) else {
                throw CLIFailure(message: "'\(directory)' is not a directory; pass an empty directory", code: 2)
            }
            guard items.isEmpty else { throw CLIFailure(message: "'\(directory)' is not empty; pass an empty directory", code: 2) }
        } else {
            do { try fm.createDirectory(atPath: directory, withIntermediateDirectories: false) } catch {
                throw CLIFailure(message: "cannot create '\(directory)': \(error)", code: 2)
            }
        }
        let summary = try withImage(image) { try Extractor(image: $0).extract(to: directory) }
        for w in summary.warnings { printError(w) }
        print("extracted \(summary.files) files (\(summary.bytes) bytes), \(summary.directories) directories, \(summary.symlinks) symlinks, \(summary.hardLinks) hard links, \(summary.specials) special files")
    }
}
