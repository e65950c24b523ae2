import ArgumentParser
import EROFS
import Glibc
import Remote
import Syscall

/// `erofs-compat image verity IMAGE [--tree OUT]`.
struct ImageVerity: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verity",
        abstract: "Print the image's fs-verity digest (SHA-256 Merkle tree, 4 KiB blocks, no salt), as 'fsverity digest' does.")

    @Option(help: ArgumentHelp("Also write the Merkle tree (as the kernel stores it: top level first).", valueName: "OUT"))
    var tree: String?
    @Argument(help: "The EROFS image.") var image: String

    func run() throws {
        let digest: FsVerityTree = try withImage(image) { img in
            try FsVerityTree(size: img.source.size) { try img.source.read(at: $0, count: $1) }
        }
        if let tree {
            do { try Sys.writeFileAtomically(tree, digest.treeBytes, mode: 0o644) } catch {
                throw CLIFailure(message: "cannot write the tree to \(tree): \(error)", code: 1)
            }
        }
        print("sha256:" + digest.digest.map { String(hexByte: $0) }.joined() + " " + image)
    }
}
