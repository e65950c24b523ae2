import Glibc
import Syscall
import SystemPackage

/// Where an fs-verity tree is and which digest it must match (`--verity sha256:HEX`, the tree at
/// `--verity-tree URL` or the source URL + ".verity"). Carried to every process that serves the
/// blob; each builds its own verifier and fetches the tree blocks it needs.
public struct VeritySource: Sendable, Codable, Equatable {
    /// The fs-verity file digest, hex.
    public var digest: String
    public var treeURL: String
    /// Where the digest came from: nil for `--verity`, or e.g. "the layer's annotations".
    public var origin: String?

    public init(digest: String, treeURL: String) {
        self.digest = digest.lowercased()
        self.treeURL = treeURL
    }

    /// A verifier for `blob`: the tree is opened (its size must be the one `blob`'s size implies)
    /// with the blob's credentials, and read by Range requests as checks need it. With `cacheFile`
    /// (beside the cache entry) the tree blocks fetched are kept there for later mounts: read back
    /// first, checked like fetched ones, and fetched again when they do not match.
    public func verifier(for blob: HTTPBlob, cacheFile: String? = nil) throws -> VerityVerifier {
        var bytes: [UInt8] = []
        var it = digest.utf8.makeIterator()
        while let hi = it.next(), let lo = it.next() {
            guard let v = UInt8(String(decoding: [hi, lo], as: UTF8.self), radix: 16) else { break }
            bytes.append(v)
        }
        guard bytes.count == 32 else { throw RemoteError.cache("--verity: \(digest) is not a sha256 digest") }
        let tree = try HTTPBlob(url: treeURL, auth: blob.auth)
        let fetch: VerityVerifier.FetchTree = { off, n in try tree.read(offset: off, length: n) }
        let kept = cacheFile.flatMap { try? TreeCache(path: $0) }
        let verifier = VerityVerifier(digest: bytes, dataSize: blob.size, fetchTree: kept.map { $0.reading(through: fetch) } ?? fetch,
                                      fetchFresh: kept.map { $0.writing(fetch) })
        guard verifier.treeSize > 0 else { return verifier }
        try tree.open(allowFullDownload: false)
        guard tree.size == verifier.treeSize else {
            throw RemoteError.cache("the fs-verity tree at \(tree.url) is \(tree.size) bytes; a blob of \(blob.size) bytes has a tree of \(verifier.treeSize)")
        }
        return verifier
    }
}

/// Fetched fs-verity tree blocks kept in a sparse file beside a cache entry. A block reads back as
/// all zeros until it was written (no tree block is: it holds at least one SHA-256 hash), and what
/// reads back is checked against its parent like a fetched block; one that fails is fetched again.
final class TreeCache: @unchecked Sendable {  // the descriptor is only read and written at offsets
    let fd: FileDescriptor

    init(path: String) throws {
        fd = try Sys.openNoSymlinks(path, O_RDWR | O_CREAT, mode: 0o600)
    }

    deinit { Sys.close(fd.rawValue) }

    /// The kept bytes when every 4 KiB block of the range is there, else `fetch` (kept for next time).
    func reading(through fetch: @escaping VerityVerifier.FetchTree) -> VerityVerifier.FetchTree {
        let write = writing(fetch)
        return { [self] off, n in
            if let have = try? Sys.preadFully(fd.rawValue, count: n, at: Int64(off)), have.count == n,
               stride(from: 0, to: n, by: 4096).allSatisfy({ have[$0..<min($0 + 4096, n)].contains { $0 != 0 } }) {
                return have
            }
            return try write(off, n)
        }
    }

    /// `fetch`, keeping what it answered.
    func writing(_ fetch: @escaping VerityVerifier.FetchTree) -> VerityVerifier.FetchTree {
        { [self] off, n in
            let bytes = try fetch(off, n)
            _ = try? bytes.withUnsafeBytes { try Sys.pwriteAll(fd.rawValue, $0, at: Int64(off)) }
            return bytes
        }
    }
}
