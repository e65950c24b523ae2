#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto
import Dispatch
import Syscall

/// The blob an OCI reference leads to, and how it was found.
public struct ResolvedBlob: Sendable {
    /// The registry's blob URL (no credentials in it).
    public var url: String
    /// "sha256:<hex>".
    public var digest: String
    public var size: UInt64?
    public var mediaType: String?
    /// The image manifest the layer came from (nil for --blob).
    public var manifestDigest: String?
    public var platform: String?
    public var layerIndex: Int?
    /// The layer's fs-verity digest (hex) and the URL of its tree blob, from the annotations `push`
    /// writes; nil when the layer has none.
    public var verity: VeritySource?
}

/// A pull-only client of the OCI distribution API for one repository: manifests (image index and
/// image manifest, OCI and Docker v2 media types), platform selection, layer choice, and the blob URL.
/// TLS is always verified; plain http is used only for 127.0.0.0/8 (tried first there: nothing on
/// the wire leaves the host, and it saves a TLS setup per process) or with `insecure` (after https
/// failed to connect).
public final class RegistryClient: @unchecked Sendable {  // used by one thread at a time (a mount's preparation)
    public static let indexTypes = ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"]
    public static let manifestTypes = ["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"]

    public let ref: OCIReference
    public let auth: RegistryAuth
    public let insecure: Bool
    /// "https://host:port" or "http://host:port" once `connect()` chose.
    public private(set) var base = ""
    private static let knownSchemes = Locked<[String: (scheme: String, at: UInt64)]>([:])
    private var lazyHandle: HTTPHandle?
    private func handle(for url: String) throws -> HTTPHandle {
        if let h = lazyHandle { return h }
        let h = try HTTPHandle.make(for: url)
        lazyHandle = h
        return h
    }
    public var timeoutMs = 30_000

    public init(ref: OCIReference, credentials: RegistryCredentials?, insecure: Bool) {
        self.ref = ref
        self.insecure = insecure
        auth = RegistryAuth(registry: ref.registry, repository: ref.repository, credentials: credentials)
    }

    /// Plain http is acceptable for loopback registries or when the user said --insecure.
    public var plainHTTPAllowed: Bool { insecure || Self.isLoopback(ref.host) }

    static func isLoopback(_ host: String) -> Bool {
        let p = host.split(separator: ".", omittingEmptySubsequences: false)
        return p.count == 4 && p[0] == "127" && p.allSatisfy { UInt8($0) != nil }
    }

    /// Chooses the scheme with a GET /v2/ (401 counts as "there is a registry here").
    public func connect() throws {
        var failures: [String] = []
        var schemes = allowedSchemes
        if let known = rememberedScheme() { schemes = [known] + schemes.filter { $0 != known } }
        for scheme in schemes {
            let url = "\(scheme)://\(ref.registry)/v2/"
            let r = try handle(for: url).request(url, bodyLimit: 4096, timeoutMs: timeoutMs)
            if r.curlCode == 0 {
                // A TLS registry asked in plain http answers 400: try https next.
                if scheme == "http", r.status == 400, scheme != schemes.last {
                    failures.append("http: HTTP 400")
                    continue
                }
                guard r.status == 200 || r.status == 401 else {
                    throw RemoteError.registry(registry: ref.registry, detail: "GET \(url) answered HTTP \(r.status); is this an OCI registry?")
                }
                base = "\(scheme)://\(ref.registry)"
                Self.knownSchemes.withLock { $0[ref.registry] = (scheme, DispatchTime.now().uptimeNanoseconds) }
                return
            }
            failures.append("\(scheme): \(r.error)")
        }
        let hint = plainHTTPAllowed ? "" : " (plain http is used only with --insecure or for 127.0.0.0/8)"
        throw RemoteError.unreachable(url: "oci://\(ref.registry)", detail: failures.joined(separator: "; ") + hint)
    }

    var allowedSchemes: [String] {
        Self.isLoopback(ref.host) ? ["http", "https"] : insecure ? ["https", "http"] : ["https"]
    }

    /// The scheme this process saw the registry answer on in the last 10 minutes, if still allowed: a
    /// long-running process (the daemon) then skips probing https first, which costs a TLS setup
    /// (~20 ms, most of it loading the CA bundle) on every mount of a plain-http loopback registry.
    func rememberedScheme() -> String? {
        guard let known = Self.knownSchemes.withLock({ $0[ref.registry] }),
              DispatchTime.now().uptimeNanoseconds - known.at < 600_000_000_000, allowedSchemes.contains(known.scheme) else { return nil }
        return known.scheme
    }

    /// GET with auth challenges answered and transient failures retried.
    func get(_ path: String, accept: [String], limit: Int) throws -> HTTPResponse {
        // A scheme this process saw the registry answer on recently needs no GET /v2/ probe; if the
        // registry no longer answers there, probe again.
        var remembered = false
        if base.isEmpty, let known = rememberedScheme() {
            base = "\(known)://\(ref.registry)"
            remembered = true
        }
        if base.isEmpty { try connect() }
        var headers: [String] = []
        if !accept.isEmpty { headers.append("Accept: " + accept.joined(separator: ", ")) }
        func attempt(_ tries: Int) throws -> HTTPResponse {
            let url = base + path
            return try performWithRetries(url: url, handle: handle(for: url), attempts: tries, baseDelayMs: 100, auth: auth, requests: nil) { h, authHeaders in
                h.request(url, headers: headers + authHeaders, bodyLimit: limit, timeoutMs: timeoutMs, deadlineMs: timeoutMs + limit / 64)
            }
        }
        guard remembered else { return try attempt(5) }
        do {
            return try attempt(1)
        } catch RemoteError.unreachable {
            _ = Self.knownSchemes.withLock { $0.removeValue(forKey: ref.registry) }
            base = ""
            try connect()
            return try attempt(5)
        }
    }

    /// A request with a method and optionally a body (`path` absolute, or under the registry), with
    /// auth challenges answered and transient failures retried (the body is sent again from its start).
    func send(_ path: String, method: String, headers: [String] = [], body fd: Int32? = nil, length: Int64 = 0) throws
        -> HTTPResponse {
        if base.isEmpty { try connect() }
        let url = path.hasPrefix("http://") || path.hasPrefix("https://") ? path : base + path
        return try performWithRetries(url: url, handle: handle(for: url), attempts: 5, baseDelayMs: 100, auth: auth,
                                      requests: nil) { h, authHeaders in
            method == "HEAD"
                ? h.request(url, headOnly: true, headers: headers + authHeaders, bodyLimit: 0, timeoutMs: timeoutMs)
                : h.send(url, method: method, headers: headers + authHeaders, body: fd, length: length, timeoutMs: timeoutMs)
        }
    }

    /// A Location header made absolute (registries answer a path, or a URL of their own).
    func absolute(_ location: String) -> String {
        location.hasPrefix("http://") || location.hasPrefix("https://") ? location : base + location
    }

    struct Descriptor: Decodable {
        struct Platform: Decodable { var os: String; var architecture: String; var variant: String? }
        var mediaType: String?
        var digest: String
        var size: UInt64?
        var platform: Platform?
        var annotations: [String: String]?
    }

    struct ManifestDocument: Decodable {
        var schemaVersion: Int?
        var mediaType: String?
        var manifests: [Descriptor]?
        var layers: [Descriptor]?
    }

    /// Fetches a manifest or index by tag or digest, checking the digest of what arrived.
    func fetchManifest(_ reference: String) throws -> (doc: ManifestDocument, digest: String, type: String) {
        let r = try get("/v2/\(ref.repository)/manifests/\(reference)", accept: Self.indexTypes + Self.manifestTypes, limit: 4 << 20)
        switch r.status {
        case 200: break
        case 404: throw RemoteError.registry(registry: ref.registry, detail: "no manifest \(ref.repository):\(reference) (HTTP 404); check the repository and tag")
        case 401, 403: throw RemoteError.auth(registry: ref.registry, detail: "access to \(ref.repository) denied (HTTP \(r.status))")
        default: throw RemoteError.httpStatus(url: base + "/v2/\(ref.repository)/manifests/\(reference)", status: r.status)
        }
        guard !r.bodyTruncated else { throw RemoteError.registry(registry: ref.registry, detail: "manifest \(reference) is larger than 4 MiB") }
        let digest = "sha256:" + SHA256.hash(data: r.body).map { String(hexByte: $0) }.joined()
        if OCIReference.isDigest(reference), reference.lowercased() != digest {
            throw RemoteError.registry(registry: ref.registry, detail: "manifest \(reference) arrived with digest \(digest); refusing it")
        }
        if let claimed = r.header("docker-content-digest"), OCIReference.isDigest(claimed), claimed.lowercased() != digest {
            throw RemoteError.registry(registry: ref.registry, detail: "manifest \(reference) does not match its Docker-Content-Digest \(claimed)")
        }
        guard let doc = try? JSONDecoder().decode(ManifestDocument.self, from: Data(r.body)) else {
            throw RemoteError.registry(registry: ref.registry, detail: "manifest \(reference) is not valid JSON")
        }
        let type = doc.mediaType ?? r.header("content-type")?.split(separator: ";").first.map { String($0).trimmed } ?? ""
        return (doc, digest, type)
    }

    /// Follows the reference to one blob: `blob` directly, or the manifest (through the index for
    /// `platform`) and its layer `layer` (default: the only layer, or the only EROFS layer).
    public func resolve(platform: OCIPlatform, layer: Int?, blob: String?) throws -> ResolvedBlob {
        if let blob {
            guard OCIReference.isDigest(blob) else { throw RemoteError.badReference(blob, "--blob takes sha256:<64 hex digits>") }
            if base.isEmpty { try connect() }
            return ResolvedBlob(url: base + "/v2/\(ref.repository)/blobs/\(blob.lowercased())", digest: blob.lowercased())
        }
        var (doc, digest, type) = try fetchManifest(ref.reference)
        var chosenPlatform: String?
        if Self.indexTypes.contains(type) || (doc.manifests != nil && doc.layers == nil) {
            let entries = doc.manifests ?? []
            let fits = entries.filter { d in
                d.platform.map { platform.matches(OCIPlatform(os: $0.os, architecture: $0.architecture, variant: $0.variant)) } ?? false
            }
            let exact = fits.first { $0.platform?.variant == platform.variant }
            guard let pick = exact ?? fits.first else {
                let offered = entries.compactMap { $0.platform.map { OCIPlatform(os: $0.os, architecture: $0.architecture, variant: $0.variant).description } }
                throw RemoteError.registry(registry: ref.registry, detail: "\(ref) has no image for \(platform) (it offers: \(offered.isEmpty ? "none" : offered.joined(separator: ", "))); choose one with --platform")
            }
            chosenPlatform = pick.platform.map { OCIPlatform(os: $0.os, architecture: $0.architecture, variant: $0.variant).description }
            (doc, digest, type) = try fetchManifest(pick.digest)
            if Self.indexTypes.contains(type) {
                throw RemoteError.registry(registry: ref.registry, detail: "nested image indexes are not supported (\(pick.digest))")
            }
        }
        guard let layers = doc.layers, !layers.isEmpty else {
            throw RemoteError.registry(registry: ref.registry, detail: "manifest \(digest) has no layers")
        }
        let index: Int
        if let layer {
            guard layers.indices.contains(layer) else {
                throw RemoteError.registry(registry: ref.registry, detail: "--layer \(layer) is out of range: the image has \(layers.count) layers (0-\(layers.count - 1))")
            }
            index = layer
        } else if layers.count == 1 {
            index = 0
        } else if let only = Self.onlyEROFSLayer(layers) {
            index = only
        } else {
            let list = layers.enumerated().map { "\($0.offset): \($0.element.mediaType ?? "?") \($0.element.size.map(String.init) ?? "?") bytes" }
            throw RemoteError.registry(registry: ref.registry, detail: "\(ref) has \(layers.count) layers; choose one with --layer N or --blob (\(list.joined(separator: "; ")))")
        }
        let d = layers[index]
        guard OCIReference.isDigest(d.digest) else {
            throw RemoteError.registry(registry: ref.registry, detail: "layer \(index) has an unsupported digest \(d.digest) (only sha256)")
        }
        return ResolvedBlob(url: base + "/v2/\(ref.repository)/blobs/\(d.digest.lowercased())", digest: d.digest.lowercased(), size: d.size,
                            mediaType: d.mediaType, manifestDigest: digest, platform: chosenPlatform, layerIndex: index,
                            verity: try verity(of: d, index: index))
    }

    /// The fs-verity digest and tree a layer's annotations name (what `push` writes), if any.
    func verity(of d: Descriptor, index: Int) throws -> VeritySource? {
        guard let a = d.annotations, let root = a[OCIPushTypes.verityDigestAnnotation],
              let tree = a[OCIPushTypes.verityTreeAnnotation] else { return nil }
        guard OCIReference.isDigest(root), OCIReference.isDigest(tree) else {
            throw RemoteError.registry(registry: ref.registry, detail: "layer \(index) has malformed fs-verity annotations "
                                       + "(\(root), \(tree)); expected sha256:<64 hex digits>")
        }
        var v = VeritySource(digest: String(root.dropFirst(7)), treeURL: base + "/v2/\(ref.repository)/blobs/\(tree.lowercased())")
        v.origin = "the layer's annotations"
        return v
    }

    static func onlyEROFSLayer(_ layers: [Descriptor]) -> Int? {
        let hits = layers.indices.filter { (layers[$0].mediaType ?? "").lowercased().contains("erofs") }
        return hits.count == 1 ? hits[0] : nil
    }
}
