import EROFS
import FUSE
import Glibc

/// fuse-blob: one read-only regular file, `image`, whose bytes come from a block source (the lazy
/// reader of a remote blob, or a local image); kernel EROFS is then mounted on that file. A range
/// the source cannot produce is EIO, never zeros. The file is root's, mode 0400.
final class BlobFilesystem: FUSEFilesystem, @unchecked Sendable {  // immutable; the source is thread-safe
    static let fileName = Array("image".utf8)
    static let fileNode: UInt64 = 2
    let size: UInt64
    let mtime: UInt64
    /// The file's passthrough backing id: its opens name the backing file, its reads never come here.
    let backingID: Int32?
    private let readBytes: @Sendable (UInt64, Int) throws -> [UInt8]
    private let region: @Sendable (UInt64, Int) throws -> FileRegion?

    init(size: UInt64, mtime: UInt64, backing: Int32? = nil, read: @escaping @Sendable (UInt64, Int) throws -> [UInt8],
         region: @escaping @Sendable (UInt64, Int) throws -> FileRegion? = { _, _ in nil }) {
        (self.size, self.mtime, backingID, readBytes, self.region) = (size, mtime, backing, read, region)
    }

    func backing(_ node: UInt64) -> Int32? { node == Self.fileNode ? backingID : nil }

    private func attr(_ node: UInt64) throws(FUSEError) -> FUSEAttr {
        switch node {
        case FUSELayout.rootNode:
            return FUSEAttr(ino: 1, size: 0, blocks: 0, mtime: mtime, mtimeNsec: 0, mode: UInt32(S_IFDIR) | 0o500,
                            nlink: 2, uid: 0, gid: 0, rdev: 0, blockSize: 4096)
        case Self.fileNode:
            return FUSEAttr(ino: 2, size: size, blocks: (size + 511) / 512, mtime: mtime, mtimeNsec: 0,
                            mode: UInt32(S_IFREG) | 0o400, nlink: 1, uid: 0, gid: 0, rdev: 0, blockSize: 4096)
        default: throw .noEntry
        }
    }

    func lookup(parent: UInt64, name: [UInt8]) throws(FUSEError) -> FUSEEntry {
        guard parent == FUSELayout.rootNode else { throw .notDirectory }
        guard name == Self.fileName else { throw .noEntry }
        return FUSEEntry(node: Self.fileNode, attr: try attr(Self.fileNode))
    }

    func getattr(_ node: UInt64) throws(FUSEError) -> FUSEAttr { try attr(node) }
    func readlink(_ node: UInt64) throws(FUSEError) -> [UInt8] { throw .invalid }

    func open(_ node: UInt64, directory: Bool) throws(FUSEError) {
        guard (node == FUSELayout.rootNode) == directory else { throw directory ? .notDirectory : FUSEError(EISDIR) }
        _ = try attr(node)
    }

    func read(_ node: UInt64, offset: UInt64, size count: Int) throws(FUSEError) -> [UInt8] {
        guard node == Self.fileNode else { throw FUSEError(EISDIR) }
        guard offset < size else { return [] }
        let n = Int(min(UInt64(count), size - offset))
        do { return try readBytes(offset, n) } catch { throw .io }
    }

    func readRegion(_ node: UInt64, offset: UInt64, size count: Int) throws(FUSEError) -> FUSEFileRegion? {
        guard node == Self.fileNode else { throw FUSEError(EISDIR) }
        guard offset < size else { return nil }
        let n = Int(min(UInt64(count), size - offset))
        do { return try region(offset, n).map { FUSEFileRegion(fd: $0.fd, offset: $0.offset, length: n) } } catch {
            throw .io
        }
    }

    func readdir(_ node: UInt64, after: UInt64, plus: Bool) throws(FUSEError) -> [FUSEDirEntry] {
        guard node == FUSELayout.rootNode else { throw .notDirectory }
        let file = FUSEEntry(node: Self.fileNode, attr: try attr(Self.fileNode))
        let all = [FUSEDirEntry(name: [0x2e], ino: 1, type: 4, cookie: 1, entry: nil),
                   FUSEDirEntry(name: [0x2e, 0x2e], ino: 1, type: 4, cookie: 2, entry: nil),
                   FUSEDirEntry(name: Self.fileName, ino: 2, type: 8, cookie: 3, entry: plus ? file : nil)]
        return Array(all.dropFirst(Int(min(after, 3))))
    }

    func getxattr(_ node: UInt64, name: [UInt8]) throws(FUSEError) -> [UInt8] { throw .noData }
    func listxattr(_ node: UInt64) throws(FUSEError) -> [[UInt8]] { [] }
    func statfs() -> FUSEStatfs { FUSEStatfs(blocks: (size + 4095) / 4096, files: 2, blockSize: 4096) }
}
