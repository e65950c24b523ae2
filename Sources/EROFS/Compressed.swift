import Syscall

/// Compressed inodes: the map header, full and compact logical-cluster indexes, big pclusters,
/// ztailpacking (inline tail pcluster), fragments (tail in the packed inode) and partial references
/// (dedupe), decompressed with the Debian libraries.
struct Compressed {
    /// Logical cluster types.
    enum LType: UInt8 { case plain = 0, head1 = 1, nonhead = 2, head2 = 3 }

    struct LCluster {
        var type: LType
        var clusterofs: UInt64
        var pblk: UInt64 = 0
        var delta0: UInt64 = 0
        var compressedBlocks: UInt64 = 0
        var partialRef = false
    }

    /// One extent of the file: logical [start, end) stored in one pcluster.
    struct Extent {
        var start: UInt64
        var end: UInt64
        var headType: LType
        /// Byte ranges (offset, length) in the image or the metabox; the tail in the packed inode at the
        /// header's fragment offset, or at an offset of its own (extent records).
        enum Storage { case blocks(UInt64, UInt64), inline(UInt64, UInt64), fragment, fragmentAt(UInt64) }
        var storage: Storage
        var partialRef: Bool
        /// The algorithm when the extent names it itself (extent records); else the head type decides.
        var algorithm: UInt8? = nil
    }

    static let advCompacted2B: UInt16 = 0x1, advBig1: UInt16 = 0x2, advBig2: UInt16 = 0x4, advInline: UInt16 = 0x8,
               advInterlaced: UInt16 = 0x10, advFragment: UInt16 = 0x20
    static let d0CblkCnt: UInt64 = 1 << 11
    static let maxExtent: UInt64 = 16 << 20

    let image: EROFSImage
    let inode: Inode
    let headerPos: UInt64
    let advise: UInt16
    let algorithms: (UInt8, UInt8)
    let lclusterBits: UInt64
    let totalIndexes: UInt64
    let idataSize: UInt64
    let fragmentOffset: UInt64
    let wholeFragment: Bool
    /// Extent records instead of logical-cluster indexes (Z_EROFS_ADVISE_EXTENTS, full layout):
    /// their count and size, and where they start.
    let extentCount: UInt64
    let recordSize: UInt64
    var usesExtents: Bool { recordSize > 0 }
    static let advExtents: UInt16 = 0x1

    init(image: EROFSImage, inode: Inode) throws {
        self.image = image
        self.inode = inode
        headerPos = (inode.bodyEnd + 7) & ~7
        let h = try image.bytes(headerPos, 8, "compression map header of inode \(inode.nid)")
        fragmentOffset = UInt64(LEBytesValue.u32(Array(h[0..<4])))
        idataSize = UInt64(LEBytesValue.u16(Array(h[2..<4])))
        advise = LEBytesValue.u16(Array(h[4..<6]))
        if inode.layout == .compressedFull, advise & Self.advExtents != 0 {
            // The map header holds the extent count where the algorithms and cluster bits would be.
            extentCount = UInt64(LEBytesValue.u32(Array(h[0..<4]))) | UInt64(LEBytesValue.u16(Array(h[6..<8]))) << 32
            recordSize = 4 << UInt64((advise >> 1) & 0x3)
            (algorithms, wholeFragment) = ((0, 0), false)
            // Records of 4 or 8 bytes are one per logical cluster, whose size the low bits of the
            // header's last byte give (they overlap the count's MSB, which those records do not use).
            lclusterBits = UInt64(image.superblock.blockSizeBits) + UInt64(h[7] & 0xF)
            totalIndexes = 0
            guard recordSize <= 8 || extentCount <= inode.size + 1, lclusterBits <= 20 else {
                throw EROFSError.corrupt(structure: "extent records of inode \(inode.nid)", offset: headerPos, detail: "\(extentCount) extents")
            }
            return
        }
        (extentCount, recordSize) = (0, 0)
        algorithms = (h[6] & 0xF, h[6] >> 4)
        wholeFragment = h[7] & 0x80 != 0
        lclusterBits = UInt64(image.superblock.blockSizeBits) + UInt64(h[7] & 0x7)
        guard lclusterBits <= 20 else {
            throw EROFSError.corrupt(structure: "compression map header of inode \(inode.nid)", offset: headerPos, detail: "cluster bits \(lclusterBits)")
        }
        totalIndexes = (inode.size + (1 << lclusterBits) - 1) >> lclusterBits
        if inode.layout == .compressedCompact, advise & Self.advCompacted2B != 0, lclusterBits > 14 {
            throw EROFSError.corrupt(structure: "compression map header of inode \(inode.nid)", offset: headerPos, detail: "2-byte indexes need cluster bits <= 14")
        }
    }

    /// Full (legacy) indexes follow 8 bytes of padding after the map header; compact ones follow it directly.
    var indexBase: UInt64 { headerPos + (inode.layout == .compressedFull ? 16 : 8) }

    // MARK: index decoding

    /// The compact layout: a few 4-byte-amortised packs up to a 32-byte boundary, then 2-byte packs of
    /// 16 entries (if enabled), then 4-byte packs again.
    var compactLayout: (initial4B: UInt64, compacted2B: UInt64) {
        var initial = (32 - indexBase % 32) / 4
        if initial == 8 { initial = 0 }
        var c2b: UInt64 = 0
        if advise & Self.advCompacted2B != 0, initial < totalIndexes {
            c2b = (totalIndexes - initial) / 16 * 16
        }
        return (initial, c2b)
    }

    /// Where the index area ends (the inline pcluster of ztailpacking follows it): the end of the
    /// index, or of the compact pack, holding the last logical cluster.
    var indexEnd: UInt64 {
        if usesExtents {
            // Short records: one per logical cluster; long ones: the count says.
            let count = recordSize <= 8 ? (inode.size + (1 << lclusterBits) - 1) >> lclusterBits : extentCount
            return recordsStart + (recordSize == 4 ? 8 : 0) + count * recordSize
        }
        guard totalIndexes > 0 else { return indexBase }
        if inode.layout == .compressedFull { return indexBase + totalIndexes * 8 }
        let (pos, packSize) = compactPosition(totalIndexes - 1)
        return pos - pos % packSize + packSize
    }

    /// Byte position of a logical cluster's compact entry and the size of its pack.
    func compactPosition(_ lcnIn: UInt64) -> (pos: UInt64, packSize: UInt64) {
        let (initial, c2b) = compactLayout
        var lcn = lcnIn
        var pos = indexBase
        var shift: UInt64 = 2
        if lcn >= initial {
            pos += initial * 4
            lcn -= initial
            if lcn < c2b {
                shift = 1
            } else {
                pos += c2b * 2
                lcn -= c2b
            }
        }
        return (pos + (lcn << shift), (shift == 1 ? 16 : 2) << shift)
    }

    func load(_ lcn: UInt64) throws -> LCluster {
        guard lcn < totalIndexes else {
            throw EROFSError.corrupt(structure: "compression index of inode \(inode.nid)", offset: headerPos, detail: "logical cluster \(lcn) of \(totalIndexes)")
        }
        return inode.layout == .compressedFull ? try loadFull(lcn) : try loadCompact(lcn)
    }

    func loadFull(_ lcn: UInt64) throws -> LCluster {
        let pos = indexBase + lcn * 8
        let b = try image.bytes(pos, 8, "compression index of inode \(inode.nid)")
        let adv = LEBytesValue.u16(Array(b[0..<2]))
        let type = LType(rawValue: UInt8(adv & 3))!
        if type == .nonhead {
            var c = LCluster(type: type, clusterofs: 1 << lclusterBits)
            let d0 = UInt64(LEBytesValue.u16(Array(b[4..<6])))
            if d0 & Self.d0CblkCnt != 0 {
                c.compressedBlocks = d0 & ~Self.d0CblkCnt
                c.delta0 = 1
            } else {
                c.delta0 = d0
            }
            return c
        }
        return LCluster(type: type, clusterofs: UInt64(LEBytesValue.u16(Array(b[2..<4]))),
                        pblk: UInt64(LEBytesValue.u32(Array(b[4..<8]))), partialRef: adv & 0x8000 != 0)
    }

    func loadCompact(_ lcn: UInt64) throws -> LCluster {
        let (pos, packSize) = compactPosition(lcn)
        let shift: UInt64 = packSize == 32 ? 1 : 2
        let vcnt: UInt64 = shift == 1 ? 16 : 2
        let encodeBits = (packSize - 4) * 8 / vcnt
        let eofs = pos % packSize
        let base = pos - eofs
        let pack = try image.bytes(base, Int(packSize), "compact index pack of inode \(inode.nid)")
        // Each entry's low bits hold a cluster offset or a delta with the CBLKCNT flag (bit 11):
        // at least 12 bits, also for clusters of 1 or 2 KiB (sub-page blocks).
        let bits = max(lclusterBits, 12)
        func decode(_ i: Int64) -> (lo: UInt64, type: LType) {
            let bitPos = UInt64(i) * encodeBits
            let byte = Int(bitPos / 8)
            var v: UInt64 = 0
            for k in 0..<4 where byte + k < pack.count { v |= UInt64(pack[byte + k]) << (8 * UInt64(k)) }
            v >>= bitPos & 7
            return (v & ((1 << bits) - 1), LType(rawValue: UInt8((v >> bits) & 3))!)
        }
        var i = Int64(eofs >> shift)
        let (lo0, type) = decode(i)
        if type == .nonhead {
            var c = LCluster(type: .nonhead, clusterofs: 1 << bits)
            if lo0 & Self.d0CblkCnt != 0 {
                guard advise & (Self.advBig1 | Self.advBig2) != 0 else {
                    throw EROFSError.corrupt(structure: "compact index of inode \(inode.nid)", offset: base, detail: "CBLKCNT without big pclusters")
                }
                c.compressedBlocks = lo0 & ~Self.d0CblkCnt
                c.delta0 = 1
                return c
            }
            if UInt64(i + 1) != vcnt {
                c.delta0 = lo0
                return c
            }
            // The last entry of a pack stores delta[1]; delta[0] comes from the previous entry.
            var lo = decode(i - 1).type == .nonhead ? decode(i - 1).lo : 0
            if decode(i - 1).type == .nonhead, lo & Self.d0CblkCnt != 0 { lo = 1 }
            c.delta0 = lo + 1
            return c
        }
        var c = LCluster(type: type, clusterofs: lo0)
        var nblk: Int64
        if advise & (Self.advBig1 | Self.advBig2) == 0 {
            nblk = 1
            while i > 0 {
                i -= 1
                let (lo, t) = decode(i)
                if t == .nonhead { i -= Int64(lo) }
                if i >= 0 { nblk += 1 }
            }
        } else {
            nblk = 0
            while i > 0 {
                i -= 1
                let (lo, t) = decode(i)
                if t == .nonhead {
                    if lo & Self.d0CblkCnt != 0 {
                        i -= 1
                        nblk += Int64(lo & ~Self.d0CblkCnt)
                        continue
                    }
                    guard lo > 1 else {
                        throw EROFSError.corrupt(structure: "compact index of inode \(inode.nid)", offset: base, detail: "big pcluster with delta 1")
                    }
                    i -= Int64(lo) - 2
                    continue
                }
                nblk += 1
            }
        }
        let pblkBase = UInt64(LEBytesValue.u32(Array(pack[(pack.count - 4)...])))
        c.pblk = UInt64(Int64(pblkBase) + nblk)
        return c
    }

    // MARK: extents

    /// The head logical cluster of the extent containing logical offset `la`.
    func head(containing la: UInt64) throws -> (lcn: UInt64, cluster: LCluster) {
        var lcn = la >> lclusterBits
        var c = try load(lcn)
        var distance: UInt64
        if c.type != .nonhead {
            if la & ((1 << lclusterBits) - 1) >= c.clusterofs { return (lcn, c) }
            guard lcn > 0 else {
                throw EROFSError.corrupt(structure: "compression index of inode \(inode.nid)", offset: headerPos, detail: "first cluster starts late")
            }
            distance = 1
        } else {
            distance = c.delta0
        }
        var steps: UInt64 = 0
        while true {
            guard distance > 0, distance <= lcn, steps <= min(totalIndexes, (Self.maxExtent >> lclusterBits) + 2) else {
                throw EROFSError.corrupt(structure: "compression index of inode \(inode.nid)", offset: headerPos, detail: "bad lookback from cluster \(lcn)")
            }
            lcn -= distance
            steps += 1
            c = try load(lcn)
            if c.type != .nonhead { return (lcn, c) }
            distance = c.delta0
        }
    }

    /// The head cluster of the extent that holds the last byte (the tail extent).
    func tailHeadLcn() throws -> UInt64 {
        try head(containing: inode.size - 1).lcn
    }

    /// Extent records follow the map header, aligned to their size.
    var recordsStart: UInt64 { (headerPos + 8 + recordSize - 1) / recordSize * recordSize }

    static let plenMask: UInt32 = (1 << 21) - 1, plenPartial: UInt32 = 1 << 27

    /// The extent holding `la` from extent records: records of 16 or 32 bytes name their logical
    /// start and are searched; records of 4 or 8 bytes are one per logical cluster, their physical
    /// start accumulated from a base (4) or stored (8).
    func recordExtent(containing la: UInt64) throws -> Extent {
        var (lstart, lend, plen, pa, last) = (inode.size, inode.size, UInt32(0), UInt64(0), false)
        let what = "extent records of inode \(inode.nid)"
        if recordSize <= 8 {
            let step: UInt64 = 1 << lclusterBits
            guard la >> lclusterBits < 1 << 24 else {
                throw EROFSError.corrupt(structure: what, offset: headerPos, detail: "offset \(la) is beyond 2^24 records")
            }
            var pos = recordsStart
            var base: UInt64? = nil
            if recordSize == 4 {
                base = LEBytesValue.u64(try image.bytes(pos, 8, what))
                pos += 8
            }
            var l: UInt64 = 0
            while l <= la {
                let r = try image.bytes(pos, Int(recordSize), what)
                plen = LEBytesValue.u32(Array(r[0..<4]))
                if let b = base { pa = b; base = b + UInt64(plen & Self.plenMask) } else { pa = UInt64(LEBytesValue.u32(Array(r[4..<8]))) }
                pos += recordSize
                l += step
            }
            last = l >= (lend + step - 1) / step * step
            lend = min(l, lend)
            lstart = l - step
        } else {
            var (lo, hi) = (UInt64(0), extentCount)
            while lo < hi {
                let mid = lo + (hi - lo) / 2
                let r = try image.bytes(recordsStart + mid * recordSize, Int(recordSize), what)
                var l = UInt64(LEBytesValue.u32(Array(r[12..<16])))
                if recordSize >= 32 { l |= UInt64(LEBytesValue.u32(Array(r[16..<20]))) << 32 }
                let p = UInt64(LEBytesValue.u32(Array(r[4..<8]))) | UInt64(LEBytesValue.u32(Array(r[8..<12]))) << 32
                if l > la {
                    hi = mid
                    guard l <= lend else { throw EROFSError.corrupt(structure: what, offset: headerPos, detail: "records out of order") }
                    lend = l
                } else {
                    lo = mid + 1
                    if la == l { hi = min(lo + 1, hi) }
                    (lstart, plen, pa) = (l, LEBytesValue.u32(Array(r[0..<4])), p)
                }
            }
            last = lo >= extentCount
        }
        guard lstart < lend, lstart <= la, la < lend, lend - lstart <= Self.maxExtent else {
            throw EROFSError.corrupt(structure: what, offset: headerPos, detail: "offset \(la) maps to [\(lstart), \(lend))")
        }
        if last, advise & Self.advFragment != 0 {
            let off = UInt64(plen) | (recordSize > 4 ? pa << 32 : 0)
            return Extent(start: lstart, end: lend, headType: .head1, storage: .fragmentAt(off), partialRef: false)
        }
        guard plen != 0 else { throw EROFSError.unsupportedFeature("holes in compressed files (inode \(inode.nid))") }
        let format = UInt8(plen >> 28)
        let storage = Extent.Storage.blocks(pa, UInt64(plen & Self.plenMask))
        return Extent(start: lstart, end: lend, headType: format == 0 ? .plain : .head1, storage: storage,
                      partialRef: plen & Self.plenPartial != 0, algorithm: format == 0 ? nil : format - 1)
    }

    func extent(containing la: UInt64) throws -> Extent {
        if usesExtents { return try recordExtent(containing: la) }
        if wholeFragment {
            return Extent(start: 0, end: inode.size, headType: .head1, storage: .fragment, partialRef: false)
        }
        let (lcn, h) = try head(containing: la)
        let start = (lcn << lclusterBits) | h.clusterofs
        var end = inode.size
        var next = lcn + 1
        let maxClusters = (Self.maxExtent >> lclusterBits) + 2
        while next < totalIndexes {
            guard next - lcn <= maxClusters else {
                throw EROFSError.corrupt(structure: "compressed extent of inode \(inode.nid)", offset: headerPos, detail: "no next head within \(maxClusters) clusters")
            }
            let c = try load(next)
            if c.type != .nonhead {
                end = min((next << lclusterBits) | c.clusterofs, inode.size)
                break
            }
            next += 1
        }
        guard end > start, end - start <= Self.maxExtent else {
            throw EROFSError.corrupt(structure: "compressed extent of inode \(inode.nid)", offset: headerPos, detail: "extent [\(start), \(end))")
        }
        let hasTail = (advise & (Self.advInline | Self.advFragment)) != 0
        let isTail = try hasTail && lcn == tailHeadLcn()
        var storage: Extent.Storage
        if isTail, advise & Self.advInline != 0 {
            storage = .inline(indexEnd, idataSize)
        } else if isTail, advise & Self.advFragment != 0 {
            storage = .fragment
        } else {
            var plen: UInt64 = 1 << lclusterBits
            let big = (h.type == .head1 && advise & Self.advBig1 != 0) || (h.type == .head2 && advise & Self.advBig2 != 0)
            if big {
                var blocks: UInt64 = 1
                if lcn + 1 < totalIndexes {
                    let n = try load(lcn + 1)
                    if n.type == .nonhead {
                        guard n.delta0 == 1, n.compressedBlocks > 0 else {
                            throw EROFSError.corrupt(structure: "compression index of inode \(inode.nid)", offset: headerPos, detail: "big pcluster without a block count")
                        }
                        blocks = n.compressedBlocks
                    }
                }
                plen = blocks * image.blockSize
            }
            storage = .blocks(h.pblk * image.blockSize, plen)
        }
        return Extent(start: start, end: end, headType: h.type, storage: storage, partialRef: h.partialRef)
    }

    /// Every extent in order (for metadata ranges and whole-file reads).
    func extents() throws -> [Extent] {
        var out: [Extent] = []
        var la: UInt64 = 0
        while la < inode.size {
            let e = try extent(containing: la)
            guard e.start <= la, e.end > la else { throw EROFSError.loop(structure: "compressed extents of inode \(inode.nid)", offset: headerPos) }
            out.append(e)
            la = e.end
        }
        return out
    }

    // MARK: reading

    func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count)
        var la = offset
        let end = offset + UInt64(count)
        while la < end {
            let e = try image.extentsSeen.extent(nid: inode.nid, containing: la) { try extent(containing: $0) }
            guard e.start <= la, la < e.end else {
                throw EROFSError.corrupt(structure: "compression index of inode \(inode.nid)", offset: headerPos,
                                         detail: "offset \(la) maps to extent [\(e.start), \(e.end))")
            }
            let key = PclusterCache.Key(nid: inode.nid, start: e.start, end: e.end)
            let data = try image.pclusters.value(for: key) { try decompress(e) }
            let from = Int(la - e.start)
            let to = Int(min(e.end, end) - e.start)
            guard to <= data.count else {
                throw EROFSError.decompression(algorithm: algorithmName(e), offset: offsetOf(e), detail: "produced \(data.count) of \(e.end - e.start) bytes")
            }
            out += data[from..<to]
            la = e.start + UInt64(to)
        }
        return out
    }

    func offsetOf(_ e: Extent) -> UInt64 {
        switch e.storage {
        case .blocks(let p, _), .inline(let p, _): return p
        case .fragment, .fragmentAt: return image.superblock.packedNid
        }
    }

    func algorithmName(_ e: Extent) -> String {
        if e.headType == .plain { return "uncompressed" }
        let alg = e.algorithm ?? (e.headType == .head2 ? algorithms.1 : algorithms.0)
        return ["lz4", "lzma", "deflate", "zstd"][safe: Int(alg)] ?? "algorithm \(alg)"
    }

    /// The decompressed bytes of an extent, starting at its logical start.
    func decompress(_ e: Extent) throws -> [UInt8] {
        let llen = Int(e.end - e.start)
        let input: [UInt8]
        switch e.storage {
        case .fragment, .fragmentAt:
            guard image.superblock.packedNid != 0 else {
                throw EROFSError.corrupt(structure: "inode \(inode.nid)", offset: headerPos, detail: "fragment without a packed inode")
            }
            let packed = try image.inode(image.superblock.packedNid)
            guard packed.nid != inode.nid else { throw EROFSError.loop(structure: "packed inode", offset: packed.position) }
            var at = fragmentOffset + (wholeFragment ? e.start : 0)
            if case .fragmentAt(let off) = e.storage { at = off }
            let data = try image.readData(packed, at: at, count: llen)
            guard data.count == llen else { throw EROFSError.truncated(structure: "fragment of inode \(inode.nid)", offset: packed.position) }
            return data
        case .blocks(let pa, let plen), .inline(let pa, let plen):
            guard plen > 0, plen <= 1 << 20 else { throw EROFSError.corrupt(structure: "pcluster of inode \(inode.nid)", offset: pa, detail: "size \(plen)") }
            input = try image.bytes(pa, Int(plen), "pcluster of inode \(inode.nid)")
        }
        if e.headType == .plain {
            guard llen <= input.count else { throw EROFSError.corrupt(structure: "plain pcluster of inode \(inode.nid)", offset: offsetOf(e), detail: "\(llen) bytes from a \(input.count)-byte pcluster") }
            if advise & Self.advInterlaced != 0 {
                let ofs = Int(e.start % image.blockSize)
                guard ofs < input.count else { throw EROFSError.corrupt(structure: "plain pcluster of inode \(inode.nid)", offset: offsetOf(e), detail: "interlace offset \(ofs)") }
                let right = min(llen, input.count - ofs)
                return Array(input[ofs..<(ofs + right)]) + Array(input[0..<(llen - right)])
            }
            return Array(input[0..<llen])
        }
        let alg = e.algorithm ?? (e.headType == .head2 ? algorithms.1 : algorithms.0)
        // With zero padding the stream is right-aligned in the pcluster: skip the leading zeros.
        var margin = 0
        if image.superblock.featureIncompat & Feature.zeroPadding.rawValue != 0 {
            while margin < input.count, input[margin] == 0 { margin += 1 }
            guard margin < input.count else { throw EROFSError.decompression(algorithm: algorithmName(e), offset: offsetOf(e), detail: "empty pcluster") }
        }
        let stream = input[margin...]
        let result: Result<[UInt8], DecompressError>
        switch alg {
        case 0: result = Decompress.lz4(stream, outputSize: llen)
        case 1:
            let cfg = image.compressionConfigs[1] ?? []
            let dict = cfg.count >= 4 ? LEBytesValue.u32(Array(cfg[0..<4])) : 8 << 20
            result = Decompress.microLZMA(stream, outputSize: llen, exact: !e.partialRef, dictSize: dict)
        case 2: result = Decompress.deflate(stream, outputSize: llen)
        case 3: result = Decompress.zstd(stream, outputSize: llen, limit: Int(Self.maxExtent))
        default: throw EROFSError.unsupportedAlgorithm("algorithm \(alg)")
        }
        switch result {
        case .success(let d):
            guard d.count == llen else {
                throw EROFSError.decompression(algorithm: algorithmName(e), offset: offsetOf(e), detail: "produced \(d.count) of \(llen) bytes")
            }
            return d
        case .failure(let err):
            throw EROFSError.decompression(algorithm: algorithmName(e), offset: offsetOf(e), detail: err.description)
        }
    }
}

extension Array {
    subscript(safe i: Int) -> Element? { i >= 0 && i < count ? self[i] : nil }
}

/// Extents already mapped, per inode, sorted by start: mapping one walks the compression index
/// lcluster by lcluster (up to 256 index reads for a 1 MiB pcluster of 4 KiB lclusters), and a
/// reader asking for a pcluster piece by piece would walk it again for every piece. Emptied when it
/// holds `limit` extents.
final class ExtentCache: @unchecked Sendable {  // state behind its lock
    private let state = Locked<(byNid: [UInt64: [Compressed.Extent]], count: Int)>(([:], 0))
    let limit: Int
    init(limit: Int) { self.limit = limit }

    func extent(nid: UInt64, containing la: UInt64,
                _ map: (UInt64) throws -> Compressed.Extent) throws -> Compressed.Extent {
        let known: Compressed.Extent? = state.withLock { s in
            guard let list = s.byNid[nid] else { return nil }
            var lo = 0, hi = list.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if list[mid].end <= la { lo = mid + 1 } else { hi = mid }
            }
            return lo < list.count && list[lo].start <= la ? list[lo] : nil
        }
        if let known { return known }
        let e = try map(la)
        guard e.start <= la, la < e.end else { return e }
        state.withLock { s in
            if s.count >= limit { s = ([:], 0) }
            var list = s.byNid[nid] ?? []
            var at = 0, hi = list.count
            while at < hi {
                let mid = (at + hi) / 2
                if list[mid].start < e.start { at = mid + 1 } else { hi = mid }
            }
            guard at == 0 || list[at - 1].end <= e.start, at == list.count || list[at].start >= e.end else { return }
            list.insert(e, at: at)
            s.byNid[nid] = list
            s.count += 1
        }
        return e
    }
}

/// Decompressed extents, most recently used kept up to `limit` bytes: a reader that asks for a
/// pcluster piece by piece (a FUSE read of 128 KiB, a 4 KiB `cat` loop) decompresses it once, not
/// once per piece. Safe for concurrent readers; two that miss together both decompress (no waiting).
public final class PclusterCache: @unchecked Sendable {  // state behind its lock
    struct Key: Hashable { var nid: UInt64; var start: UInt64; var end: UInt64 }
    private struct State {
        var entries: [Key: (bytes: [UInt8], used: UInt64)] = [:]
        var bytes = 0
        var clock: UInt64 = 0
        var hits: UInt64 = 0
        var misses: UInt64 = 0
    }
    private let state = Locked(State())
    public let limit: Int

    public init(limit: Int) { self.limit = limit }

    /// (hits, misses) so far.
    public var counts: (hits: UInt64, misses: UInt64) { state.withLock { ($0.hits, $0.misses) } }

    func value(for key: Key, _ make: () throws -> [UInt8]) throws -> [UInt8] {
        let cached: [UInt8]? = state.withLock { s in
            s.clock += 1
            guard let e = s.entries[key] else { s.misses += 1; return nil }
            s.hits += 1
            s.entries[key]?.used = s.clock
            return e.bytes
        }
        if let cached { return cached }
        let bytes = try make()
        guard limit > 0, bytes.count <= limit / 4 else { return bytes }
        state.withLock { s in
            if s.entries[key] == nil { s.bytes += bytes.count }
            s.entries[key] = (bytes, s.clock)
            // Evict the least recently used eighth at a time (a scan, but rare: only when full).
            while s.bytes > limit, !s.entries.isEmpty {
                let victims = s.entries.sorted { $0.value.used < $1.value.used }.prefix(max(1, s.entries.count / 8))
                for (k, v) in victims {
                    s.entries[k] = nil
                    s.bytes -= v.bytes.count
                }
            }
        }
        return bytes
    }
}
