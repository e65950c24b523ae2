import ArgumentParser
import EROFS
import SystemPackage

/// `erofs-compat image cat IMAGE PATH`.
struct ImageCat: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "cat", abstract: "Write a regular file of the image to standard output.")

    @Argument(help: "The EROFS image.") var image: String
    @Argument(help: "A regular file inside the image.") var path: String

    func run() throws {
        try withImage(image) { img in
            let node = try img.resolve(path)
            guard node.type == .regular else {
                if node.type == .directory { throw EROFSError.isADirectory(path: path) }
                throw CLIFailure(message: "'\(path)' is a \(node.type.rawValue), not a regular file", code: 4)
            }
            var pos: UInt64 = 0
            while pos < node.size {
                let chunk = try img.readData(node, at: pos, count: 1 << 20)
                guard !chunk.isEmpty else { break }
                do { _ = try FileDescriptor.standardOutput.writeAll(chunk) } catch {
                    throw CLIFailure(message: "writing to standard output: \(error)", code: 1)
                }
                pos += UInt64(chunk.count)
            }
        }
    }
}
