import Crypto
import Glibc
import Syscall

/// fs-verity's Merkle tree, exactly as the kernel builds it (SHA-256, 4 KiB blocks, no salt): each
/// 4 KiB data block hashed, hashes packed 128 to a (zero-padded) tree block, level above level until
/// one block remains; the root hash is that block's hash (a file of one block: that block's hash;
/// an empty file: zeros). The file digest — what `fsverity digest` prints — is the SHA-256 of the
/// 256-byte fsverity_descriptor naming the root hash and the data size.
public struct FsVerityTree: Sendable {
    public static let blockSize = 4096
    public let dataSize: UInt64
    public let rootHash: [UInt8]
    /// Tree levels, leaves first (level 0 hashes the data blocks); each level's bytes are whole blocks.
    public let levels: [[UInt8]]

    /// Builds the tree of `size` bytes read through `read(offset, count)`.
    public init(size: UInt64, read: (UInt64, Int) throws -> [UInt8]) throws {
        dataSize = size
        guard size > 0 else {
            (rootHash, levels) = ([UInt8](repeating: 0, count: 32), [])
            return
        }
        var hashes: [UInt8] = []
        hashes.reserveCapacity(Int((size + 4095) / 4096) * 32)
        var pos: UInt64 = 0
        let chunk = 8 << 20
        while pos < size {
            let bytes = try read(pos, Int(min(UInt64(chunk), size - pos)))
            guard !bytes.isEmpty else { throw RemoteError.cache("short read at \(pos) while hashing") }
            var i = 0
            while i < bytes.count {
                let n = min(Self.blockSize, bytes.count - i)
                hashes += Self.hashBlock(bytes[i..<(i + n)])
                i += n
            }
            pos += UInt64(bytes.count)
        }
        // One data block: no tree, its hash is the root.
        var levels: [[UInt8]] = []
        while hashes.count > 32 {
            let level = Self.padded(hashes)
            levels.append(level)
            hashes = []
            var i = 0
            while i < level.count {
                hashes += Self.hashBlock(level[i..<(i + Self.blockSize)])
                i += Self.blockSize
            }
        }
        rootHash = hashes
        self.levels = levels
    }

    /// A block's hash; a short (last) block is zero-padded first.
    static func hashBlock(_ b: ArraySlice<UInt8>) -> [UInt8] {
        var h = SHA256()
        b.withUnsafeBytes { h.update(bufferPointer: $0) }
        if b.count < blockSize { h.update(data: [UInt8](repeating: 0, count: blockSize - b.count)) }
        return Array(h.finalize())
    }

    static func padded(_ hashes: [UInt8]) -> [UInt8] {
        let rem = hashes.count % blockSize
        return rem == 0 ? hashes : hashes + [UInt8](repeating: 0, count: blockSize - rem)
    }

    /// The fsverity_descriptor: version 1, SHA-256, 4 KiB blocks, no salt, the data size, the root hash.
    public var descriptor: [UInt8] {
        var d = [UInt8](repeating: 0, count: 256)
        d[0] = 1
        d[1] = 1
        d[2] = 12
        for i in 0..<8 { d[8 + i] = UInt8(truncatingIfNeeded: dataSize >> (8 * UInt64(i))) }
        d.replaceSubrange(16..<(16 + rootHash.count), with: rootHash)
        return d
    }

    /// The fs-verity file digest (what `fsverity digest` prints after "sha256:").
    public var digest: [UInt8] { Array(SHA256.hash(data: descriptor)) }

    /// The tree as the kernel stores it: the top level first, the leaves last.
    public var treeBytes: [UInt8] { levels.reversed().flatMap { $0 } }
}

/// Checks data blocks against an fs-verity file digest before anyone sees them: the tree blocks a
/// check needs are fetched on demand (`fetchTree(offset, length)` over the tree as the kernel
/// stores it, top level first), each verified against its parent, the top block against the digest
/// through the descriptor; verified tree blocks are kept.
public final class VerityVerifier: @unchecked Sendable {  // `verified` is behind its lock; the rest is immutable
    public typealias FetchTree = @Sendable (_ offset: UInt64, _ length: Int) throws -> [UInt8]
    let digest: [UInt8]
    let dataSize: UInt64
    let fetchTree: FetchTree
    /// Where tree blocks come from when what `fetchTree` gave does not match (a kept copy gone bad).
    let fetchFresh: FetchTree?
    /// Tree blocks per level, leaves (level 0) first, and where each level starts in the tree.
    let levelBlocks: [UInt64]
    let levelStart: [UInt64]
    private let verified = Locked<[Int: [UInt64: [UInt8]]]>([:])
    /// Leaf blocks a reader is fetching now.
    private let leavesInFlight = Locked<Set<UInt64>>([])
    /// Tree bytes fetched, for figures and tests.
    package let treeBytesFetched = Locked<UInt64>(0)
    static let hashesPerBlock: UInt64 = 128

    public init(digest: [UInt8], dataSize: UInt64, fetchTree: @escaping FetchTree, fetchFresh: FetchTree? = nil) {
        (self.digest, self.dataSize, self.fetchTree, self.fetchFresh) = (digest, dataSize, fetchTree, fetchFresh)
        var blocks = (dataSize + 4095) / 4096
        var counts: [UInt64] = []
        while blocks > 1 {
            blocks = (blocks + Self.hashesPerBlock - 1) / Self.hashesPerBlock
            counts.append(blocks)
        }
        levelBlocks = counts
        var starts = [UInt64](repeating: 0, count: counts.count)
        var off: UInt64 = 0
        for level in stride(from: counts.count - 1, through: 0, by: -1) {
            starts[level] = off
            off += counts[level] * 4096
        }
        levelStart = starts
    }

    public var digestHex: String { digest.map { String(hexByte: $0) }.joined() }

    /// The tree's size in bytes.
    public var treeSize: UInt64 { levelBlocks.reduce(0, +) * 4096 }

    /// Throws unless every 4 KiB block of `data` (at `offset`, block-aligned; the last block may be
    /// short at the end of the blob) has the hash the tree gives it.
    public func check(offset: UInt64, data: [UInt8]) throws {
        if let bad = try badBlocks(offset: offset, data: data).first { throw mismatch(bad * 4096) }
    }

    /// The indices (from 0 at the blob's start) of the blocks of `data` at `offset` whose hash is not
    /// the tree's; throws when the tree itself cannot be had or does not match the digest.
    public func badBlocks(offset: UInt64, data: [UInt8]) throws -> [UInt64] {
        precondition(offset % 4096 == 0, "verification works on whole blocks")
        let first = offset / 4096
        let count = (UInt64(data.count) + 4095) / 4096
        if levelBlocks.isEmpty {
            return count == 1 && digestOf(root: FsVerityTree.hashBlock(data[...])) == digest ? [] : [first]
        }
        try prefetchLeaves(first, count)
        var bad: [UInt64] = []
        var i: UInt64 = 0
        while i < count {
            // The leaves for a run of blocks come from one tree block at a time.
            let n = first + i
            let leafBlock = try treeBlock(level: 0, index: n / Self.hashesPerBlock)
            let inBlock = min(count - i, Self.hashesPerBlock - n % Self.hashesPerBlock)
            for k in 0..<inBlock {
                let start = Int((i + k) * 4096), end = min(start + 4096, data.count)
                let at = Int((n + k) % Self.hashesPerBlock) * 32
                if FsVerityTree.hashBlock(data[start..<end])[...] != leafBlock[at..<(at + 32)] { bad.append(n + k) }
            }
            i += inBlock
        }
        return bad
    }

    func mismatch(_ offset: UInt64) -> RemoteError {
        RemoteError.cache("block at \(offset) does not match the fs-verity tree of sha256:\(digest.map { String(hexByte: $0) }.joined())")
    }

    func digestOf(root: [UInt8]) -> [UInt8] {
        FsVerityTree(root: root, dataSize: dataSize).digest
    }

    /// Whether `data` (data block `n`; shorter only at the blob's end) has the hash the tree gives it.
    func matches(block n: UInt64, _ data: UnsafeRawBufferPointer) throws -> Bool {
        var h = SHA256()
        h.update(bufferPointer: data)
        if data.count < FsVerityTree.blockSize {
            h.update(data: [UInt8](repeating: 0, count: FsVerityTree.blockSize - data.count))
        }
        let hash = Array(h.finalize())
        if levelBlocks.isEmpty { return n == 0 && digestOf(root: hash) == digest }
        let block = try treeBlock(level: 0, index: n / Self.hashesPerBlock)
        let at = Int(n % Self.hashesPerBlock) * 32
        return block[at..<(at + 32)].elementsEqual(hash)
    }

    /// The expected hash of data block `n`.
    func leafHash(_ n: UInt64) throws -> [UInt8] {
        let block = try treeBlock(level: 0, index: n / Self.hashesPerBlock)
        let at = Int(n % Self.hashesPerBlock) * 32
        return Array(block[at..<(at + 32)])
    }

    /// Tree block `index` of `level`, verified (from its parent, or the digest for the top block).
    func treeBlock(level: Int, index: UInt64) throws -> [UInt8] {
        if let b = verified.withLock({ $0[level]?[index] }) { return b }
        try fetchVerify(level: level, from: index, count: 1)
        guard let b = verified.withLock({ $0[level]?[index] }) else { throw mismatch(0) }
        return b
    }

    /// Fetches `count` tree blocks of `level` from `from` in one request and keeps those that match
    /// their parents' hashes.
    func fetchVerify(level: Int, from: UInt64, count: UInt64) throws {
        do { try fetchVerify(level: level, from: from, count: count, through: fetchTree) } catch {
            guard let fetchFresh else { throw error }
            try fetchVerify(level: level, from: from, count: count, through: fetchFresh)
        }
    }

    func fetchVerify(level: Int, from: UInt64, count: UInt64, through fetch: FetchTree) throws {
        let n = min(count, levelBlocks[level] - from)
        let bytes = try fetch(levelStart[level] + from * 4096, Int(n * 4096))
        treeBytesFetched.withLock { $0 += UInt64(bytes.count) }
        guard bytes.count == Int(n * 4096) else { throw RemoteError.cache("the fs-verity tree is shorter than its \(treeSize) bytes") }
        for i in 0..<n {
            let block = Array(bytes[Int(i * 4096)..<Int((i + 1) * 4096)])
            let hash = FsVerityTree.hashBlock(block[...])
            let index = from + i
            if level == levelBlocks.count - 1 {
                guard digestOf(root: hash) == digest else { throw RemoteError.cache("the fs-verity tree's top block does not match the digest") }
            } else {
                let parent = try treeBlock(level: level + 1, index: index / Self.hashesPerBlock)
                let at = Int(index % Self.hashesPerBlock) * 32
                guard Array(parent[at..<(at + 32)]) == hash else { throw RemoteError.cache("fs-verity tree block \(index) of level \(level) is corrupt") }
            }
            verified.withLock { $0[level, default: [:]][index] = block }
        }
    }

    /// The level-0 tree blocks covering data blocks [first, first+count), fetched in one request.
    func prefetchLeaves(_ first: UInt64, _ count: UInt64) throws {
        let lo = first / Self.hashesPerBlock, hi = (first + count - 1) / Self.hashesPerBlock
        while true {
            let missing = verified.withLock { v in (lo...hi).filter { v[0]?[$0] == nil } }
            guard !missing.isEmpty else { return }
            // Each leaf block is fetched by one reader: the others wait for it (readers of
            // neighbouring ranges need the same ones), while readers of other ranges fetch theirs
            // at the same time.
            let claimed: [UInt64] = leavesInFlight.withLock { busy in
                let free = missing.filter { !busy.contains($0) }
                busy.formUnion(free)
                return free
            }
            guard let a = claimed.first, let b = claimed.last else {
                usleep(1000)
                continue
            }
            defer { leavesInFlight.withLock { $0.subtract(claimed) } }
            // The claimed leaves are contiguous unless another reader holds some in between: those
            // are fetched once more at worst (they verify the same).
            try fetchVerify(level: 0, from: a, count: b - a + 1)
        }
    }
}

extension FsVerityTree {
    /// Only the root and size (enough for the descriptor and the digest).
    init(root: [UInt8], dataSize: UInt64) {
        self.dataSize = dataSize
        rootHash = root
        levels = []
    }
}
