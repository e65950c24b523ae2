#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Syscall

/// Answers a registry's 401 challenges: HTTP Basic with the credentials, or a Bearer token from the
/// realm the WWW-Authenticate header names (anonymous, or with the credentials as Basic). Shared by
/// every request to one registry; a token that expires is renewed on the next 401.
public final class RegistryAuth: @unchecked Sendable {  // the token behind its lock; `timeoutMs` set before sharing
    public let registry: String
    public let repository: String
    let credentials: RegistryCredentials?
    private let current = Locked<String?>(nil)
    private let refreshLock = Locked<Void>(())
    public var timeoutMs = 30_000

    public init(registry: String, repository: String, credentials: RegistryCredentials?) {
        self.registry = registry
        self.repository = repository
        self.credentials = credentials
    }

    /// The Authorization header to send now (none before the first challenge).
    var headers: [String] { current.get().map { [$0] } ?? [] }

    /// Handles a 401 whose request carried `sent` (the header list it used). Returns when a new
    /// Authorization header is in place; throws when the registry cannot be satisfied.
    func authorize(challenge: String?, sent: [String]) throws {
        try refreshLock.withLock { _ in
            // Another thread renewed it since this request went out: just retry.
            if let now = current.get(), !sent.contains(now) { return }
            guard let challenge, let c = Challenge.pick(challenge) else {
                throw RemoteError.auth(registry: registry, detail: "it answered 401 without a usable WWW-Authenticate challenge")
            }
            switch c.scheme {
            case "basic":
                guard let credentials else { throw RemoteError.authRequired(registry: registry) }
                if sent.contains(credentials.basicHeader) {
                    throw RemoteError.auth(registry: registry, detail: "it refused the \(credentials)")
                }
                current.set(credentials.basicHeader)
            case "bearer":
                current.set("Authorization: Bearer " + (try token(c)))
            default:
                throw RemoteError.auth(registry: registry, detail: "unsupported authentication scheme '\(c.scheme)'")
            }
        }
    }

    /// Asks the token realm for a pull token for this repository.
    func token(_ c: Challenge) throws -> String {
        guard let realm = c.params["realm"], realm.hasPrefix("https://") || realm.hasPrefix("http://") else {
            throw RemoteError.auth(registry: registry, detail: "its Bearer challenge names no http(s) realm")
        }
        var query: [String] = []
        if let s = c.params["service"] { query.append("service=" + Self.percentEncode(s)) }
        query.append("scope=" + Self.percentEncode(c.params["scope"] ?? "repository:\(repository):pull"))
        let url = realm + (realm.contains("?") ? "&" : "?") + query.joined(separator: "&")
        // The credentials go to a token realm only over https or on this host: a challenge can name
        // any realm, and plain http elsewhere would hand them to whoever is on the path.
        let send = Self.mayCarryCredentials(realm) ? credentials : nil
        let r: HTTPResponse
        do {
            r = try performWithRetries(url: url, handle: HTTPHandle.make(for: url), attempts: 4, baseDelayMs: 100, auth: nil, requests: nil) { h, _ in
                h.request(url, headers: send.map { [$0.basicHeader] } ?? [], bodyLimit: 1 << 20, timeoutMs: timeoutMs,
                          deadlineMs: timeoutMs)
            }
        } catch RemoteError.unreachable(_, let detail) {
            throw RemoteError.auth(registry: registry, detail: "cannot reach its token service: \(detail)")
        }
        if r.status == 401 || r.status == 403 {
            if credentials != nil, send == nil {
                throw RemoteError.auth(registry: registry, detail: "its token service \(realm) is plain http on another host; "
                                       + "credentials are sent only over https or to this host")
            }
            if let credentials { throw RemoteError.auth(registry: registry, detail: "its token service refused the \(credentials)") }
            throw RemoteError.authRequired(registry: registry)
        }
        guard r.status == 200 else { throw RemoteError.auth(registry: registry, detail: "its token service answered HTTP \(r.status)") }
        struct TokenResponse: Decodable { var token: String?; var access_token: String? }
        guard let t = try? JSONDecoder().decode(TokenResponse.self, from: Data(r.body)), let tok = t.token ?? t.access_token, !tok.isEmpty else {
            throw RemoteError.auth(registry: registry, detail: "its token service answered without a token")
        }
        return tok
    }

    /// An https URL, or an http one whose host is this machine (127.0.0.0/8, ::1, localhost).
    static func mayCarryCredentials(_ url: String) -> Bool {
        if url.hasPrefix("https://") { return true }
        guard url.hasPrefix("http://") else { return false }
        let rest = url.dropFirst(7)
        let authority = rest.prefix { $0 != "/" && $0 != "?" }
        let hostPort = authority.split(separator: "@").last.map(String.init) ?? ""
        let host: String
        if hostPort.hasPrefix("[") { host = String(hostPort.dropFirst().prefix { $0 != "]" }) } else {
            host = String(hostPort.prefix { $0 != ":" })
        }
        return host == "localhost" || host == "::1" || (host.hasPrefix("127.") && host.split(separator: ".").count == 4)
    }

    static func percentEncode(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.unicodeScalars.append(UnicodeScalar(b))
            default:
                out += "%" + String(hexByte: b).uppercased()
            }
        }
        return out
    }

    /// What another process needs to authenticate the same way: the credentials, if any. Sent
    /// over a pipe, never on a command line or in the environment.
    public func secret() -> [UInt8] {
        struct Payload: Encodable { var registry: String; var repository: String; var username: String?; var password: String?; var origin: String? }
        let p = Payload(registry: registry, repository: repository, username: credentials?.username, password: credentials?.password, origin: credentials?.origin)
        return (try? [UInt8](JSONEncoder().encode(p))) ?? []
    }

    /// The inverse of `secret()`.
    public convenience init(secret bytes: [UInt8]) throws {
        struct Payload: Decodable { var registry: String; var repository: String; var username: String?; var password: String?; var origin: String? }
        guard let p = try? JSONDecoder().decode(Payload.self, from: Data(bytes)) else { throw RemoteError.credentials("unreadable credentials from the parent process") }
        let c = p.username.map { RegistryCredentials(username: $0, password: p.password ?? "", origin: p.origin ?? "parent") }
        self.init(registry: p.registry, repository: p.repository, credentials: c)
    }
}

/// One WWW-Authenticate challenge: a scheme and its parameters.
struct Challenge: Equatable {
    var scheme: String
    var params: [String: String]

    /// All challenges in a header value (several may be joined by commas), Bearer preferred.
    static func pick(_ header: String) -> Challenge? {
        let all = parse(header)
        return all.first { $0.scheme == "bearer" } ?? all.first { $0.scheme == "basic" } ?? all.first
    }

    static func parse(_ header: String) -> [Challenge] {
        var out: [Challenge] = []
        let b = Array(header.utf8)
        var i = 0
        func skipSpaces() { while i < b.count, b[i] == 0x20 || b[i] == 0x09 || b[i] == UInt8(ascii: ",") { i += 1 } }
        func token() -> String {
            let s = i
            while i < b.count, b[i] != 0x20, b[i] != 0x09, b[i] != UInt8(ascii: ","), b[i] != UInt8(ascii: "=") { i += 1 }
            return String(decoding: b[s..<i], as: UTF8.self)
        }
        while true {
            skipSpaces()
            guard i < b.count else { break }
            let scheme = token().lowercased()
            var params: [String: String] = [:]
            while true {
                while i < b.count, b[i] == 0x20 || b[i] == 0x09 { i += 1 }
                let save = i
                if i < b.count, b[i] == UInt8(ascii: ",") { i += 1; while i < b.count, b[i] == 0x20 { i += 1 } }
                let key = token().lowercased()
                guard !key.isEmpty, i < b.count, b[i] == UInt8(ascii: "=") else { i = save; break }
                i += 1
                var value: [UInt8] = []
                if i < b.count, b[i] == UInt8(ascii: "\"") {
                    i += 1
                    while i < b.count, b[i] != UInt8(ascii: "\"") {
                        if b[i] == UInt8(ascii: "\\"), i + 1 < b.count { i += 1 }
                        value.append(b[i])
                        i += 1
                    }
                    i += 1
                } else {
                    while i < b.count, b[i] != UInt8(ascii: ","), b[i] != 0x20 { value.append(b[i]); i += 1 }
                }
                params[key] = String(decoding: value, as: UTF8.self)
            }
            if scheme.isEmpty { break }
            out.append(Challenge(scheme: scheme, params: params))
        }
        return out
    }
}
