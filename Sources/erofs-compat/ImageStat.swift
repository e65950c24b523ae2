import ArgumentParser
import EROFS

/// `erofs-compat image stat IMAGE PATH`.
struct ImageStat: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stat", abstract: "Show an inode of the image: type, mode, owner, size, layout, xattrs.")

    @Flag(help: "Also list the data extents (logical range → physical range).") var extents = false
    @Argument(help: "The EROFS image.") var image: String
    @Argument(help: "A path inside the image.") var path: String

    func run() throws {
        try withImage(image) { img in
            let n = try img.resolve(path)
            print("path:    \(path)")
            print("nid:     \(n.nid) (\(n.isExtended ? "extended" : "compact") inode at offset \(n.position))")
            print("type:    \(n.type.rawValue)")
            print("mode:    \(modeString(n)) (0\(String(n.permissions, radix: 8)))")
            print("owner:   uid \(n.uid) gid \(n.gid)")
            print("size:    \(n.size)")
            print("links:   \(n.nlink)")
            print("mtime:   \(n.mtime).\(n.mtimeNsec)")
            print("layout:  \(n.layout)")
            if n.type == .symlink { print("target:  \(try img.symlinkTarget(n))") }
            if n.type == .characterDevice || n.type == .blockDevice { print("rdev:    \(n.rdev)") }
            if extents {
                for (i, e) in try img.extents(n).enumerated() {
                    let phys = e.physical.map { "\($0.offset)..\($0.end) (\($0.length))" } ?? "-"
                    print("extent \(i): \(e.logical.offset)..\(e.logical.end) (\(e.logical.length)) -> \(phys) \(e.kind)")
                }
            }
            for x in try img.xattrs(n) {
                let printable = x.value.allSatisfy { $0 >= 0x20 && $0 < 0x7F }
                print("xattr:   \(x.name)=" + (printable ? "\"\(String(decoding: x.value, as: UTF8.self))\"" : "0x" + x.value.map { String($0, radix: 16).leftPad2 }.joined()))
            }
        }
    }
}

extension String {
    var leftPad2: String { count == 1 ? "0" + self : self }
}
