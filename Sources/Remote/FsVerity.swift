import Crypto
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
        h.update(data: Array(b))
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
