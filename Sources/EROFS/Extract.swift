import Glibc
import Syscall
import SystemPackage

/// Writes an image's tree into a directory: contents, modes, owners (as root), symlinks, hard links,
/// device nodes and FIFOs (as root), xattrs where permitted, mtimes.
public struct Extractor {
    public struct Summary: Sendable {
        public var files = 0, directories = 0, symlinks = 0, hardLinks = 0, specials = 0, bytes: UInt64 = 0
        /// What could not be applied (xattrs or owners without privilege), one line each.
        public var warnings: [String] = []
    }

    let image: EROFSImage
    let privileged: Bool

    public init(image: EROFSImage) {
        self.image = image
        privileged = Sys.hasCapSysAdmin() || geteuid() == 0
    }

    /// Extracts the whole image into `destination` (an empty directory, created when missing).
    public func extract(to destination: String) throws -> Summary {
        if !Sys.isDirectory(destination) { try Sys.mkdir(destination, mode: 0o700) }
        var summary = Summary()
        var seen: [UInt64: String] = [:]
        var dirTimes: [(String, Inode)] = []
        var visited = Set<UInt64>()
        func walk(_ dir: Inode, _ path: String, depth: Int) throws {
            guard depth < 4096 else { throw EROFSError.loop(structure: "directory nesting", offset: dir.position) }
            guard visited.insert(dir.nid).inserted else { throw EROFSError.loop(structure: "directory \(dir.nid)", offset: dir.position) }
            for e in try image.entries(dir) {
                if e.nameBytes == [0x2E] || e.nameBytes == [0x2E, 0x2E] { continue }
                guard !e.nameBytes.contains(0x2F), !e.nameBytes.contains(0) else {
                    throw EROFSError.corrupt(structure: "directory \(dir.nid)", offset: dir.position, detail: "name with '/' or NUL")
                }
                let child = try image.inode(e.nid)
                let target = path + "/" + e.name
                if child.type != .directory, let first = seen[child.nid] {
                    try Sys.link(first, target)
                    summary.hardLinks += 1
                    continue
                }
                switch child.type {
                case .directory:
                    try Sys.mkdir(target, mode: 0o700)
                    summary.directories += 1
                    try walk(child, target, depth: depth + 1)
                    dirTimes.append((target, child))
                    try applyAttributes(child, target, &summary)
                    continue
                case .regular:
                    try writeFile(child, target, &summary)
                case .symlink:
                    try Sys.symlink(try image.symlinkTarget(child), at: target)
                    summary.symlinks += 1
                case .characterDevice, .blockDevice, .fifo, .socket:
                    let typeBits: UInt32 = [.characterDevice: 0o020000, .blockDevice: 0o060000, .fifo: 0o010000, .socket: 0o140000][child.type]!
                    if child.type == .fifo || privileged {
                        let rdev = child.rdev
                        try Sys.mknod(target, mode: typeBits | 0o600, device: Sys.makedev((rdev >> 8) & 0xfff, (rdev & 0xff) | ((rdev >> 12) & 0xfff00)))
                        summary.specials += 1
                    } else {
                        summary.warnings.append("\(target): \(child.type.rawValue) not created (needs root)")
                        continue
                    }
                }
                seen[child.nid] = target
                try applyAttributes(child, target, &summary)
            }
        }
        let root = try image.root
        try walk(root, destination, depth: 0)
        try applyAttributes(root, destination, &summary)
        // Directory mtimes last: creating entries changes them.
        for (path, ino) in dirTimes.reversed() { try? Sys.setTimes(path, seconds: Int64(ino.mtime), nanoseconds: Int64(ino.mtimeNsec)) }
        try? Sys.setTimes(destination, seconds: Int64(root.mtime), nanoseconds: Int64(root.mtimeNsec))
        return summary
    }

    func writeFile(_ ino: Inode, _ path: String, _ summary: inout Summary) throws {
        let fd = try Sys.open(path, O_WRONLY | O_CREAT | O_EXCL, mode: 0o600)
        defer { Sys.close(fd.rawValue) }
        var pos: UInt64 = 0
        let chunk = 1 << 20
        while pos < ino.size {
            let data = try image.readData(ino, at: pos, count: chunk)
            guard !data.isEmpty else { throw EROFSError.truncated(structure: "data of inode \(ino.nid)", offset: ino.position) }
            // Holes stay holes: skip all-zero chunks.
            if data.contains(where: { $0 != 0 }) {
                try data.withUnsafeBytes { try Sys.pwriteAll(fd.rawValue, $0, at: Int64(pos)) }
            }
            pos += UInt64(data.count)
        }
        try Sys.ftruncate(fd.rawValue, Int64(ino.size))
        summary.files += 1
        summary.bytes += ino.size
    }

    func applyAttributes(_ ino: Inode, _ path: String, _ summary: inout Summary) throws {
        if privileged {
            try Sys.lchown(path, uid: ino.uid, gid: ino.gid)
        }
        for x in try image.xattrs(ino) {
            do { try Sys.lsetxattr(path, x.name, x.value) } catch {
                summary.warnings.append("\(path): xattr \(x.name) not set (\(error))")
            }
        }
        if ino.type != .symlink { try Sys.chmod(path, UInt32(ino.permissions)) }
        if ino.type != .directory { try Sys.setTimes(path, seconds: Int64(ino.mtime), nanoseconds: Int64(ino.mtimeNsec)) }
    }
}
