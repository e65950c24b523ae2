/// The parts of an image a mount may read before any file data: superblock, device table, inode
/// bodies, xattrs, inline tails, chunk and compression indexes, directory and symlink data, the
/// packed inode. A file-backed mount reads these without fanotify pre-content events, so a lazy
/// loader must have them in place before mounting.
public struct MetadataRanges: Sendable, Codable, Equatable {
    /// Merged, block-aligned ranges, in order.
    public var ranges: [ByteRange]
    /// Sum of the range lengths.
    public var totalBytes: UInt64
    public var inodes: Int
    public var directories: Int
    public var imageSize: UInt64
    public var blockSize: UInt64
}

extension EROFSImage {
    /// Computes the metadata ranges by walking the whole tree from the root.
    public func metadataRanges() throws -> MetadataRanges {
        var raw: [ByteRange] = [ByteRange(offset: 0, length: max(blockSize, Superblock.offset + UInt64(superblock.size)))]
        if superblock.extraDevices > 0 {
            raw.append(ByteRange(offset: UInt64(superblock.deviceTableSlotOffset) * 128, length: UInt64(superblock.extraDevices) * 128))
        }
        var visited = Set<UInt64>()
        var queue: [UInt64] = [superblock.rootNid]
        if superblock.packedNid != 0 { queue.append(superblock.packedNid) }
        // Each nid is queued once, and each directory's data read once: a crafted image whose
        // directories share blocks (each listing the others) would otherwise cost N² in time and memory.
        var queued = Set(queue)
        var seenDirectoryData = Set<ByteRange>()
        var directoryBytes: UInt64 = 0
        // Directories cannot hold more than the image: the walk is bounded by its size.
        let directoryBudget = source.size * 2 + (1 << 20)
        var directories = 0
        let limit = max(Int(min(superblock.inodeCount, 1 << 26)) * 2, 1024)
        while let nid = queue.popLast() {
            guard visited.insert(nid).inserted else { continue }
            guard visited.count <= limit else {
                throw EROFSError.corrupt(structure: "directory tree", offset: inodePosition(nid), detail: "more inodes reachable than the superblock counts")
            }
            let ino = try inode(nid)
            raw += try inodeMetadata(ino)
            switch ino.type {
            case .directory:
                directories += 1
                let blocks = try dataRanges(ino, from: 0, to: ino.size)
                // The same data as a directory already walked lists the same children.
                if !blocks.isEmpty, blocks.allSatisfy(seenDirectoryData.contains) { continue }
                seenDirectoryData.formUnion(blocks)
                directoryBytes += ino.size
                guard directoryBytes <= directoryBudget else {
                    throw EROFSError.corrupt(structure: "directory tree", offset: ino.position,
                                             detail: "directories claim more than \(directoryBytes) bytes, more than the image's \(source.size) can hold")
                }
                // A directory of several blocks: fetched together, not one round trip per block.
                if blocks.count > 1 { try source.prefetch(blocks) }
                let list = try entries(ino)
                raw += blocks
                var children: [ByteRange] = []
                for e in list where e.nameBytes != [0x2E] && e.nameBytes != [0x2E, 0x2E] {
                    if queued.insert(e.nid).inserted {
                        queue.append(e.nid)
                        children.append(ByteRange(offset: inodePosition(e.nid), length: 64))
                    }
                }
                // The children's inodes may lie anywhere in the image: fetched together.
                if children.count > 1 { try source.prefetch(children) }
            case .symlink:
                raw += try dataRanges(ino, from: 0, to: ino.size)
            default:
                break
            }
        }
        if superblock.featureIncompat & Feature.xattrPrefixes.rawValue != 0, superblock.xattrPrefixCount > 0 {
            let start = UInt64(superblock.xattrPrefixStart) << 2
            var len: UInt64 = 0
            for p in longPrefixes { len += (2 + 1 + UInt64(p.infix.count) + 3) & ~3 }
            if superblock.packedNid != 0 {
                raw += try dataRanges(try inode(superblock.packedNid), from: start, to: start + len)
            } else {
                raw.append(ByteRange(offset: start, length: len))
            }
        }
        if let metabox {
            // Metadata kept in the metabox is where the metabox inode's data is stored (compressed or not).
            raw += try inodeMetadata(metabox)
            var physical: [ByteRange] = []
            for r in raw {
                guard r.offset & Self.metaboxBit != 0 else { physical.append(r); continue }
                let from = r.offset & ~Self.metaboxBit
                physical += try dataRanges(metabox, from: from, to: from + r.length)
            }
            raw = physical
        }
        let merged = ByteRange.normalize(raw, blockSize: blockSize, limit: source.size)
        return MetadataRanges(ranges: merged, totalBytes: merged.reduce(0) { $0 + $1.length }, inodes: visited.count,
                              directories: directories, imageSize: source.size, blockSize: blockSize)
    }

    /// The inode itself, its xattrs, and whatever of its mapping lives in the metadata area.
    func inodeMetadata(_ ino: Inode) throws -> [ByteRange] {
        var out = [ByteRange(offset: ino.position, length: ino.inodeSize + ino.xattrIbodySize)]
        out += try xattrRanges(ino)
        switch ino.layout {
        case .flatInline:
            let tail = ino.size % blockSize == 0 ? (ino.size > 0 ? blockSize : 0) : ino.size % blockSize
            out.append(ByteRange(offset: ino.bodyEnd, length: tail))
        case .chunkBased:
            let fmt = UInt16(truncatingIfNeeded: ino.union)
            let chunkBits = UInt64(superblock.blockSizeBits) + UInt64(fmt & 0x1F)
            guard chunkBits < 48 else { break }
            let chunks = (ino.size + (1 << chunkBits) - 1) >> chunkBits
            if fmt & 0x20 != 0 {
                out.append(ByteRange(offset: (ino.bodyEnd + 7) & ~7, length: chunks * 8))
            } else {
                out.append(ByteRange(offset: ino.bodyEnd, length: chunks * 4))
            }
        case .compressedFull, .compressedCompact:
            let c = try Compressed(image: self, inode: ino)
            var end = c.wholeFragment ? c.headerPos + 8 : c.indexEnd
            if c.advise & Compressed.advInline != 0 { end += c.idataSize }
            out.append(ByteRange(offset: c.headerPos, length: end - c.headerPos))
        case .flatPlain:
            break
        }
        return out
    }

    /// Physical ranges that hold the logical bytes [from, to) of an inode.
    func dataRanges(_ ino: Inode, from: UInt64, to: UInt64) throws -> [ByteRange] {
        let end = min(to, ino.size)
        guard from < end else { return [] }
        var out: [ByteRange] = []
        if ino.layout.isCompressed {
            let c = try Compressed(image: self, inode: ino)
            var la = from
            while la < end {
                let e = try c.extent(containing: la)
                guard e.start <= la, la < e.end else {
                    throw EROFSError.corrupt(structure: "compression index of inode \(ino.nid)", offset: c.headerPos,
                                             detail: "offset \(la) maps to extent [\(e.start), \(e.end))")
                }
                switch e.storage {
                case .blocks(let pa, let plen), .inline(let pa, let plen):
                    out.append(ByteRange(offset: pa, length: plen))
                case .fragment, .fragmentAt:
                    let packed = try inode(superblock.packedNid)
                    guard packed.nid != ino.nid else { throw EROFSError.loop(structure: "packed inode", offset: packed.position) }
                    var base = c.fragmentOffset + (c.wholeFragment ? e.start : 0)
                    if case .fragmentAt(let off) = e.storage { base = off }
                    out += try dataRanges(packed, from: base + (la - e.start), to: base + (min(e.end, end) - e.start))
                }
                la = e.end
            }
            return out
        }
        var pos = from
        while pos < end {
            let seg = try mapFlat(ino, pos)
            let take = min(seg.length, end - pos)
            if let phys = seg.physical { out.append(ByteRange(offset: phys, length: take)) }
            pos += take
        }
        return out
    }
}

/// One mapped piece of a file: logical bytes and where they are stored.
public struct DataExtent: Sendable, Equatable {
    public var logical: ByteRange
    /// nil for a hole.
    public var physical: ByteRange?
    /// "plain", "inline", "lz4", "lzma", "deflate", "zstd", "uncompressed", "fragment", "hole".
    public var kind: String
}

extension EROFSImage {
    /// The extents of an inode's data, as dump.erofs -e shows them.
    public func extents(_ ino: Inode) throws -> [DataExtent] {
        var out: [DataExtent] = []
        if ino.layout.isCompressed {
            let c = try Compressed(image: self, inode: ino)
            for e in try c.extents() {
                let logical = ByteRange(offset: e.start, length: e.end - e.start)
                switch e.storage {
                case .blocks(let pa, let plen): out.append(DataExtent(logical: logical, physical: ByteRange(offset: pa, length: plen), kind: c.algorithmName(e)))
                case .inline(let pa, let plen): out.append(DataExtent(logical: logical, physical: ByteRange(offset: pa, length: plen), kind: c.algorithmName(e) + " (inline)"))
                case .fragment, .fragmentAt: out.append(DataExtent(logical: logical, physical: nil, kind: "fragment"))
                }
            }
            return out
        }
        var pos: UInt64 = 0
        while pos < ino.size {
            let seg = try mapFlat(ino, pos)
            let take = min(seg.length, ino.size - pos)
            let inline = seg.physical.map { $0 >= ino.bodyEnd && $0 < ino.bodyEnd + blockSize && ino.layout == .flatInline } ?? false
            out.append(DataExtent(logical: ByteRange(offset: pos, length: take), physical: seg.physical.map { ByteRange(offset: $0, length: take) },
                                  kind: seg.physical == nil ? "hole" : (inline ? "inline" : "plain")))
            pos += take
        }
        return out
    }
}
