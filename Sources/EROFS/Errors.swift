/// Everything that can be wrong with an EROFS image, naming the structure and the byte offset.
public enum EROFSError: Error, Equatable, CustomStringConvertible {
    case notEROFS(magic: UInt32)
    case truncated(structure: String, offset: UInt64)
    case corrupt(structure: String, offset: UInt64, detail: String)
    case badChecksum(expected: UInt32, computed: UInt32)
    case unsupportedBlockSize(bits: UInt8)
    case unsupportedFeature(String)
    /// The path names something that cannot hold an image (a directory, a FIFO…).
    case notAnImageFile(String)
    case unsupportedAlgorithm(String)
    case notFound(path: String)
    case notADirectory(path: String)
    case isADirectory(path: String)
    case decompression(algorithm: String, offset: UInt64, detail: String)
    case loop(structure: String, offset: UInt64)
    case io(offset: UInt64, length: Int, errno: Int32)

    public var description: String {
        switch self {
        case .notEROFS(let m): return "not an EROFS image (magic 0x\(String(m, radix: 16)) at offset 1024, expected 0xe0f5e1e2)"
        case .truncated(let s, let o): return "image truncated: \(s) at offset \(o) extends past the end"
        case .corrupt(let s, let o, let d): return "corrupt \(s) at offset \(o): \(d)"
        case .badChecksum(let e, let c): return "superblock checksum mismatch (stored 0x\(String(e, radix: 16)), computed 0x\(String(c, radix: 16)))"
        case .unsupportedBlockSize(let b): return "unsupported block size 2^\(b) (EROFS allows 512 B to 64 KiB)"
        case .unsupportedFeature(let f): return "image uses feature \(f), which this reader does not implement"
        case .notAnImageFile(let what): return "is \(what), not an image file; pass the path of an EROFS image"
        case .unsupportedAlgorithm(let a): return "compression algorithm \(a) is not available in this build"
        case .notFound(let p): return "no such file in image: \(p)"
        case .notADirectory(let p): return "not a directory in image: \(p)"
        case .isADirectory(let p): return "is a directory in image: \(p)"
        case .decompression(let a, let o, let d): return "\(a) decompression failed for the pcluster at offset \(o): \(d)"
        case .loop(let s, let o): return "\(s) at offset \(o) loops back on itself"
        case .io(let o, let l, let e): return "read of \(l) bytes at offset \(o) failed (errno \(e))"
        }
    }
}
