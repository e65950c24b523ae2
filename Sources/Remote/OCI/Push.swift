#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto
import Syscall

/// What `push` uploads besides the image: the names of the EROFS ecosystem and of this tool.
public enum OCIPushTypes {
    /// containerd's EROFS differ and snapshotter (MediaTypeErofsLayer); "+zstd" marks a zstd-wrapped one.
    public static let erofsLayer = "application/vnd.erofs.layer.v1"
    public static let imageConfig = "application/vnd.oci.image.config.v1+json"
    public static let imageManifest = "application/vnd.oci.image.manifest.v1+json"
    public static let imageIndex = "application/vnd.oci.image.index.v1+json"
    public static let empty = "application/vnd.oci.empty.v1+json"
    /// The fs-verity Merkle tree of a layer (as the kernel stores it: top level first).
    public static let verityTree = "application/vnd.erofs-compat.verity.tree.v1"
    /// Layer annotations: the layer's fs-verity digest ("sha256:HEX") and its tree blob's digest.
    public static let verityDigestAnnotation = "org.erofs-compat.verity.digest"
    public static let verityTreeAnnotation = "org.erofs-compat.verity.tree"
}

/// A descriptor as manifests carry it.
public struct OCIDescriptor: Codable, Sendable, Equatable {
    public var mediaType: String
    public var digest: String
    public var size: UInt64
    public var annotations: [String: String]?
    public var artifactType: String?

    public init(mediaType: String, digest: String, size: UInt64, annotations: [String: String]? = nil,
                artifactType: String? = nil) {
        (self.mediaType, self.digest, self.size) = (mediaType, digest, size)
        (self.annotations, self.artifactType) = (annotations, artifactType)
    }

    /// The descriptor of `bytes`.
    public static func of(_ bytes: [UInt8], mediaType: String) -> OCIDescriptor {
        let digest = "sha256:" + hex(Array(SHA256.hash(data: bytes)))
        return OCIDescriptor(mediaType: mediaType, digest: digest, size: UInt64(bytes.count))
    }
}

private func hex(_ bytes: [UInt8]) -> String { bytes.map { String(hexByte: $0) }.joined() }

/// What a push left in the registry.
public struct PushResult: Sendable {
    public var manifest: OCIDescriptor
    public var layer: OCIDescriptor
    public var tree: OCIDescriptor
    public var referrer: OCIDescriptor
    /// "referrers API" when the registry indexed the referrer itself, else the fallback tag's name.
    public var referrersVia: String
    public var uploaded: Int
    public var skipped: Int
}

/// Uploads an EROFS image to a registry as the one layer of an image for `platform`, with its
/// fs-verity digest and Merkle tree: the tree as a blob named in the layer's annotations and kept
/// alive by an OCI 1.1 referrer artifact whose subject is the image manifest — indexed by the
/// registry's referrers API, or (registries without it) listed in the `sha256-<hex>` fallback tag.
public final class OCIPusher: @unchecked Sendable {  // used from one thread
    let client: RegistryClient
    var uploaded = 0, skipped = 0

    public init(client: RegistryClient) { self.client = client }

    /// `image` is open for reading; `tree` is its fs-verity tree.
    public func push(image fd: Int32, size: UInt64, tree: FsVerityTree, platform: OCIPlatform) throws -> PushResult {
        let layerDigest = "sha256:" + (try Self.sha256(fd: fd, size: size))
        let treeBytes = tree.treeBytes
        let treeDesc = OCIDescriptor.of(treeBytes, mediaType: OCIPushTypes.verityTree)
        var layer = OCIDescriptor(mediaType: OCIPushTypes.erofsLayer, digest: layerDigest, size: size)
        layer.annotations = [OCIPushTypes.verityDigestAnnotation: "sha256:" + hex(tree.digest),
                             OCIPushTypes.verityTreeAnnotation: treeDesc.digest]
        try uploadBlob(fd: fd, size: size, digest: layerDigest)
        try uploadBlob(treeBytes, digest: treeDesc.digest)
        let config = try Self.json(ImageConfig(architecture: platform.architecture, os: platform.os,
                                               variant: platform.variant, rootfs: .init(diff_ids: [layerDigest])))
        let configDesc = OCIDescriptor.of(config, mediaType: OCIPushTypes.imageConfig)
        try uploadBlob(config, digest: configDesc.digest)
        let manifest = try Self.json(Manifest(mediaType: OCIPushTypes.imageManifest, config: configDesc,
                                              layers: [layer]))
        let manifestDesc = try putManifest(manifest, mediaType: OCIPushTypes.imageManifest,
                                           reference: client.ref.reference)
        let (referrer, via) = try pushReferrer(subject: manifestDesc, tree: treeDesc)
        return PushResult(manifest: manifestDesc, layer: layer, tree: treeDesc, referrer: referrer, referrersVia: via,
                          uploaded: uploaded, skipped: skipped)
    }

    /// The tree's referrer: an artifact manifest (empty config, the tree as its layer) whose subject
    /// is the image manifest; then the fallback tag where the registry has no referrers API.
    func pushReferrer(subject: OCIDescriptor, tree: OCIDescriptor) throws -> (OCIDescriptor, String) {
        let empty: [UInt8] = Array("{}".utf8)
        let emptyDesc = OCIDescriptor.of(empty, mediaType: OCIPushTypes.empty)
        try uploadBlob(empty, digest: emptyDesc.digest)
        let artifact = try Self.json(Manifest(mediaType: OCIPushTypes.imageManifest,
                                              artifactType: OCIPushTypes.verityTree, config: emptyDesc,
                                              layers: [tree], subject: subject))
        var desc = OCIDescriptor.of(artifact, mediaType: OCIPushTypes.imageManifest)
        let answer = try putManifestAnswer(artifact, mediaType: OCIPushTypes.imageManifest, reference: desc.digest)
        desc.artifactType = OCIPushTypes.verityTree
        if answer.header("oci-subject") != nil { return (desc, "referrers API") }
        let tag = "sha256-" + subject.digest.dropFirst("sha256:".count)
        var index = (try? existingIndex(tag)) ?? Index(mediaType: OCIPushTypes.imageIndex, manifests: [])
        if !index.manifests.contains(where: { $0.digest == desc.digest }) { index.manifests.append(desc) }
        _ = try putManifest(try Self.json(index), mediaType: OCIPushTypes.imageIndex, reference: tag)
        return (desc, "fallback tag \(tag)")
    }

    func existingIndex(_ tag: String) throws -> Index? {
        let r = try client.get("/v2/\(client.ref.repository)/manifests/\(tag)", accept: [OCIPushTypes.imageIndex],
                               limit: 4 << 20)
        guard r.status == 200 else { return nil }
        return try JSONDecoder().decode(Index.self, from: Data(r.body))
    }

    /// A blob unless the registry has it: POST an upload, then PUT the bytes with their digest.
    func uploadBlob(fd: Int32, size: UInt64, digest: String) throws {
        let path = "/v2/\(client.ref.repository)/blobs/\(digest)"
        if try client.send(path, method: "HEAD").status == 200 { skipped += 1; return }
        let start = try client.send("/v2/\(client.ref.repository)/blobs/uploads/", method: "POST")
        guard start.status == 202, let location = start.header("location") else {
            throw failure("POST /v2/\(client.ref.repository)/blobs/uploads/", start)
        }
        let url = client.absolute(location)
        let put = try client.send(url + (url.contains("?") ? "&" : "?") + "digest=" + digest, method: "PUT",
                                  headers: ["Content-Type: application/octet-stream"], body: fd, length: Int64(size))
        guard put.status == 201 else { throw failure("PUT of blob \(digest)", put) }
        uploaded += 1
    }

    func uploadBlob(_ bytes: [UInt8], digest: String) throws {
        let fd = try Sys.memfd("erofs-compat-blob", holding: bytes)
        defer { Sys.close(fd) }
        try uploadBlob(fd: fd, size: UInt64(bytes.count), digest: digest)
    }

    func putManifest(_ bytes: [UInt8], mediaType: String, reference: String) throws -> OCIDescriptor {
        _ = try putManifestAnswer(bytes, mediaType: mediaType, reference: reference)
        return OCIDescriptor.of(bytes, mediaType: mediaType)
    }

    func putManifestAnswer(_ bytes: [UInt8], mediaType: String, reference: String) throws -> HTTPResponse {
        let fd = try Sys.memfd("erofs-compat-manifest", holding: bytes)
        defer { Sys.close(fd) }
        let r = try client.send("/v2/\(client.ref.repository)/manifests/\(reference)", method: "PUT",
                                headers: ["Content-Type: \(mediaType)"], body: fd, length: Int64(bytes.count))
        guard r.status == 201 else { throw failure("PUT of manifest \(reference)", r) }
        return r
    }

    func failure(_ what: String, _ r: HTTPResponse) -> RemoteError {
        let said = String(decoding: r.body.prefix(300), as: UTF8.self)
            .split(whereSeparator: \.isNewline).joined(separator: " ").trimmed
        let detail = "\(what) answered HTTP \(r.status)" + (said.isEmpty ? "" : ": \(said)")
        return .registry(registry: client.ref.registry, detail: detail)
    }

    static func sha256(fd: Int32, size: UInt64) throws -> String {
        var h = SHA256()
        var off: UInt64 = 0
        while off < size {
            let chunk = try Sys.preadFully(fd, count: Int(min(4 << 20, size - off)), at: Int64(off))
            guard !chunk.isEmpty else { throw RemoteError.cache("the image ended at \(off) of \(size) bytes") }
            h.update(data: chunk)
            off += UInt64(chunk.count)
        }
        return hex(Array(h.finalize()))
    }

    static func json<T: Encodable>(_ v: T) throws -> [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array(try e.encode(v))
    }

    struct ImageConfig: Encodable {
        struct RootFS: Encodable { var type = "layers"; var diff_ids: [String] }
        var architecture: String
        var os: String
        var variant: String?
        var rootfs: RootFS
    }

    struct Manifest: Encodable {
        var schemaVersion = 2
        var mediaType: String
        var artifactType: String?
        var config: OCIDescriptor
        var layers: [OCIDescriptor]
        var subject: OCIDescriptor?
    }

    struct Index: Codable {
        var schemaVersion = 2
        var mediaType: String
        var manifests: [OCIDescriptor]
    }
}
