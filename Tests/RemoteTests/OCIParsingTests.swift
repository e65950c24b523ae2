import Foundation
import Testing
import TestSupport
@testable import Remote

/// References, platforms, WWW-Authenticate challenges and credential files: parsing only.
@Suite struct OCIParsingTests {
    @Test func references() throws {
        let d = "sha256:" + String(repeating: "ab", count: 32)
        let cases: [(String, String, String, String?, String?)] = [
            ("oci://registry.example:5000/team/app:v1.2", "registry.example:5000", "team/app", "v1.2", nil),
            ("oci://127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", nil),
            ("oci://ghcr.io/a/b/c@\(d)", "ghcr.io", "a/b/c", nil, d),
            ("oci://host/x_y.z-w:tag@\(d)", "host", "x_y.z-w", nil, d),
        ]
        for (s, reg, repo, tag, digest) in cases {
            let r = try OCIReference(parsing: s)
            #expect(r.registry == reg && r.repository == repo && r.tag == tag && r.digest == digest, "\(s) → \(r)")
        }
        #expect(try OCIReference(parsing: "oci://127.0.0.1:5000/app").host == "127.0.0.1")
        for bad in ["http://x/y", "oci://", "oci://host", "oci://host/", "oci://host/Upper", "oci://host/a//b", "oci://host/a:",
                    "oci://host/a@sha256:12", "oci://host/a@md5:\(String(repeating: "0", count: 64))", "oci://:5000/a", "oci://host/a:-bad"] {
            #expect(throws: RemoteError.self, "\(bad)") { try OCIReference(parsing: bad) }
        }
    }

    @Test func platforms() throws {
        #expect(OCIPlatform.host(machine: "x86_64").description == "linux/amd64")
        #expect(OCIPlatform.host(machine: "aarch64").description == "linux/arm64/v8")
        let arm64 = try OCIPlatform(parsing: "linux/arm64/v8")
        #expect(arm64.matches(OCIPlatform(os: "linux", architecture: "arm64")))
        #expect(!arm64.matches(OCIPlatform(os: "linux", architecture: "arm64", variant: "v9")))
        #expect(!arm64.matches(OCIPlatform(os: "windows", architecture: "arm64")))
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d"] { #expect(throws: RemoteError.self) { try OCIPlatform(parsing: bad) } }
        #expect(RegistryClient.isLoopback("127.0.0.1") && RegistryClient.isLoopback("127.255.3.4"))
        #expect(!RegistryClient.isLoopback("128.0.0.1") && !RegistryClient.isLoopback("localhost") && !RegistryClient.isLoopback("127.0.0.1.example"))
    }

    /// A loopback registry is asked in plain http first; one that answers 400 there (a TLS registry
    /// asked in plain http does) is asked in https next, and the error names both attempts.
    @Test(.enabled(if: FaultProxy.missing == nil, "needs python3 for the fault proxy"))
    func loopbackRegistryTriesHTTPThenHTTPS() throws {
        #expect(try RegistryClient(ref: OCIReference(parsing: "oci://127.0.0.1:5000/r:t"), credentials: nil,
                                   insecure: false).allowedSchemes == ["http", "https"])
        #expect(try RegistryClient(ref: OCIReference(parsing: "oci://reg.example/r:t"), credentials: nil,
                                   insecure: true).allowedSchemes == ["https", "http"])
        let proxy = try FaultProxy(upstream: "http://127.0.0.1:9")
        defer { proxy.remove() }
        try proxy.set(#"{"fault": "status", "status": 400, "match": "/v2/"}"#)
        let client = try RegistryClient(ref: OCIReference(parsing: "oci://127.0.0.1:\(proxy.port)/r:t"), credentials: nil,
                                        insecure: false)
        client.timeoutMs = 5000
        do {
            try client.connect()
            Issue.record("connected to a registry that answers 400")
        } catch let e as RemoteError {
            #expect(e.description.contains("http: HTTP 400; https: "), "\(e)")
        }
    }

    @Test func challenges() {
        let hub = Challenge.parse(#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#)
        #expect(hub == [Challenge(scheme: "bearer", params: ["realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                                                              "scope": "repository:library/ubuntu:pull"])])
        let two = Challenge.parse(#"Basic realm="x", Bearer realm="https://t/token",service=s"#)
        #expect(two.map(\.scheme) == ["basic", "bearer"] && two[1].params["service"] == "s")
        #expect(Challenge.pick(#"Basic realm="x", Bearer realm="https://t/token""#)?.scheme == "bearer")
        #expect(Challenge.parse(#"Basic realm="with \"quote\" and, comma""#).first?.params["realm"] == #"with "quote" and, comma"#)
        #expect(Challenge.parse("").isEmpty)
        #expect(RegistryAuth.percentEncode("repository:a/b:pull") == "repository%3Aa%2Fb%3Apull")
    }

    @Test func credentialFiles() throws {
        let file = #"{"auths":{"https://index.docker.io/v1/":{"auth":"aHViOnB3"},"127.0.0.1:5000":{"auth":"dTpwOndpdGg6Y29sb25z"},"http://reg.local":{"username":"x","password":"y"}}}"#
        let c = try RegistryCredentials.parse(Array(file.utf8), registry: "127.0.0.1:5000", file: "f")
        #expect(c?.username == "u" && c?.password == "p:with:colons")
        #expect(try RegistryCredentials.parse(Array(file.utf8), registry: "index.docker.io", file: "f")?.password == "pw")
        #expect(try RegistryCredentials.parse(Array(file.utf8), registry: "reg.local", file: "f")?.username == "x")
        #expect(try RegistryCredentials.parse(Array(file.utf8), registry: "other:1", file: "f") == nil)
        #expect(throws: RemoteError.self) { try RegistryCredentials.parse(Array("{not json".utf8), registry: "a", file: "f") }
        #expect(throws: RemoteError.self) { try RegistryCredentials.parse(Array(#"{"auths":{"a":{"auth":"!!!"}}}"#.utf8), registry: "a", file: "f") }
        #expect(!"\(c!)".contains("p:with:colons"), "description hides the secret")
        #expect(throws: RemoteError.self) {
            try RegistryCredentials.lookup(registry: "a", authFile: "/nonexistent/auth.json", environment: [:])
        }
        #expect(try RegistryCredentials.lookup(registry: "a", authFile: nil, environment: ["HOME": "/nonexistent"]) == nil)
    }

    /// credHelpers / credsStore: `docker-credential-NAME get` from $PATH answers, as with docker.
    @Test func credentialHelpers() throws {
        let d = try ScratchDir("credhelper")
        defer { d.remove() }
        func helper(_ name: String, _ body: String) throws {
            let path = d.file("docker-credential-" + name)
            try writeExecutable(path, "#!/bin/sh\n" + body + "\n")
        }
        try helper("good", #"read reg; [ "$1" = get ] || exit 9; if [ "$reg" = 127.0.0.1:5000 ]; then echo '{"ServerURL":"127.0.0.1:5000","Username":"hu","Secret":"hs"}'; else echo 'credentials not found in native keychain'; exit 1; fi"#)
        try helper("token", #"echo '{"Username":"<token>","Secret":"refresh"}'"#)
        try helper("broken", "echo boom >&2; exit 3")
        try helper("garbled", "echo not-json")
        let env = ["PATH": d.path + ":/usr/bin:/bin"]
        func lookup(_ config: String, _ registry: String = "127.0.0.1:5000") throws -> RegistryCredentials? {
            try RegistryCredentials.parse(Array(config.utf8), registry: registry, file: "cfg", environment: env)
        }
        let viaHelper = try lookup(#"{"credHelpers":{"127.0.0.1:5000":"good"},"auths":{"127.0.0.1:5000":{"auth":"dTpw"}}}"#)
        #expect(viaHelper?.username == "hu" && viaHelper?.password == "hs", "the helper wins over an inline entry")
        #expect(viaHelper?.origin.contains("docker-credential-good") == true)
        #expect(try lookup(#"{"credHelpers":{"other:1":"good"},"auths":{"127.0.0.1:5000":{"auth":"dTpw"}}}"#)?.username == "u",
                "a helper for another registry leaves the inline entry")
        #expect(try lookup(#"{"credsStore":"good"}"#)?.password == "hs")
        #expect(try lookup(#"{"credsStore":"good"}"#, "elsewhere:2") == nil, "not found in the store: anonymous")
        func message(_ config: String) -> String {
            do { _ = try lookup(config); return "no error" } catch { return "\(error)" }
        }
        #expect(message(#"{"credsStore":"missing"}"#).contains("docker-credential-missing, which is not in PATH"))
        #expect(message(#"{"credsStore":"broken"}"#).contains("exit 3"))
        #expect(message(#"{"credsStore":"garbled"}"#).contains("did not answer"))
        #expect(message(#"{"credsStore":"token"}"#).contains("identity token"))
        #expect(!message(#"{"credsStore":"token"}"#).contains("refresh"), "the token is not printed")
        #expect(message(#"{"credsStore":"../x"}"#).contains("not in PATH"))
    }
}
