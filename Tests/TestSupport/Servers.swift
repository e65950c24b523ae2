import Crypto
import Foundation
import Glibc
import Syscall

/// TCP helpers for servers the tests start on 127.0.0.1.
public enum TCP {
    public static func canConnect(_ port: Int) -> Bool {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(s) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        return withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } } == 0
    }

    /// Starts `executable` (with a clean signal mask, so SIGTERM stops it) and waits until it listens
    /// on `port`; nil (process stopped) if it never does.
    static func startListening(_ executable: String, _ args: [String], port: Int, log: String) throws -> ServerProcess? {
        let pid = try Sys.spawnDetached(executable, args, keep: [], logPath: log)
        let p = ServerProcess(pid: pid)
        for _ in 0..<250 {
            if canConnect(port) || !p.isRunning { break }
            usleep(20_000)
        }
        if p.isRunning, canConnect(port) { return p }
        p.stop()
        return nil
    }
}

/// A server process the tests started.
public final class ServerProcess: @unchecked Sendable {
    public let pid: Int32
    private var exited = false

    init(pid: Int32) { self.pid = pid }

    public var isRunning: Bool {
        if exited { return false }
        if Sys.reap(pid) { exited = true }
        return !exited && Sys.processExists(pid)
    }

    /// SIGTERM, then SIGKILL after 5 s; reaps it.
    public func stop() {
        guard !exited else { return }
        try? Sys.kill(pid, SIGTERM)
        for _ in 0..<250 where isRunning { usleep(20_000) }
        if isRunning { try? Sys.kill(pid, SIGKILL); _ = Sys.wait(pid) }
        exited = true
    }
}

public func sha256Hex(_ bytes: [UInt8]) -> String { SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined() }

/// Debian's docker-registry (distribution 2.8) on 127.0.0.1 with storage in a scratch directory and,
/// optionally, htpasswd basic auth. Images are pushed through the Distribution API with curl.
public final class RegistryServer: @unchecked Sendable {
    public let dir: ScratchDir
    public private(set) var port = 0
    public let basicAuth: (user: String, password: String)?
    private var process: ServerProcess?
    public var host: String { "127.0.0.1:\(port)" }

    public static var missing: String? {
        if TestEnv.which("docker-registry") == nil { return "docker-registry (Debian package docker-registry)" }
        if TestEnv.which("curl") == nil { return "curl" }
        return nil
    }

    public init(basicAuth: (user: String, password: String)? = nil) throws {
        self.basicAuth = basicAuth
        dir = try ScratchDir("registry")
        var authConf = ""
        if let basicAuth {
            let r = try run(TestEnv.which("htpasswd") ?? "/usr/bin/htpasswd", ["-Bbn", basicAuth.user, basicAuth.password])
            guard r.status == 0 else { dir.remove(); throw POSIXError(.EINVAL, userInfo: ["htpasswd": r.stderr]) }
            try r.stdout.write(toFile: dir.file("htpasswd"), atomically: false, encoding: .utf8)
            authConf = "auth:\n  htpasswd:\n    realm: erofs-compat-test\n    path: \(dir.file("htpasswd"))\n"
        }
        for _ in 0..<10 {
            port = Int.random(in: 20000...60000)
            let conf = """
                version: 0.1
                log:
                  level: error
                  accesslog:
                    disabled: true
                storage:
                  filesystem:
                    rootdirectory: \(dir.file("storage"))
                http:
                  addr: 127.0.0.1:\(port)
                \(authConf)
                """
            try conf.write(toFile: dir.file("config.yml"), atomically: false, encoding: .utf8)
            if let p = try TCP.startListening(TestEnv.which("docker-registry")!, ["serve", dir.file("config.yml")], port: port, log: dir.file("registry.log")) {
                process = p
                return
            }
        }
        let log = (try? String(contentsOfFile: dir.file("registry.log"), encoding: .utf8)) ?? ""
        dir.remove()
        throw POSIXError(.EADDRINUSE, userInfo: ["docker-registry": log])
    }

    public func remove() {
        process?.stop()
        process = nil
        dir.remove()
    }

    func curl(_ args: [String]) throws -> RunResult {
        var a = ["-sS", "--fail-with-body"]
        if let basicAuth { a += ["-u", "\(basicAuth.user):\(basicAuth.password)"] }
        let r = try run(TestEnv.which("curl")!, a + args)
        guard r.status == 0 else { throw POSIXError(.EIO, userInfo: ["curl \(args.joined(separator: " "))": r.stdout + r.stderr]) }
        return r
    }

    /// Uploads a blob (POST + monolithic PUT); returns "sha256:…".
    @discardableResult
    public func pushBlob(_ repo: String, file: String) throws -> String {
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
        let digest = "sha256:" + sha256Hex(bytes)
        let head = try curl(["-D", "-", "-o", "/dev/null", "-X", "POST", "http://\(host)/v2/\(repo)/blobs/uploads/"])
        guard let loc = head.stdout.split(whereSeparator: \.isNewline).first(where: { $0.lowercased().hasPrefix("location:") }) else {
            throw POSIXError(.EIO, userInfo: ["upload": head.stdout])
        }
        var url = String(loc.dropFirst(9)).trimmingCharacters(in: .whitespaces)
        if url.hasPrefix("/") { url = "http://\(host)" + url }
        url += (url.contains("?") ? "&" : "?") + "digest=" + digest
        try curl(["-X", "PUT", "-H", "Content-Type: application/octet-stream", "--data-binary", "@" + file, url])
        return digest
    }

    public func pushBlob(_ repo: String, bytes: [UInt8]) throws -> String {
        let f = dir.file("blob-\(UUID().uuidString)")
        try Data(bytes).write(to: URL(fileURLWithPath: f))
        defer { try? FileManager.default.removeItem(atPath: f) }
        return try pushBlob(repo, file: f)
    }

    /// PUTs a manifest or index under `reference`; returns its digest.
    @discardableResult
    public func putManifest(_ repo: String, reference: String, mediaType: String, json: String) throws -> String {
        let f = dir.file("manifest-\(UUID().uuidString)")
        try json.write(toFile: f, atomically: false, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: f) }
        try curl(["-X", "PUT", "-H", "Content-Type: \(mediaType)", "--data-binary", "@" + f, "http://\(host)/v2/\(repo)/manifests/\(reference)"])
        return "sha256:" + sha256Hex(Array(json.utf8))
    }

    /// Pushes an image whose layers are the given files (plus a small config); returns the manifest digest.
    @discardableResult
    public func pushImage(_ repo: String, reference: String, layers: [String], layerType: String = "application/vnd.erofs.layer.v1",
                          os: String = "linux", arch: String = "amd64", docker: Bool = false) throws -> (digest: String, size: Int) {
        let config = Array("{\"architecture\":\"\(arch)\",\"os\":\"\(os)\",\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}".utf8)
        let configDigest = try pushBlob(repo, bytes: config)
        var layerJSON: [String] = []
        for l in layers {
            let size = (try FileManager.default.attributesOfItem(atPath: l)[.size] as? NSNumber)?.intValue ?? 0
            let d = try pushBlob(repo, file: l)
            layerJSON.append("{\"mediaType\":\"\(layerType)\",\"digest\":\"\(d)\",\"size\":\(size)}")
        }
        let type = docker ? "application/vnd.docker.distribution.manifest.v2+json" : "application/vnd.oci.image.manifest.v1+json"
        let configType = docker ? "application/vnd.docker.container.image.v1+json" : "application/vnd.oci.image.config.v1+json"
        let json = "{\"schemaVersion\":2,\"mediaType\":\"\(type)\",\"config\":{\"mediaType\":\"\(configType)\",\"digest\":\"\(configDigest)\",\"size\":\(config.count)},\"layers\":[\(layerJSON.joined(separator: ","))]}"
        let digest = try putManifest(repo, reference: reference, mediaType: type, json: json)
        return (digest, json.utf8.count)
    }

    /// An image index over manifests already pushed: (digest, size, os, arch, variant).
    @discardableResult
    public func pushIndex(_ repo: String, reference: String, entries: [(digest: String, size: Int, os: String, arch: String, variant: String?)],
                          docker: Bool = false) throws -> String {
        let type = docker ? "application/vnd.docker.distribution.manifest.list.v2+json" : "application/vnd.oci.image.index.v1+json"
        let mtype = docker ? "application/vnd.docker.distribution.manifest.v2+json" : "application/vnd.oci.image.manifest.v1+json"
        let items = entries.map { e in
            "{\"mediaType\":\"\(mtype)\",\"digest\":\"\(e.digest)\",\"size\":\(e.size),\"platform\":{\"os\":\"\(e.os)\",\"architecture\":\"\(e.arch)\"" + (e.variant.map { ",\"variant\":\"\($0)\"" } ?? "") + "}}"
        }
        let json = "{\"schemaVersion\":2,\"mediaType\":\"\(type)\",\"manifests\":[\(items.joined(separator: ","))]}"
        return try putManifest(repo, reference: reference, mediaType: type, json: json)
    }
}

/// Tests/Fixtures/faultproxy.py in front of an upstream server: faults and Bearer-token auth set at
/// run time through a control file.
public final class FaultProxy: @unchecked Sendable {
    public let dir: ScratchDir
    public let upstream: String
    public private(set) var port = 0
    private var process: ServerProcess?
    public var base: String { "http://127.0.0.1:\(port)" }
    public var host: String { "127.0.0.1:\(port)" }
    var control: String { dir.file("control.json") }

    public static var missing: String? { TestEnv.which("python3") == nil ? "python3" : nil }

    public init(upstream: String) throws {
        self.upstream = upstream
        dir = try ScratchDir("proxy")
        try set("{}")
        for _ in 0..<10 {
            port = Int.random(in: 20000...60000)
            if try start() { return }
        }
        dir.remove()
        throw POSIXError(.EADDRINUSE, userInfo: ["faultproxy": "did not start"])
    }

    /// Starts (or restarts, on the same port) the proxy.
    @discardableResult
    public func start() throws -> Bool {
        let script = TestEnv.repoRoot + "/Tests/Fixtures/faultproxy.py"
        guard let p = try TCP.startListening(TestEnv.which("python3")!, [script, String(port), upstream, control], port: port, log: dir.file("proxy.log")) else { return false }
        process = p
        return true
    }

    /// Replaces the fault configuration (JSON, see faultproxy.py).
    public func set(_ json: String) throws {
        try json.write(toFile: control + ".tmp", atomically: false, encoding: .utf8)
        _ = Glibc.rename(control + ".tmp", control)
    }

    /// Lines logged so far: "FAULT-OR-pass PATH RANGE", "401 PATH", "token PATH".
    public var log: [String] {
        ((try? String(contentsOfFile: control + ".log", encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }

    public func stop() {
        process?.stop()
        process = nil
    }

    public func remove() {
        stop()
        dir.remove()
    }
}
