import ArgumentParser
import EROFS

/// `erofs-compat image …`: read EROFS images in user space, without mounting.
struct ImageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image",
        abstract: "Read an EROFS image in user space: list, cat, stat, extract, metadata ranges, fs-verity digest.",
        discussion: """
            Exit codes: 0 success, 1 the image is corrupt or uses something this reader lacks (named) or \
            extraction failed, 2 usage error, 3 IMAGE is missing or not EROFS, 4 PATH is not in the image.
            """,
        subcommands: [ImageLs.self, ImageCat.self, ImageStat.self, ImageExtract.self, ImageMetaRanges.self, ImageVerity.self]
    )
}

/// Opens an image and maps reader errors to one line and the documented exit code.
func withImage<T>(_ path: String, _ body: (EROFSImage) throws -> T) throws -> T {
    let image: EROFSImage
    do {
        image = try EROFSImage(path: path)
    } catch let e as EROFSError {
        switch e {
        case .notEROFS, .truncated, .unsupportedBlockSize, .badChecksum, .notAnImageFile:
            throw CLIFailure(message: "'\(path)': \(e)", code: 3)
        default:
            throw CLIFailure(message: "'\(path)': \(e)", code: 1)
        }
    } catch {
        throw CLIFailure(message: "cannot open image '\(path)': \(error); check the path", code: 3)
    }
    do {
        return try body(image)
    } catch let e as EROFSError {
        switch e {
        case .notFound, .notADirectory, .isADirectory: throw CLIFailure(message: "\(e)", code: 4)
        default: throw CLIFailure(message: "'\(path)': \(e)", code: 1)
        }
    }
}

/// `ls -l`-style mode string.
func modeString(_ ino: Inode) -> String {
    let t: Character = switch ino.type {
    case .directory: "d"
    case .symlink: "l"
    case .characterDevice: "c"
    case .blockDevice: "b"
    case .fifo: "p"
    case .socket: "s"
    case .regular: "-"
    }
    let m = ino.permissions
    var s = String(t)
    for (i, c) in "rwxrwxrwx".enumerated() { s.append(m & (0o400 >> UInt16(i)) != 0 ? c : "-") }
    let chars = Array(s)
    var out = chars
    if m & 0o4000 != 0 { out[3] = chars[3] == "x" ? "s" : "S" }
    if m & 0o2000 != 0 { out[6] = chars[6] == "x" ? "s" : "S" }
    if m & 0o1000 != 0 { out[9] = chars[9] == "x" ? "t" : "T" }
    return String(out)
}
