/// `oci://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]`: a registry, a repository and a tag or digest.
public struct OCIReference: Sendable, Equatable, CustomStringConvertible {
    /// "host" or "host:port", as written (also the key for credentials).
    public var registry: String
    public var repository: String
    /// A tag, or nil when `digest` is given.
    public var tag: String?
    /// "sha256:<64 hex>".
    public var digest: String?

    /// The reference to ask the registry for: the digest when known, else the tag.
    public var reference: String { digest ?? tag ?? "latest" }
    /// The host without the port.
    public var host: String {
        if registry.hasPrefix("[") { return String(registry.dropFirst().prefix { $0 != "]" }) }
        return String(registry.prefix { $0 != ":" })
    }

    public var description: String {
        "oci://\(registry)/\(repository)" + (digest.map { "@\($0)" } ?? ":\(tag ?? "latest")")
    }

    public static func isOCI(_ s: String) -> Bool { s.hasPrefix("oci://") }

    /// Parses the reference; the error says which part is wrong.
    public init(parsing s: String) throws {
        guard s.hasPrefix("oci://") else { throw RemoteError.badReference(s, "it must start with oci://") }
        let rest = s.dropFirst(6)
        guard let slash = rest.firstIndex(of: "/") else { throw RemoteError.badReference(s, "no repository after the registry host") }
        registry = String(rest[..<slash])
        guard !registry.isEmpty, registry.allSatisfy({ $0.isLetter || $0.isNumber || ".-:[]_".contains($0) }), registry.first != ":" else {
            throw RemoteError.badReference(s, "'\(registry)' is not a registry host[:port]")
        }
        var path = String(rest[rest.index(after: slash)...])
        if let at = path.firstIndex(of: "@") {
            let d = String(path[path.index(after: at)...])
            guard Self.isDigest(d) else { throw RemoteError.badReference(s, "'\(d)' is not a sha256:<64 hex digits> digest") }
            digest = d.lowercased()
            path = String(path[..<at])
        }
        if let colon = path.lastIndex(of: ":"), !path[colon...].contains("/") {
            let t = String(path[path.index(after: colon)...])
            guard Self.isTag(t) else { throw RemoteError.badReference(s, "'\(t)' is not a valid tag") }
            if digest == nil { tag = t }
            path = String(path[..<colon])
        }
        guard Self.isRepository(path) else {
            throw RemoteError.badReference(s, "'\(path)' is not a repository name (lower-case components separated by /)")
        }
        repository = path
        if digest == nil, tag == nil { tag = "latest" }
    }

    public static func isDigest(_ d: String) -> Bool {
        guard d.hasPrefix("sha256:") else { return false }
        let hex = d.dropFirst(7)
        return hex.count == 64 && hex.allSatisfy { $0.isHexDigit }
    }

    static func isTag(_ t: String) -> Bool {
        guard let f = t.first, t.count <= 128, f.isASCII, f.isLetter || f.isNumber || f == "_" else { return false }
        return t.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "_.-".contains($0)) }
    }

    static func isRepository(_ r: String) -> Bool {
        guard !r.isEmpty, r.count <= 255 else { return false }
        return r.split(separator: "/", omittingEmptySubsequences: false).allSatisfy { c in
            guard let f = c.first, let l = c.last else { return false }
            let ok = { (x: Character) in x.isASCII && (x.isLowercase || x.isNumber) }
            return ok(f) && ok(l) && c.allSatisfy { ok($0) || "._-".contains($0) }
        }
    }
}

/// `OS/ARCH[/VARIANT]`, as image indexes describe platforms.
public struct OCIPlatform: Sendable, Equatable, CustomStringConvertible {
    public var os: String
    public var architecture: String
    public var variant: String?

    public var description: String { "\(os)/\(architecture)" + (variant.map { "/\($0)" } ?? "") }

    public init(os: String, architecture: String, variant: String? = nil) {
        self.os = os
        self.architecture = architecture
        self.variant = variant
    }

    public init(parsing s: String) throws {
        let p = s.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard (2...3).contains(p.count), p.allSatisfy({ !$0.isEmpty }) else {
            throw RemoteError.badPlatform(s)
        }
        self.init(os: p[0], architecture: p[1], variant: p.count == 3 ? p[2] : nil)
    }

    /// This host, named the way image indexes name it (uname machine → GOARCH).
    public static func host(machine: String) -> OCIPlatform {
        switch machine {
        case "x86_64": return OCIPlatform(os: "linux", architecture: "amd64")
        case "aarch64", "arm64": return OCIPlatform(os: "linux", architecture: "arm64", variant: "v8")
        case "armv7l": return OCIPlatform(os: "linux", architecture: "arm", variant: "v7")
        case "armv6l": return OCIPlatform(os: "linux", architecture: "arm", variant: "v6")
        case "i386", "i686": return OCIPlatform(os: "linux", architecture: "386")
        default: return OCIPlatform(os: "linux", architecture: machine)
        }
    }

    /// True when an index entry's platform fits: same OS and architecture, and the variant when
    /// both name one (arm64's "v8" is also matched by an entry without a variant).
    func matches(_ other: OCIPlatform) -> Bool {
        guard os == other.os, architecture == other.architecture else { return false }
        guard let v = variant, let w = other.variant else { return true }
        return v == w
    }
}
