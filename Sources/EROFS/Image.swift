/// A read-only view of an EROFS image through an `ImageSource`.
public final class EROFSImage {
    public let source: ImageSource
    public let superblock: Superblock
    public let blockSize: UInt64
    /// Algorithm configurations from the COMPR_CFGS area (LZMA dictionary size etc.).
    public private(set) var compressionConfigs: [UInt8: [UInt8]] = [:]
    /// Long xattr name prefixes (XATTR_PREFIXES): (base index, infix).
    public private(set) var longPrefixes: [(base: UInt8, infix: [UInt8])] = []
    /// Extra devices from the device table: (tag, blocks, mapped block address).
    public private(set) var devices: [(tag: [UInt8], blocks: UInt32, mappedBlockAddress: UInt32)] = []
    /// The metabox inode (METABOX images): its data holds inodes and their inline metadata.
    public private(set) var metabox: Inode?

    /// Decompressed extents recently read (32 MiB at most).
    public let pclusters = PclusterCache(limit: 32 << 20)
    /// Compressed extents already mapped (a million at most).
    let extentsSeen = ExtentCache(limit: 1 << 20)

    /// Upper bounds that keep corrupt images from causing unbounded work or memory.
    public static let maxDirectoryEntries = 1 << 20
    public static let maxInlineRead = 1 << 30

    public init(source: ImageSource, verifyChecksum: Bool = true) throws {
        self.source = source
        let sb = try Self.superblock(of: source, verifyChecksum: verifyChecksum)
        superblock = sb
        blockSize = UInt64(sb.blockSize)
        if let missing = Self.unimplemented(sb) { throw EROFSError.unsupportedFeature(missing) }
        if sb.featureIncompat & Feature.metabox.rawValue != 0 {
            guard sb.metaboxNid & Self.metaboxBit == 0 else {
                throw EROFSError.corrupt(structure: "superblock", offset: Superblock.offset, detail: "the metabox inode is in the metabox")
            }
            metabox = try inode(sb.metaboxNid)
        }
        try loadCompressionConfigs()
        try loadDevices()
        try loadLongPrefixes()
    }

    /// The first feature of `sb` this reader does not implement, if any (reserved directory block
    /// sizes and incompat bits it does not know; the kernel refuses those images too).
    public static func unimplemented(_ sb: Superblock) -> String? {
        // Reserved: directory blocks are filesystem blocks (the kernel refuses other values too).
        if sb.dirBlockBits != 0 { return "dirblkbits \(sb.dirBlockBits)" }
        let known = Feature.table.reduce(UInt32(0)) { $0 | $1.bit }
        if sb.featureIncompat & ~known != 0 { return "unknown incompat bits 0x\(String(sb.featureIncompat & ~known, radix: 16))" }
        return nil
    }

    /// The superblock of the image in `source` (with as much of the first block as its checksum covers).
    public static func superblock(of source: ImageSource, verifyChecksum: Bool = true) throws -> Superblock {
        let head = try source.read(at: Superblock.offset, count: 4096 - Int(Superblock.offset))
        guard head.count >= 128 else { throw EROFSError.truncated(structure: "superblock", offset: Superblock.offset) }
        var sbBytes = head
        if head[12] > 12, head[12] <= 16 {
            sbBytes = try source.read(at: Superblock.offset, count: (1 << Int(head[12])) - Int(Superblock.offset))
        }
        return try Superblock(parsing: sbBytes, verifyChecksum: verifyChecksum)
    }

    public convenience init(path: String) throws {
        try self.init(source: try FileSource(path: path))
    }

    // MARK: raw access

    /// Metadata positions with this bit set are offsets in the metabox inode's data (METABOX
    /// images keep inodes there, possibly compressed); a nid with it set names such an inode.
    static let metaboxBit: UInt64 = 1 << 63

    /// `count` bytes at a metadata position (in the image, or in the metabox).
    func bytes(_ offset: UInt64, _ count: Int, _ what: String) throws -> [UInt8] {
        let b = try readMeta(offset, count)
        guard b.count == count else { throw EROFSError.truncated(structure: what, offset: offset) }
        return b
    }

    /// Up to `count` bytes at a metadata position.
    func readMeta(_ offset: UInt64, _ count: Int) throws -> [UInt8] {
        guard offset & Self.metaboxBit != 0 else { return try source.read(at: offset, count: count) }
        guard let metabox else {
            throw EROFSError.corrupt(structure: "metadata", offset: offset, detail: "a metabox position in an image without a metabox")
        }
        return try readData(metabox, at: offset & ~Self.metaboxBit, count: count)
    }

    func blockAddress(_ blk: UInt32) -> UInt64 { UInt64(blk) * blockSize }

    /// Where shared xattr `id` is: in the shared xattr area, which SHARED_EA_IN_METABOX images keep
    /// in the metabox.
    func sharedXattrPosition(_ id: UInt64) -> UInt64 {
        let pos = blockAddress(superblock.xattrBlockAddress) &+ id &* 4
        return superblock.featureCompat & CompatFeature.sharedXattrInMetabox.rawValue != 0 ? Self.metaboxBit | pos : pos
    }
    func blockAddress(_ blk: UInt64) -> UInt64 { blk &* blockSize }

    /// The metadata area: inodes live at meta_blkaddr × blocksize + nid × 32, or (metabox nids) at
    /// nid × 32 in the metabox inode's data.
    func inodePosition(_ nid: UInt64) -> UInt64 {
        if nid & Self.metaboxBit != 0 { return Self.metaboxBit | ((nid & ~Self.metaboxBit) &* 32) }
        return blockAddress(superblock.metaBlockAddress) &+ nid &* 32
    }

    private func loadCompressionConfigs() throws {
        guard superblock.featureIncompat & Feature.comprCfgs.rawValue != 0 else { return }
        var pos = Superblock.offset + UInt64(superblock.size)
        var algs = superblock.u1
        var alg: UInt8 = 0
        while algs != 0 {
            if algs & 1 != 0 {
                let len = Int(LEBytesValue.u16(try bytes(pos, 2, "compression config")))
                guard len <= 256 else { throw EROFSError.corrupt(structure: "compression config", offset: pos, detail: "length \(len)") }
                compressionConfigs[alg] = try bytes(pos + 2, len, "compression config")
                pos += 2 + UInt64(len)
            }
            algs >>= 1
            alg += 1
        }
    }

    private func loadDevices() throws {
        guard superblock.extraDevices > 0 else { return }
        let base = UInt64(superblock.deviceTableSlotOffset) * 128
        for i in 0..<UInt64(superblock.extraDevices) {
            let slot = try bytes(base + i * 128, 128, "device slot \(i + 1)")
            let r = LEBytes(slot, origin: base + i * 128, structure: "device slot")
            devices.append((Array(slot[0..<64]), try r.u32(64), try r.u32(68)))
        }
    }

    private func loadLongPrefixes() throws {
        guard superblock.featureIncompat & Feature.xattrPrefixes.rawValue != 0, superblock.xattrPrefixCount > 0 else { return }
        var pos = UInt64(superblock.xattrPrefixStart) << 2
        let packed: Inode? = superblock.packedNid != 0 ? try inode(superblock.packedNid) : nil
        func read(_ off: UInt64, _ n: Int) throws -> [UInt8] {
            if let packed { return try readData(packed, at: off, count: n) }
            return try bytes(off, n, "xattr prefix table")
        }
        for _ in 0..<superblock.xattrPrefixCount {
            let len = Int(LEBytesValue.u16(try read(pos, 2)))
            guard len >= 1, len <= 256 else { throw EROFSError.corrupt(structure: "xattr prefix", offset: pos, detail: "length \(len)") }
            let rec = try read(pos + 2, len)
            longPrefixes.append((rec[0], Array(rec[1...])))
            pos = (pos + 2 + UInt64(len) + 3) & ~3
        }
    }

    // MARK: inodes

    public var root: Inode { get throws { try inode(superblock.rootNid) } }

    public func inode(_ nid: UInt64) throws -> Inode {
        let pos = inodePosition(nid)
        guard pos & Self.metaboxBit != 0 || pos < source.size else {
            throw EROFSError.corrupt(structure: "inode \(nid)", offset: pos, detail: "beyond the end of the image")
        }
        let raw = try readMeta(pos, 64)
        guard raw.count >= 32 else { throw EROFSError.truncated(structure: "inode \(nid)", offset: pos) }
        let ino = try Inode(nid: nid, position: pos, raw: raw, superblock: superblock)
        if ino.isExtended, raw.count < 64 { throw EROFSError.truncated(structure: "inode \(nid)", offset: pos) }
        return ino
    }

    // MARK: data

    /// Up to `count` bytes of the inode's data starting at `offset` (fewer at end of file).
    public func readData(_ inode: Inode, at offset: UInt64, count: Int) throws -> [UInt8] {
        guard offset < inode.size, count > 0 else { return [] }
        let n = Int(min(UInt64(count), inode.size - offset))
        if inode.layout.isCompressed {
            return try Compressed(image: self, inode: inode).read(at: offset, count: n)
        }
        var out: [UInt8] = []
        out.reserveCapacity(n)
        var pos = offset
        let end = offset + UInt64(n)
        while pos < end {
            let seg = try mapFlat(inode, pos)
            let take = Int(min(seg.length, end - pos))
            if let phys = seg.physical {
                out += try bytes(phys, take, "data of inode \(inode.nid)")
            } else {
                out += [UInt8](repeating: 0, count: take)
            }
            pos += UInt64(take)
        }
        return out
    }

    /// Where the inode's data at [offset, offset+count) (clamped at end of file) lies in a file the
    /// source keeps open, when it is one stretch of flat data there: for splicing a FUSE reply.
    /// nil for compressed data, holes, data crossing chunks, metabox data or a source without files.
    public func dataRegion(_ inode: Inode, at offset: UInt64, count: Int) throws -> (region: FileRegion, length: Int)? {
        guard !inode.layout.isCompressed, offset < inode.size, count > 0 else { return nil }
        let n = Int(min(UInt64(count), inode.size - offset))
        let seg = try mapFlat(inode, offset)
        guard let phys = seg.physical, phys & Self.metaboxBit == 0, seg.length >= UInt64(n),
              let region = try source.fileRegion(at: phys, count: n) else { return nil }
        return (region, n)
    }

    /// Up to `buffer.count` bytes of the inode's data at `offset` written into `buffer` (fewer at
    /// end of file); the count written. Flat data is read by the source straight into the buffer
    /// (no intermediate copy: a FUSE reply is built this way), compressed data is decompressed and copied.
    public func readData(_ inode: Inode, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard offset < inode.size, buffer.count > 0 else { return 0 }
        let n = Int(min(UInt64(buffer.count), inode.size - offset))
        if inode.layout.isCompressed {
            let bytes = try readData(inode, at: offset, count: n)
            bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
            return bytes.count
        }
        var done = 0
        while done < n {
            let pos = offset + UInt64(done)
            let seg = try mapFlat(inode, pos)
            let take = Int(min(seg.length, UInt64(n - done)))
            let dest = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + take)])
            if let phys = seg.physical {
                guard phys & Self.metaboxBit == 0 else {
                    let b = try bytes(phys, take, "data of inode \(inode.nid)")
                    b.withUnsafeBytes { dest.copyMemory(from: $0) }
                    done += take
                    continue
                }
                guard try source.read(at: phys, into: dest) == take else {
                    throw EROFSError.truncated(structure: "data of inode \(inode.nid)", offset: phys)
                }
            } else {
                dest.initializeMemory(as: UInt8.self, repeating: 0)
            }
            done += take
        }
        return n
    }

    /// The whole data of an inode (bounded for safety).
    public func readAll(_ inode: Inode) throws -> [UInt8] {
        guard inode.size <= UInt64(Self.maxInlineRead) else {
            throw EROFSError.corrupt(structure: "inode \(inode.nid)", offset: inode.position, detail: "size \(inode.size) too large to read at once")
        }
        return try readData(inode, at: 0, count: Int(inode.size))
    }

    /// Physical location of the uncompressed data at `pos`: (image offset or nil for a hole, bytes
    /// contiguous from there).
    func mapFlat(_ inode: Inode, _ pos: UInt64) throws -> (physical: UInt64?, length: UInt64) {
        let bs = blockSize
        switch inode.layout {
        case .flatPlain, .flatInline:
            let nblocks = (inode.size + bs - 1) / bs
            let tailInline = inode.layout == .flatInline
            let lastBlock = nblocks - (tailInline ? 1 : 0)
            let blk = pos / bs
            if blk < lastBlock {
                guard inode.union != Inode.nullAddress else {
                    throw EROFSError.corrupt(structure: "inode \(inode.nid)", offset: inode.position, detail: "data blocks without a block address")
                }
                let phys = blockAddress(inode.startBlock) &+ pos
                guard phys + 1 <= source.size else { throw EROFSError.corrupt(structure: "inode \(inode.nid)", offset: inode.position, detail: "data beyond the end of the image") }
                return (phys, lastBlock * bs - pos)
            }
            // The inline tail sits right after the inode and its xattrs, inside one metadata block.
            let tailStart = lastBlock * bs
            let tailLen = inode.size - tailStart
            let phys = inode.bodyEnd + (pos - tailStart)
            guard inode.bodyEnd % bs + tailLen <= bs else {
                throw EROFSError.corrupt(structure: "inline data of inode \(inode.nid)", offset: inode.bodyEnd, detail: "crosses a block boundary")
            }
            return (phys, inode.size - pos)
        case .chunkBased:
            let fmt = UInt16(truncatingIfNeeded: inode.union)
            let chunkBits = UInt64(superblock.blockSizeBits) + UInt64(fmt & 0x1F)
            guard chunkBits < 48 else { throw EROFSError.corrupt(structure: "inode \(inode.nid)", offset: inode.position, detail: "chunk bits \(chunkBits)") }
            let idx = pos >> chunkBits
            let within = pos & ((1 << chunkBits) - 1)
            let chunkLen = (1 << chunkBits) - within
            var blkaddr: UInt32
            var high: UInt64 = 0
            if fmt & 0x20 != 0 {
                let at = ((inode.bodyEnd + 7) & ~7) + idx * 8
                let e = try bytes(at, 8, "chunk index of inode \(inode.nid)")
                let device = LEBytesValue.u16(Array(e[2..<4]))
                blkaddr = LEBytesValue.u32(Array(e[4..<8]))
                // EROFS_CHUNK_FORMAT_48BIT: the index's first field is the start block's MSB.
                if fmt & 0x40 != 0 { high = UInt64(LEBytesValue.u16(Array(e[0..<2]))) << 32 }
                if blkaddr != Inode.nullAddress, device != 0 {
                    let tag = Int(device) - 1 < devices.count ? String(decoding: devices[Int(device) - 1].tag.prefix { $0 != 0 }, as: UTF8.self) : "?"
                    throw EROFSError.unsupportedFeature("data on extra device \(device) (\(tag)); only the primary image is available")
                }
            } else {
                blkaddr = LEBytesValue.u32(try bytes(inode.bodyEnd + idx * 4, 4, "block map of inode \(inode.nid)"))
            }
            if blkaddr == Inode.nullAddress { return (nil, chunkLen) }
            return (blockAddress(UInt64(blkaddr) | high) &+ within, chunkLen)
        case .compressedFull, .compressedCompact:
            throw EROFSError.corrupt(structure: "inode \(inode.nid)", offset: inode.position, detail: "compressed data mapped as flat")
        }
    }

    // MARK: directories

    public var directoryBlockSize: UInt64 { blockSize << UInt64(superblock.dirBlockBits) }

    /// Every entry of a directory, in on-disk order (including "." and "..").
    public func entries(_ dir: Inode) throws -> [DirEntry] {
        guard dir.type == .directory else { throw EROFSError.notADirectory(path: "nid \(dir.nid)") }
        var out: [DirEntry] = []
        var pos: UInt64 = 0
        let dbs = directoryBlockSize
        while pos < dir.size {
            let block = try readData(dir, at: pos, count: Int(min(dbs, dir.size - pos)))
            out += try parseDirBlock(block, dir: dir, at: pos)
            guard out.count <= Self.maxDirectoryEntries else {
                throw EROFSError.corrupt(structure: "directory \(dir.nid)", offset: dir.position, detail: "more than \(Self.maxDirectoryEntries) entries")
            }
            pos += dbs
        }
        return out
    }

    func parseDirBlock(_ b: [UInt8], dir: Inode, at pos: UInt64) throws -> [DirEntry] {
        let what = "directory block \(pos / directoryBlockSize) of inode \(dir.nid)"
        let r = LEBytes(b, origin: pos, structure: what)
        let first = Int(try r.u16(8))
        guard first >= 12, first % 12 == 0, first <= b.count else {
            throw EROFSError.corrupt(structure: what, offset: pos, detail: "first name offset \(first)")
        }
        let count = first / 12
        var out: [DirEntry] = []
        out.reserveCapacity(count)
        for i in 0..<count {
            let nid = try r.u64(i * 12)
            let off = Int(try r.u16(i * 12 + 8))
            let ft = try r.u8(i * 12 + 10)
            var end = i + 1 < count ? Int(try r.u16((i + 1) * 12 + 8)) : b.count
            guard off >= first, off < end || (i + 1 == count && off < b.count), end <= b.count else {
                throw EROFSError.corrupt(structure: what, offset: pos, detail: "name offsets out of order at entry \(i)")
            }
            if i + 1 == count, let z = b[off..<end].firstIndex(of: 0) { end = z }
            guard end > off, end - off <= 255 else {
                throw EROFSError.corrupt(structure: what, offset: pos, detail: "name length \(end - off) at entry \(i)")
            }
            let name = Array(b[off..<end])
            out.append(DirEntry(name: String(decoding: name, as: UTF8.self), nameBytes: name, nid: nid, fileTypeCode: ft))
        }
        return out
    }

    /// Looks `name` up in `dir` by binary search: first over directory blocks by their first name,
    /// then inside the block, as the kernel does.
    public func lookup(_ name: [UInt8], in dir: Inode) throws -> DirEntry? {
        guard dir.type == .directory else { throw EROFSError.notADirectory(path: "nid \(dir.nid)") }
        let dbs = directoryBlockSize
        let nblocks = (dir.size + dbs - 1) / dbs
        func block(_ i: UInt64) throws -> [DirEntry] {
            let pos = i * dbs
            return try parseDirBlock(try readData(dir, at: pos, count: Int(min(dbs, dir.size - pos))), dir: dir, at: pos)
        }
        var lo: UInt64 = 0, hi = nblocks
        var candidate: [DirEntry]?
        while lo < hi {
            let mid = (lo + hi) / 2
            let entries = try block(mid)
            guard let head = entries.first else { break }
            if name.lexicographicallyPrecedes(head.nameBytes) {
                hi = mid
            } else {
                candidate = entries
                lo = mid + 1
            }
        }
        guard let entries = candidate else { return nil }
        var a = 0, b = entries.count
        while a < b {
            let m = (a + b) / 2
            let n = entries[m].nameBytes
            if n == name { return entries[m] }
            if n.lexicographicallyPrecedes(name) { a = m + 1 } else { b = m }
        }
        return nil
    }

    /// Resolves an absolute or root-relative path inside the image (no symlinks followed, except
    /// for none: EROFS paths here are literal).
    public func resolve(_ path: String) throws -> Inode {
        var node = try root
        for comp in path.split(separator: "/") where comp != "." {
            guard node.type == .directory else { throw EROFSError.notADirectory(path: path) }
            guard let e = try lookup(Array(comp.utf8), in: node) else { throw EROFSError.notFound(path: path) }
            node = try inode(e.nid)
        }
        return node
    }

    public func symlinkTarget(_ inode: Inode) throws -> String {
        guard inode.size <= 4096 else { throw EROFSError.corrupt(structure: "symlink \(inode.nid)", offset: inode.position, detail: "target of \(inode.size) bytes") }
        return String(decoding: try readAll(inode), as: UTF8.self)
    }

    // MARK: xattrs

    static let prefixes: [UInt8: String] = [1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default",
                                            4: "trusted.", 5: "lustre.", 6: "security."]

    /// Inline and shared extended attributes of an inode.
    public func xattrs(_ inode: Inode) throws -> [Xattr] {
        guard inode.xattrCount > 0 else { return [] }
        let start = inode.position + inode.inodeSize
        let size = Int(inode.xattrIbodySize)
        let body = try bytes(start, size, "xattrs of inode \(inode.nid)")
        let shared = Int(body[4])
        guard 12 + shared * 4 <= size else { throw EROFSError.corrupt(structure: "xattrs of inode \(inode.nid)", offset: start, detail: "\(shared) shared xattrs overflow the body") }
        var out: [Xattr] = []
        let r = LEBytes(body, origin: start, structure: "xattrs of inode \(inode.nid)")
        for i in 0..<shared {
            let id = try r.u32(12 + i * 4)
            let pos = sharedXattrPosition(UInt64(id))
            let head = try bytes(pos, 4, "shared xattr \(id)")
            let total = 4 + Int(head[0]) + Int(LEBytesValue.u16(Array(head[2..<4])))
            out.append(try decodeEntry(try bytes(pos, total, "shared xattr \(id)"), at: pos))
        }
        var off = 12 + shared * 4
        while off + 4 <= size {
            let nameLen = Int(body[off]), valueLen = Int(LEBytesValue.u16(Array(body[(off + 2)..<(off + 4)])))
            let total = 4 + nameLen + valueLen
            guard off + total <= size else { throw EROFSError.corrupt(structure: "xattr entry", offset: start + UInt64(off), detail: "overflows the xattr body") }
            out.append(try decodeEntry(Array(body[off..<(off + total)]), at: start + UInt64(off)))
            off += (total + 3) & ~3
        }
        return out
    }

    /// The byte ranges the xattrs of an inode occupy (inline body and referenced shared entries).
    func xattrRanges(_ inode: Inode) throws -> [ByteRange] {
        guard inode.xattrCount > 0 else { return [] }
        let start = inode.position + inode.inodeSize
        var out = [ByteRange(offset: start, length: inode.xattrIbodySize)]
        let body = try bytes(start, Int(inode.xattrIbodySize), "xattrs of inode \(inode.nid)")
        let shared = min(Int(body[4]), (body.count - 12) / 4)
        let r = LEBytes(body, origin: start, structure: "xattrs")
        for i in 0..<shared {
            let pos = sharedXattrPosition(UInt64(try r.u32(12 + i * 4)))
            let head = try bytes(pos, 4, "shared xattr")
            out.append(ByteRange(offset: pos, length: UInt64(4 + Int(head[0]) + Int(LEBytesValue.u16(Array(head[2..<4]))))))
        }
        return out
    }

    func decodeEntry(_ e: [UInt8], at pos: UInt64) throws -> Xattr {
        let nameLen = Int(e[0]), index = e[1]
        let name = Array(e[4..<(4 + nameLen)])
        let value = Array(e[(4 + nameLen)...])
        var prefix: String
        if index & 0x80 != 0 {
            let i = Int(index & 0x7F)
            guard i < longPrefixes.count, let base = Self.prefixes[longPrefixes[i].base] else {
                throw EROFSError.corrupt(structure: "xattr entry", offset: pos, detail: "long prefix \(i) undefined")
            }
            prefix = base + String(decoding: longPrefixes[i].infix, as: UTF8.self)
        } else {
            guard let p = Self.prefixes[index] else { throw EROFSError.corrupt(structure: "xattr entry", offset: pos, detail: "name index \(index)") }
            prefix = p
        }
        return Xattr(name: prefix + String(decoding: name, as: UTF8.self), value: value)
    }
}

/// Little-endian decoding of short arrays.
enum LEBytesValue {
    static func u16(_ b: [UInt8]) -> UInt16 { UInt16(b[0]) | UInt16(b[1]) << 8 }
    static func u32(_ b: [UInt8]) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 | UInt32(b[$1]) << (8 * $1) } }
    static func u64(_ b: [UInt8]) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(b[$1]) << (8 * UInt64($1)) } }
}
