#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import FUSE

/// A served mount's stats file (fuse-blob, fuse-erofs, nbd): the server's own figures at the top
/// level (FUSE: `FUSEStats`, so files of earlier versions read the same) and the lazy reader's,
/// the same type for every backend, under `lazy`.
enum ServedStats {
    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    /// The lazy part of a stats file.
    struct LazyPart: Decodable { var lazy: LazyFigures? }

    private struct Document: Encodable {
        let lazy: LazyFigures?
        let fuse: FUSEStats?
        func encode(to encoder: Encoder) throws {
            // FUSEStats's keys at the top level; the encoder merges the second keyed container in.
            try fuse?.encode(to: encoder)
            var c = encoder.container(keyedBy: Key.self)
            try c.encodeIfPresent(lazy, forKey: Key(stringValue: "lazy"))
        }
    }

    static func encode(lazy: LazyFigures?, fuse: FUSEStats? = nil) throws -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        return try enc.encode(Document(lazy: lazy, fuse: fuse))
    }

    /// The reader's figures in a stats file, if it has them.
    static func lazyFigures(_ data: Data) -> LazyFigures? { (try? JSONDecoder().decode(LazyPart.self, from: data))?.lazy }
}
