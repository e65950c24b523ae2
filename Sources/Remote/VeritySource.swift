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
    /// with the blob's credentials, and read by Range requests as checks need it.
    public func verifier(for blob: HTTPBlob) throws -> VerityVerifier {
        var bytes: [UInt8] = []
        var it = digest.utf8.makeIterator()
        while let hi = it.next(), let lo = it.next() {
            guard let v = UInt8(String(decoding: [hi, lo], as: UTF8.self), radix: 16) else { break }
            bytes.append(v)
        }
        guard bytes.count == 32 else { throw RemoteError.cache("--verity: \(digest) is not a sha256 digest") }
        let tree = try HTTPBlob(url: treeURL, auth: blob.auth)
        let verifier = VerityVerifier(digest: bytes, dataSize: blob.size) { off, n in try tree.read(offset: off, length: n) }
        guard verifier.treeSize > 0 else { return verifier }
        try tree.open(allowFullDownload: false)
        guard tree.size == verifier.treeSize else {
            throw RemoteError.cache("the fs-verity tree at \(tree.url) is \(tree.size) bytes; a blob of \(blob.size) bytes has a tree of \(verifier.treeSize)")
        }
        return verifier
    }
}
