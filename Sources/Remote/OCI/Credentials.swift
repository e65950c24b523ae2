#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Syscall
import SystemPackage

/// A user name and secret for a registry. Never printed: `description` hides the secret.
public struct RegistryCredentials: Sendable, Equatable, CustomStringConvertible {
    public var username: String
    public var password: String
    /// Where they came from ("--username", "/root/.docker/config.json", ...), for messages.
    public var origin: String

    public init(username: String, password: String, origin: String) {
        self.username = username
        self.password = password
        self.origin = origin
    }

    public var description: String { "credentials of \(username) from \(origin)" }

    /// "Authorization: Basic …".
    var basicHeader: String { "Authorization: Basic " + Base64.encode(Array("\(username):\(password)".utf8)) }

    /// Looks the registry up in the credential files, first match wins: `authFile`,
    /// $REGISTRY_AUTH_FILE, $DOCKER_CONFIG/config.json, ~/.docker/config.json. A file that exists but
    /// cannot be read or parsed is an error (naming it), never silently skipped. A file naming a
    /// credential helper for the registry (`credHelpers`, else `credsStore`) is answered by running
    /// `docker-credential-NAME get` from $PATH, as docker does.
    public static func lookup(registry: String, authFile: String?, environment: [String: String]) throws -> RegistryCredentials? {
        var files: [String] = []
        if let authFile { files.append(authFile) }
        if let f = environment["REGISTRY_AUTH_FILE"], !f.isEmpty { files.append(f) }
        if let d = environment["DOCKER_CONFIG"], !d.isEmpty { files.append(d + "/config.json") }
        if let h = environment["HOME"], !h.isEmpty { files.append(h + "/.docker/config.json") }
        for (i, file) in files.enumerated() {
            let bytes: [UInt8]
            do { bytes = try Sys.readFile(file) } catch let e as Errno where e == .noSuchFileOrDirectory && !(i == 0 && authFile != nil) {
                continue
            } catch {
                throw RemoteError.credentials("cannot read the auth file \(file): \(error)")
            }
            if let c = try parse(bytes, registry: registry, file: file, environment: environment) { return c }
        }
        return nil
    }

    struct ConfigFile: Decodable {
        struct Entry: Decodable {
            var auth: String?
            var username: String?
            var password: String?
        }
        var auths: [String: Entry]?
        var credHelpers: [String: String]?
        var credsStore: String?
    }

    /// The entry for `registry` in a docker/containers auth file (keys may carry a scheme or path).
    static func parse(_ bytes: [UInt8], registry: String, file: String, environment: [String: String] = [:]) throws -> RegistryCredentials? {
        let config: ConfigFile
        do { config = try JSONDecoder().decode(ConfigFile.self, from: Data(bytes)) } catch {
            throw RemoteError.credentials("the auth file \(file) is not valid JSON ({\"auths\": {...}}); fix or remove it")
        }
        let helper = config.credHelpers?.first(where: { normalize($0.key) == registry.lowercased() })?.value ?? config.credsStore
        if let helper, !helper.isEmpty {
            return try fromHelper(helper, registry: registry, file: file, environment: environment)
        }
        guard let auths = config.auths else { return nil }
        for (key, entry) in auths.sorted(by: { $0.key < $1.key }) where normalize(key) == registry.lowercased() {
            if let a = entry.auth, !a.isEmpty {
                guard let raw = Base64.decode(a), let text = String(validating: raw, as: UTF8.self),
                      let colon = text.firstIndex(of: ":") else {
                    throw RemoteError.credentials("the auth entry for \(registry) in \(file) is not base64 of user:password")
                }
                return RegistryCredentials(username: String(text[..<colon]), password: String(text[text.index(after: colon)...]), origin: file)
            }
            if let u = entry.username, let p = entry.password {
                return RegistryCredentials(username: u, password: p, origin: file)
            }
        }
        return nil
    }

    /// Asks `docker-credential-NAME get` for the registry (the server address on stdin, JSON
    /// {"Username", "Secret"} on stdout). "credentials not found" means none (anonymous access).
    static func fromHelper(_ name: String, registry: String, file: String, environment: [String: String]) throws -> RegistryCredentials? {
        let program = "docker-credential-" + name
        guard name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." }),
              let path = Sys.which(program, path: environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin") else {
            throw RemoteError.credentials("\(file) names the credential helper \(program), which is not in PATH; install it or remove it from \(file)")
        }
        let r: (status: Int32?, stdout: [UInt8], stderr: [UInt8])
        do {
            r = try Sys.run(path, ["get"], input: Array(registry.utf8), environment: environment, timeoutMs: 30_000)
        } catch {
            throw RemoteError.credentials("cannot run \(path): \(error)")
        }
        let said = String(decoding: r.stdout + r.stderr, as: UTF8.self).trimmed
        guard r.status == 0 else {
            if said.lowercased().contains("credentials not found") { return nil }
            let why = r.status.map { "exit \($0)" } ?? "killed (no answer within 30 s)"
            throw RemoteError.credentials("the credential helper \(program) failed for \(registry) (\(why)): \(said.prefix(200))")
        }
        struct Answer: Decodable { var Username: String; var Secret: String }
        guard let a = try? JSONDecoder().decode(Answer.self, from: Data(r.stdout)) else {
            throw RemoteError.credentials("the credential helper \(program) did not answer {\"Username\", \"Secret\"} JSON for \(registry)")
        }
        guard a.Username != "<token>" else {
            throw RemoteError.credentials("the credential helper \(program) holds an identity token for \(registry), which erofs-compat cannot use; pass --username and --password-stdin")
        }
        return RegistryCredentials(username: a.Username, password: a.Secret, origin: "\(program) (named in \(file))")
    }

    /// "https://host:port/v1/" → "host:port".
    static func normalize(_ key: String) -> String {
        var k = Substring(key.lowercased())
        for scheme in ["https://", "http://"] where k.hasPrefix(scheme) { k = k.dropFirst(scheme.count) }
        return String(k.prefix { $0 != "/" })
    }
}

/// RFC 4648 base64 (standard alphabet, padded), for HTTP Basic credentials and auth files.
enum Base64 {
    static func encode(_ bytes: [UInt8]) -> String {
        Data(bytes).base64EncodedString()
    }

    static func decode(_ s: String) -> [UInt8]? {
        let trimmed = s.trimmed
        var padded = trimmed
        while padded.count % 4 != 0 { padded += "=" }
        return Data(base64Encoded: padded).map { [UInt8]($0) }
    }
}
