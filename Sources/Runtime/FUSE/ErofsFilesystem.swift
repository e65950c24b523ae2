import EROFS
import FUSE
import Glibc
import Syscall

/// fuse-erofs: an EROFS image served as a FUSE filesystem by the user-space reader, for kernels
/// without EROFS (or without the image's features) and for callers who may not mount EROFS.
/// Node ids are nids shifted past FUSE's reserved 0 and 1 (the root is node 1); attributes are the
/// kernel EROFS driver's (ino = nid, the one timestamp for a/m/ctime, 4 KiB st_blksize).
// @unchecked: the image is only read after init; the caches are behind locks.
final class ErofsFilesystem: FUSEFilesystem, @unchecked Sendable {  // the reader is thread-safe; caches lock themselves
    let image: EROFSImage
    private let rootNid: UInt64
    /// Parsed inodes and directory listings: every getattr, lookup and readdir would parse them again.
    private let inodes = BoundedCache<UInt64, Inode>(limit: 1 << 16)
    private let listings = BoundedCache<UInt64, [FUSEDirEntry]>(limit: 1 << 12)
    /// Where READDIRPLUS listed each node (its directory and index): the kernel has those inodes, so
    /// their bytes can be pushed into its page cache (`following`).
    private let listed = BoundedCache<UInt64, (dir: UInt64, index: Int)>(limit: 1 << 17)
    /// Files larger than this are left to the kernel's own readahead.
    static let pushLimit: UInt64 = 256 << 10

    init(image: EROFSImage) {
        self.image = image
        rootNid = image.superblock.rootNid
    }

    func nid(_ node: UInt64) -> UInt64 { node == FUSELayout.rootNode ? rootNid : node - 2 }
    func node(_ nid: UInt64) -> UInt64 { nid == rootNid ? FUSELayout.rootNode : nid + 2 }

    func inode(_ node: UInt64) throws(FUSEError) -> Inode {
        guard node != 0 else { throw .invalid }
        let n = nid(node)
        if let cached = inodes[n] { return cached }
        do {
            let ino = try image.inode(n)
            inodes[n] = ino
            return ino
        } catch { throw Self.failure(error) }
    }

    /// Every reader error is EIO: the image is corrupt or its bytes could not be fetched.
    static func failure(_ error: Error) -> FUSEError {
        if let e = error as? FUSEError { return e }
        return .io
    }

    func attr(_ i: Inode) -> FUSEAttr {
        let bs = image.blockSize
        // The kernel reports a compressed inode's stored blocks, a flat one's rounded size.
        let blocks = i.layout.isCompressed ? UInt64(i.union) * (bs / 512) : (i.size + bs - 1) / bs * (bs / 512)
        let special = i.type == .characterDevice || i.type == .blockDevice
        return FUSEAttr(ino: i.nid, size: i.size, blocks: blocks, mtime: i.mtime, mtimeNsec: i.mtimeNsec,
                        mode: UInt32(i.mode), nlink: i.nlink, uid: i.uid, gid: i.gid, rdev: special ? i.rdev : 0,
                        blockSize: 4096)
    }

    func lookup(parent: UInt64, name: [UInt8]) throws(FUSEError) -> FUSEEntry {
        let dir = try inode(parent)
        guard dir.type == .directory else { throw .notDirectory }
        let found: DirEntry?
        do { found = try image.lookup(name, in: dir) } catch { throw Self.failure(error) }
        guard let found else { throw .noEntry }
        let child = try inode(node(found.nid))
        return FUSEEntry(node: node(found.nid), attr: attr(child))
    }

    func getattr(_ node: UInt64) throws(FUSEError) -> FUSEAttr { attr(try inode(node)) }

    func readlink(_ node: UInt64) throws(FUSEError) -> [UInt8] {
        let i = try inode(node)
        guard i.type == .symlink else { throw .invalid }
        do { return try image.readAll(i) } catch { throw Self.failure(error) }
    }

    func open(_ node: UInt64, directory: Bool) throws(FUSEError) {
        let i = try inode(node)
        if directory, i.type != .directory { throw .notDirectory }
        if !directory, i.type == .directory { throw FUSEError(EISDIR) }
    }

    func read(_ node: UInt64, offset: UInt64, size: Int) throws(FUSEError) -> [UInt8] {
        let i = try inode(node)
        guard i.type == .regular else { throw FUSEError(EISDIR) }
        do { return try image.readData(i, at: offset, count: size) } catch { throw Self.failure(error) }
    }

    func read(_ node: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(FUSEError) -> Int {
        let i = try inode(node)
        guard i.type == .regular else { throw FUSEError(EISDIR) }
        do { return try image.readData(i, at: offset, into: buffer) } catch { throw Self.failure(error) }
    }

    func readRegion(_ node: UInt64, offset: UInt64, size: Int) throws(FUSEError) -> FUSEFileRegion? {
        let i = try inode(node)
        guard i.type == .regular else { throw FUSEError(EISDIR) }
        do {
            return try image.dataRegion(i, at: offset, count: size).map {
                FUSEFileRegion(fd: $0.region.fd, offset: $0.region.offset, length: $0.length)
            }
        } catch { throw Self.failure(error) }
    }

    func readdir(_ node: UInt64, after: UInt64, plus: Bool) throws(FUSEError) -> [FUSEDirEntry] {
        let entries = try listing(node)
        guard after < UInt64(entries.count) else { return [] }
        var out = Array(entries[Int(after)...])
        if plus {
            for k in out.indices where out[k].name != [0x2e] && out[k].name != [0x2e, 0x2e] {
                let n = self.node(out[k].ino)
                out[k].entry = FUSEEntry(node: n, attr: attr(try inode(n)))
                listed[n] = (node, Int(after) + k)
            }
        }
        return out
    }

    func following(_ node: UInt64, limit: Int) -> [(node: UInt64, size: UInt64)] {
        guard let (dir, index) = listed[node], let entries = listings[dir] else { return [] }
        var out: [(node: UInt64, size: UInt64)] = []
        // A bounded look: a directory of large files is not scanned to its end on every read.
        for e in entries.dropFirst(index + 1).prefix(limit * 4) where e.type == 8 {
            let n = self.node(e.ino)
            guard out.count < limit, listed[n] != nil, let i = try? inode(n) else { break }
            if i.size <= Self.pushLimit { out.append((n, i.size)) }
        }
        return out
    }

    /// A directory's entries with their cookies (index + 1), "." first even where the image left it out.
    private func listing(_ node: UInt64) throws(FUSEError) -> [FUSEDirEntry] {
        if let cached = listings[node] { return cached }
        let dir = try inode(node)
        guard dir.type == .directory else { throw .notDirectory }
        let stored: [DirEntry]
        do { stored = try image.entries(dir) } catch { throw Self.failure(error) }
        var raw = stored.map { (name: $0.nameBytes, nid: $0.nid, type: Self.direntType($0.fileTypeCode)) }
        if !raw.contains(where: { $0.name == [0x2e] }) { raw.insert(([0x2e], dir.nid, 4), at: 0) }
        let out = raw.enumerated().map { k, e in
            FUSEDirEntry(name: e.name, ino: e.nid, type: e.type, cookie: UInt64(k + 1), entry: nil)
        }
        listings[node] = out
        return out
    }

    /// EROFS_FT_* to DT_*.
    static func direntType(_ ft: UInt8) -> UInt32 {
        switch ft {
        case 1: return 8  // DT_REG
        case 2: return 4  // DT_DIR
        case 3: return 2  // DT_CHR
        case 4: return 6  // DT_BLK
        case 5: return 1  // DT_FIFO
        case 6: return 12  // DT_SOCK
        case 7: return 10  // DT_LNK
        default: return 0
        }
    }

    func getxattr(_ node: UInt64, name: [UInt8]) throws(FUSEError) -> [UInt8] {
        let all: [Xattr]
        do { all = try image.xattrs(try inode(node)) } catch { throw Self.failure(error) }
        guard let x = all.first(where: { Array($0.name.utf8) == name }) else { throw .noData }
        return x.value
    }

    func listxattr(_ node: UInt64) throws(FUSEError) -> [[UInt8]] {
        do { return try image.xattrs(try inode(node)).map { Array($0.name.utf8) } } catch { throw Self.failure(error) }
    }

    func statfs() -> FUSEStatfs {
        let sb = image.superblock
        return FUSEStatfs(blocks: sb.blocks, files: sb.inodeCount, blockSize: UInt32(image.blockSize))
    }
}

/// A dictionary emptied when it reaches `limit` entries (an image's working set is usually far
/// smaller; a scan of a huge one starts over instead of growing without bound).
final class BoundedCache<Key: Hashable, Value>: @unchecked Sendable {  // the dictionary behind its lock
    private let store: Locked<[Key: Value]>
    let limit: Int
    init(limit: Int) { (self.limit, store) = (limit, Locked([:])) }

    subscript(key: Key) -> Value? {
        get { store.withLock { $0[key] } }
        set {
            store.withLock { d in
                if d.count >= limit { d.removeAll(keepingCapacity: true) }
                d[key] = newValue
            }
        }
    }
}
