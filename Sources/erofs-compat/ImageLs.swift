import ArgumentParser
import EROFS

/// `erofs-compat image ls IMAGE [PATH] [-l]`.
struct ImageLs: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ls", abstract: "List a directory of the image (sorted by name).")

    @Flag(name: .short, help: "Long format: mode, links, owner, size, mtime, name (-> target).")
    var long = false

    @Argument(help: "The EROFS image.") var image: String
    @Argument(help: "A path inside the image.") var path: String = "/"

    func run() throws {
        try withImage(image) { img in
            let node = try img.resolve(path)
            var rows: [(String, Inode)] = []
            if node.type == .directory {
                for e in try img.entries(node) where e.name != "." && e.name != ".." {
                    rows.append((e.name, try img.inode(e.nid)))
                }
            } else {
                rows.append((path, node))
            }
            rows.sort { Array($0.0.utf8).lexicographicallyPrecedes(Array($1.0.utf8)) }
            for (name, ino) in rows {
                guard long else { print(name); continue }
                var line = "\(modeString(ino)) \(ino.nlink) \(ino.uid) \(ino.gid) \(ino.size) \(ino.mtime) \(name)"
                if ino.type == .symlink { line += " -> " + (try img.symlinkTarget(ino)) }
                if ino.type == .characterDevice || ino.type == .blockDevice { line += " [rdev \(ino.rdev)]" }
                print(line)
            }
        }
    }
}
