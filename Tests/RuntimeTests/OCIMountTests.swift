import Foundation
import Glibc
import Testing
@testable import Probe
@testable import Remote
@testable import Runtime
import Syscall
import TestSupport

let ociReason = lazyMountMissing ?? "needs docker-registry, htpasswd (apache2-utils), curl and python3 for OCI mounts"
let canMountOCI = canMountRemote && RegistryServer.missing == nil && FaultProxy.missing == nil && TestEnv.which("htpasswd") != nil

/// A registry, images built from trees, a private state and cache, and kernel-mounted oracles.
struct OCIFixture {
    let registry: RegistryServer
    let dir: ScratchDir
    let runtime: Runtime
    var mnt: String { dir.file("mnt") }
    var mnt2: String { dir.file("mnt2") }
    static let hostPlatform = OCIPlatform.host(machine: Sys.uname().machine)
    static let otherArch = hostPlatform.architecture == "amd64" ? "arm64" : "amd64"

    init(_ label: String, basicAuth: (user: String, password: String)? = nil) throws {
        registry = try RegistryServer(basicAuth: basicAuth)
        do { dir = try ScratchDir(label) } catch { registry.remove(); throw error }
        for d in ["mnt", "mnt2", "oracle", "cache"] { try FileManager.default.createDirectory(atPath: dir.file(d), withIntermediateDirectories: true) }
        runtime = Runtime(state: StateStore(root: dir.file("state")))
        Runtime.workerExecutable = cliBinary
    }

    /// An EROFS image of a fresh tree; `variant` changes the content.
    func image(_ name: String, variant: Int = 0, budget: Int = 2 << 20) throws -> String {
        let tree = dir.file("tree-\(name)")
        try ReaderTrees.makeEdge(at: tree + "/edge")
        try ReaderTrees.makeReal(at: tree + "/real", budget: budget)
        try "variant \(variant) of \(name)\n".write(toFile: tree + "/which", atomically: false, encoding: .utf8)
        let img = dir.file("\(name).erofs")
        try Samples.mkfs(tree, img, ["-zlz4hc"])
        return img
    }

    func oracle(_ image: String) throws -> TreeFactsLite {
        try withKernelMount(image, dir.file("oracle")) { TreeFactsLite(dir.file("oracle")) }
    }

    func options(_ oci: OCIOptions = OCIOptions(environment: [:]), backend: Backend? = nil) -> RemoteOptions {
        RemoteOptions(cacheDir: dir.file("cache"), oci: oci)
    }

    func mount(_ source: String, at mnt: String, oci: OCIOptions = OCIOptions(environment: [:]), backend: Backend? = nil) throws -> MountOutcome {
        try runtime.mount(MountRequest(source: source, mountpoint: mnt, backend: backend, remote: options(oci)))
    }

    func remove() {
        for m in currentMounts().filter({ $0.hasPrefix(dir.path) }).reversed() { try? MountAPI.umount(m, detach: true) }
        for r in runtime.state.all() { if let pid = r.workerPID { try? Sys.kill(pid, SIGKILL) } }
        registry.remove()
        dir.remove()
    }
}

func remoteMessage(_ body: () throws -> Void) -> String? {
    do { try body(); return nil } catch let e as RuntimeError { return e.description } catch { return "\(error)" }
}

@Suite(.serialized, .enabled(if: canMountOCI, Comment(rawValue: ociReason)))
struct OCIMountTests {
    /// An image index with two platforms: the host's image by default, the other with --platform;
    /// both cold, every byte compared; Docker v2 media types resolve the same way.
    @Test func imageIndexPicksThePlatform() throws {
        let f = try OCIFixture("oci-index")
        defer { f.remove() }
        let mine = try f.image("mine", variant: 1), other = try f.image("other", variant: 2, budget: 1 << 20)
        let a = try f.registry.pushImage("test/app", reference: "host-only", layers: [mine], arch: OCIFixture.hostPlatform.architecture)
        let b = try f.registry.pushImage("test/app", reference: "other-only", layers: [other], arch: OCIFixture.otherArch)
        try f.registry.pushIndex("test/app", reference: "v1", entries: [
            (b.digest, b.size, "linux", OCIFixture.otherArch, nil), (a.digest, a.size, "linux", OCIFixture.hostPlatform.architecture, OCIFixture.hostPlatform.variant),
        ])
        let out = try f.mount("oci://\(f.registry.host)/test/app:v1", at: f.mnt)
        let rec = try #require(out.record)
        #expect(rec.backend == "fanotify" && rec.sourceKind == "oci")
        #expect(out.notes.contains { $0.contains("platform linux/\(OCIFixture.hostPlatform.architecture)") })
        #expect(TreeFactsLite(f.mnt) == (try f.oracle(mine)))
        let layerDigest = sha256Hex([UInt8](try Data(contentsOf: URL(fileURLWithPath: mine))))
        // Keyed by the blob's source (registry, repository, digest) while it fills; by its digest alone
        // only once complete and verified.
        let cachePath = try #require(rec.cachePath)
        let info = try #require(BlobCache.readInfo(cachePath + ".json"))
        #expect(info.url.hasSuffix("/v2/test/app/blobs/sha256:" + layerDigest) && info.digest == layerDigest)
        #expect(rec.cachePath == f.dir.file("cache") + "/blobs/sha256/" + BlobCache.partialKey(source: info.url), "per-source cache entry")

        var oci = OCIOptions(environment: [:])
        oci.platform = "linux/\(OCIFixture.otherArch)"
        _ = try f.mount("oci://\(f.registry.host)/test/app:v1", at: f.mnt2, oci: oci)
        #expect(TreeFactsLite(f.mnt2) == (try f.oracle(other)))
        try f.runtime.umount(f.mnt2)

        oci.platform = "linux/s390x"
        let msg = remoteMessage { _ = try f.mount("oci://\(f.registry.host)/test/app:v1", at: f.mnt2, oci: oci) }
        #expect(msg?.contains("no image for linux/s390x") == true && msg?.contains("linux/\(OCIFixture.otherArch)") == true, "\(msg ?? "mounted")")

        // Docker v2 manifest list + manifest, addressed by digest.
        let c = try f.registry.pushImage("test/docker", reference: "one", layers: [other], arch: OCIFixture.hostPlatform.architecture, docker: true)
        let list = try f.registry.pushIndex("test/docker", reference: "list", entries: [(c.digest, c.size, "linux", OCIFixture.hostPlatform.architecture, nil)], docker: true)
        _ = try f.mount("oci://\(f.registry.host)/test/docker@\(list)", at: f.mnt2)
        #expect(TreeFactsLite(f.mnt2) == (try f.oracle(other)))
        try f.runtime.umount(f.mnt2)
        try f.runtime.umount(f.mnt)
        #expect(f.runtime.state.all().isEmpty)
    }

    /// Several layers: no silent guess; --layer N and --blob pick one; --digest must agree.
    /// Both FUSE backends through docker-registry (Bearer-free, anonymous): the registry blob served
    /// lazily; the bytes are the image's; umount leaves no server.
    @Test(.enabled(if: fuseSkipReason == nil, Comment(rawValue: fuseSkipReason ?? "")), arguments: [Backend.fuseBlob, .fuseErofs])
    func fuseBackendsThroughTheRegistry(backend: Backend) throws {
        let f = try OCIFixture("oci-fuse")
        defer { f.remove() }
        let img = try f.image("img", budget: 2 << 20)
        try f.registry.pushImage("test/fuse", reference: "v1", layers: [img], arch: OCIFixture.hostPlatform.architecture)
        let out = try f.mount("oci://\(f.registry.host)/test/fuse:v1", at: f.mnt, backend: backend)
        #expect(out.record?.backend == backend.rawValue && out.record?.sourceKind == "oci")
        #expect(TreeFactsLite(f.mnt) == (try f.oracle(img)))
        try f.runtime.umount(f.mnt)
        #expect(fuseServers(under: f.dir).isEmpty && !currentMounts().contains(f.mnt))
    }

    /// A complete, verified entry is a local file: mounted by the kernel where it can; a FUSE backend
    /// named for it is recorded whole, so `umount` takes its FUSE mount and server along.
    @Test func aCompleteEntryMountsLocallyAndCleansUp() throws {
        let f = try OCIFixture("oci-complete")
        defer { f.remove() }
        let img = try f.image("img", budget: 2 << 20)
        try f.registry.pushImage("test/full", reference: "v1", layers: [img], arch: OCIFixture.hostPlatform.architecture)
        let src = "oci://\(f.registry.host)/test/full:v1"
        var opts = f.options()
        opts.prefetch = .all
        _ = try f.runtime.mount(MountRequest(source: src, mountpoint: f.mnt, backend: .fuseBlob, remote: opts))
        let hex = sha256Hex([UInt8](try Data(contentsOf: URL(fileURLWithPath: img))))
        let shared = BlobCache(directory: f.dir.file("cache")).paths(key: hex)
        for _ in 0..<100 where BlobCache.readInfo(shared.info)?.verified != true { usleep(100_000) }
        try f.runtime.umount(f.mnt)
        #expect(BlobCache.readInfo(shared.info)?.verified == true, "the prefetched entry was verified and shared")
        let kernel = try f.mount(src, at: f.mnt)
        #expect(kernel.notes.contains("cached and verified") && kernel.record?.backend == Backend.file.rawValue,
                "\(kernel.notes) \(kernel.record?.backend ?? "-")")
        try f.runtime.umount(f.mnt)
        let named = try f.mount(src, at: f.mnt, backend: .fuseBlob)
        #expect(named.record?.backend == Backend.fuseBlob.rawValue && named.record?.fuseMount != nil)
        #expect(TreeFactsLite(f.mnt) == (try f.oracle(img)))
        try f.runtime.umount(f.mnt)
        #expect(fuseServers(under: f.dir).isEmpty, "\(fuseServers(under: f.dir))")
        #expect(currentMounts().filter { $0.hasPrefix(f.dir.path) }.isEmpty, "\(currentMounts())")
    }

    @Test func layerChoice() throws {
        let f = try OCIFixture("oci-layers")
        defer { f.remove() }
        let one = try f.image("one", variant: 1, budget: 1 << 20), two = try f.image("two", variant: 2, budget: 1 << 20)
        try f.registry.pushImage("test/layers", reference: "latest", layers: [one, two], arch: OCIFixture.hostPlatform.architecture)
        let src = "oci://\(f.registry.host)/test/layers"
        let msg = remoteMessage { _ = try f.mount(src, at: f.mnt) }
        #expect(msg?.contains("has 2 layers; choose one with --layer N or --blob") == true, "\(msg ?? "mounted")")
        var oci = OCIOptions(environment: [:])
        oci.layer = 1
        _ = try f.mount(src, at: f.mnt, oci: oci)
        #expect(TreeFactsLite(f.mnt) == (try f.oracle(two)))
        try f.runtime.umount(f.mnt)
        oci.layer = 5
        #expect(remoteMessage { _ = try f.mount(src, at: f.mnt, oci: oci) }?.contains("--layer 5 is out of range") == true)
        oci.layer = nil
        oci.blob = "sha256:" + sha256Hex([UInt8](try Data(contentsOf: URL(fileURLWithPath: one))))
        _ = try f.mount(src, at: f.mnt, oci: oci)
        #expect(TreeFactsLite(f.mnt) == (try f.oracle(one)))
        try f.runtime.umount(f.mnt)
        #expect(remoteMessage {
            _ = try f.runtime.mount(MountRequest(source: src, mountpoint: f.mnt, remote: RemoteOptions(cacheDir: f.dir.file("cache"), digest: String(repeating: "0", count: 64), oci: oci)))
        }?.contains("resolves to") == true)
        #expect(currentMounts().filter { $0.hasPrefix(f.dir.path) }.isEmpty)
    }

    /// htpasswd Basic auth: no credentials and wrong ones fail with a clear line; right ones from an
    /// auth file work; the secret appears in no state file, status output, argument list or log.
    @Test func basicAuthAndSecretsStaySecret() throws {
        let secret = "s3cr3t-\(UInt32.random(in: 0...UInt32.max))"
        let f = try OCIFixture("oci-basic", basicAuth: ("tester", secret))
        defer { f.remove() }
        let img = try f.image("img", budget: 1 << 20)
        try f.registry.pushImage("private/img", reference: "v1", layers: [img], arch: OCIFixture.hostPlatform.architecture)
        let src = "oci://\(f.registry.host)/private/img:v1"
        let none = remoteMessage { _ = try f.mount(src, at: f.mnt) }
        #expect(none?.contains("requires credentials") == true, "\(none ?? "mounted")")
        let authFile = f.dir.file("auth.json")
        func writeAuth(_ pass: String) throws {
            let b64 = Data("tester:\(pass)".utf8).base64EncodedString()
            try "{\"auths\":{\"http://\(f.registry.host)\":{\"auth\":\"\(b64)\"}}}".write(toFile: authFile, atomically: true, encoding: .utf8)
        }
        try writeAuth("wrong")
        let bad = remoteMessage { _ = try f.mount(src, at: f.mnt, oci: OCIOptions(environment: ["REGISTRY_AUTH_FILE": authFile])) }
        #expect(bad?.contains("refused the credentials of tester") == true && bad?.contains("wrong") == false, "\(bad ?? "mounted")")
        try writeAuth(secret)
        let out = try f.mount(src, at: f.mnt, oci: OCIOptions(environment: ["DOCKER_CONFIG": f.dir.path, "REGISTRY_AUTH_FILE": authFile]))
        let rec = try #require(out.record)
        #expect(TreeFactsLite(f.mnt) == (try f.oracle(img)))
        // Nowhere: state, worker files, command lines of the worker processes, status.
        var places: [String: String] = [:]
        for p in FileManager.default.subpaths(atPath: f.dir.file("state")) ?? [] {
            places["state/" + p] = (try? String(contentsOfFile: f.dir.file("state/" + p), encoding: .utf8)) ?? ""
        }
        for pid in (try FileManager.default.contentsOfDirectory(atPath: "/proc")).compactMap(Int32.init) {
            guard let cmd = try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline")), let text = String(data: cmd, encoding: .utf8),
                  text.contains("__serve") else { continue }
            places["cmdline \(pid)"] = text
            places["environ \(pid)"] = (try? String(contentsOfFile: "/proc/\(pid)/environ", encoding: .utf8)) ?? ""
        }
        #expect(places.keys.contains { $0.hasPrefix("cmdline") }, "worker processes found")
        places["status"] = "\(try f.runtime.status())"
        for (k, v) in places { #expect(!v.contains(secret), "secret in \(k)") }
        try f.runtime.umount(f.mnt)
        _ = rec

        // The same credentials from a docker credential helper named in $DOCKER_CONFIG/config.json.
        let helperDir = f.dir.file("helper")
        try FileManager.default.createDirectory(atPath: helperDir, withIntermediateDirectories: false)
        let helper = helperDir + "/docker-credential-ectest"
        try writeExecutable(helper, "#!/bin/sh\nread reg\n[ \"$reg\" = \"\(f.registry.host)\" ] || { echo 'credentials not found'; exit 1; }\necho '{\"Username\":\"tester\",\"Secret\":\"\(secret)\"}'\n")
        try "{\"credHelpers\":{\"\(f.registry.host)\":\"ectest\"}}".write(toFile: helperDir + "/config.json", atomically: true, encoding: .utf8)
        let viaHelper = try f.mount(src, at: f.mnt, oci: OCIOptions(environment: ["DOCKER_CONFIG": helperDir, "PATH": helperDir + ":/usr/bin:/bin"]))
        #expect(viaHelper.record != nil)
        #expect(TreeFactsLite(f.mnt) == (try f.oracle(img)))
        try f.runtime.umount(f.mnt)
    }

    /// Bearer tokens discovered from WWW-Authenticate (a token front in the proxy), with
    /// --username/--password credentials; anonymous requests are told to bring credentials.
    @Test func bearerTokenDiscovery() throws {
        let f = try OCIFixture("oci-bearer")
        defer { f.remove() }
        let proxy = try FaultProxy(upstream: "http://\(f.registry.host)")
        defer { proxy.remove() }
        let img = try f.image("img", budget: 1 << 20)
        try f.registry.pushImage("team/img", reference: "v1", layers: [img], arch: OCIFixture.hostPlatform.architecture)
        try proxy.set("{\"bearer\":{\"user\":\"bob\",\"password\":\"hunter2\"}}")
        let src = "oci://\(proxy.host)/team/img:v1"
        let anon = remoteMessage { _ = try f.mount(src, at: f.mnt) }
        #expect(anon?.contains("requires credentials") == true, "\(anon ?? "mounted")")
        var oci = OCIOptions(environment: [:])
        oci.username = "bob"
        oci.password = "nope"
        #expect(remoteMessage { _ = try f.mount(src, at: f.mnt, oci: oci) }?.contains("refused") == true)
        oci.password = "hunter2"
        _ = try f.mount(src, at: f.mnt, oci: oci)
        #expect(TreeFactsLite(f.mnt) == (try f.oracle(img)))
        let log = proxy.log
        #expect(log.contains { $0.hasPrefix("token /token?service=faultproxy&scope=repository%3Ateam%2Fimg%3Apull") }, "\(log.suffix(5))")
        #expect(log.contains { $0.hasPrefix("pass /v2/team/img/blobs/") && $0.contains("bytes=") }, "range reads went through with the token")
        try f.runtime.umount(f.mnt)
    }

    /// `push` → `mount` over Debian's docker-registry (no referrers API): the EROFS layer media type,
    /// its fs-verity annotations equal to `image verity`, the tree blob, its referrer artifact in the
    /// sha256-<hex> fallback tag; the mount checks every block (a front flipping one byte of the blob
    /// makes that file EIO, every other file right); a second push uploads nothing new;
    /// --require-verity refuses an image pushed without a digest.
    @Test func pushThenEveryBlockVerified() throws {
        let f = try OCIFixture("oci-push")
        defer { f.remove() }
        let img = try f.image("img", budget: 2 << 20)
        let src = "oci://\(f.registry.host)/team/pushed:v1"
        let pushed = try run(cliBinary, ["push", img, src])
        #expect(pushed.status == 0 && pushed.stdout.contains("via the fallback tag sha256-"), "\(pushed.stdout) \(pushed.stderr)")
        let root = try run(cliBinary, ["image", "verity", img]).stdout.split(separator: " ").first.map(String.init)
        func get(_ path: String, _ accept: String) throws -> [String: Any] {
            let r = try run("/usr/bin/curl", ["-s", "-H", "Accept: \(accept)", "http://\(f.registry.host)\(path)"])
            return try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], "\(r.stdout)")
        }
        let manifestJSON = try run("/usr/bin/curl", ["-s", "-H", "Accept: \(OCIPushTypes.imageManifest)",
                                                     "http://\(f.registry.host)/v2/team/pushed/manifests/v1"]).stdout
        let manifestDigest = "sha256:" + sha256Hex(Array(manifestJSON.utf8))
        let manifest = try get("/v2/team/pushed/manifests/v1", OCIPushTypes.imageManifest)
        let layer = try #require((manifest["layers"] as? [[String: Any]])?.first)
        let notes = try #require(layer["annotations"] as? [String: String])
        #expect(layer["mediaType"] as? String == "application/vnd.erofs.layer.v1")
        #expect(notes[OCIPushTypes.verityDigestAnnotation] == root, "\(notes) vs \(root ?? "?")")
        let tag = "sha256-" + manifestDigest.dropFirst(7)
        let index = try get("/v2/team/pushed/manifests/\(tag)", OCIPushTypes.imageIndex)
        let entry = try #require((index["manifests"] as? [[String: Any]])?.first)
        #expect(entry["artifactType"] as? String == OCIPushTypes.verityTree)
        let artifact = try get("/v2/team/pushed/manifests/\(entry["digest"] as? String ?? "")", OCIPushTypes.imageManifest)
        #expect((artifact["subject"] as? [String: Any])?["digest"] as? String == manifestDigest)
        #expect(((artifact["layers"] as? [[String: Any]])?.first?["digest"] as? String) == notes[OCIPushTypes.verityTreeAnnotation])
        let again = try run(cliBinary, ["push", img, src])
        #expect(again.status == 0 && again.stdout.contains("0 blobs uploaded, 4 already there"), "\(again.stdout)")

        // Through a front that flips one byte of the layer: that file is EIO, the rest the image's.
        let proxy = try FaultProxy(upstream: "http://\(f.registry.host)")
        defer { proxy.remove() }
        let (victim, at) = try VerityMountTests.dataOffset(img)
        try proxy.set("{\"fault\":\"flip\",\"at\":\(at),\"match\":\"/blobs/\(layer["digest"] as? String ?? "")\"}")
        var requireVerity = f.options()
        requireVerity.requireVerity = true
        let out = try f.runtime.mount(MountRequest(source: "oci://\(proxy.host)/team/pushed:v1", mountpoint: f.mnt, remote: requireVerity))
        defer { try? f.runtime.umount(f.mnt) }
        #expect(out.notes.contains { $0.contains("every block checked against fs-verity digest") }, "\(out.notes)")
        let got = TreeFactsLite(f.mnt), expected = try f.oracle(img)
        #expect(got.entries[victim]?.contains("read-error") == true, "\(victim): \(got.entries[victim] ?? "missing")")
        for (path, facts) in expected.entries where path != victim { #expect(got.entries[path] == facts, "\(path)") }

        // An image without a digest is refused with --require-verity, naming what to do.
        let plain = try f.image("plain", budget: 1 << 20)
        try f.registry.pushImage("team/plain", reference: "v1", layers: [plain], arch: OCIFixture.hostPlatform.architecture)
        let refused = remoteMessage {
            _ = try f.runtime.mount(MountRequest(source: "oci://\(f.registry.host)/team/plain:v1", mountpoint: f.mnt2, remote: requireVerity))
        }
        #expect(refused?.contains("names no fs-verity digest") == true, "\(refused ?? "mounted")")
        #expect(!currentMounts().contains(f.mnt2))
    }

    /// `push` to a registry with the OCI 1.1 referrers API (the fault proxy adds it in front of
    /// docker-registry): the registry indexes the tree's referrer itself (it answers OCI-Subject), so
    /// no fallback tag is written; the referrers API lists the artifact holding the tree the layer's
    /// annotations name; a mount through that registry checks every block.
    @Test func pushToARegistryWithTheReferrersAPI() throws {
        let f = try OCIFixture("oci-push-referrers")
        defer { f.remove() }
        let proxy = try FaultProxy(upstream: "http://\(f.registry.host)")
        defer { proxy.remove() }
        try proxy.set("{\"referrers\":true}")
        let img = try f.image("img", budget: 1 << 20)
        let pushed = try run(cliBinary, ["push", img, "oci://\(proxy.host)/team/ref:v1"])
        #expect(pushed.status == 0 && pushed.stdout.contains("via the referrers API"), "\(pushed.stdout) \(pushed.stderr)")
        func curl(_ url: String, _ accept: String = "*/*") throws -> String {
            try run("/usr/bin/curl", ["-s", "-H", "Accept: \(accept)", url]).stdout
        }
        let tags = try curl("http://\(f.registry.host)/v2/team/ref/tags/list")
        #expect(tags.contains("\"v1\"") && !tags.contains("sha256-"), "no fallback tag: \(tags)")
        let manifestJSON = try curl("http://\(f.registry.host)/v2/team/ref/manifests/v1", OCIPushTypes.imageManifest)
        let manifest = try #require(try JSONSerialization.jsonObject(with: Data(manifestJSON.utf8)) as? [String: Any])
        let layer = try #require((manifest["layers"] as? [[String: Any]])?.first)
        let tree = (layer["annotations"] as? [String: String])?[OCIPushTypes.verityTreeAnnotation]
        let subject = "sha256:" + sha256Hex(Array(manifestJSON.utf8))
        let type = OCIPushTypes.verityTree.replacingOccurrences(of: "+", with: "%2B")
        let listed = try curl("http://\(proxy.host)/v2/team/ref/referrers/\(subject)?artifactType=\(type)")
        let index = try #require(try JSONSerialization.jsonObject(with: Data(listed.utf8)) as? [String: Any], "\(listed)")
        let entry = try #require((index["manifests"] as? [[String: Any]])?.first, "\(listed)")
        #expect(entry["artifactType"] as? String == OCIPushTypes.verityTree)
        let artifactJSON = try curl("http://\(f.registry.host)/v2/team/ref/manifests/\(entry["digest"] as? String ?? "")",
                                    OCIPushTypes.imageManifest)
        let artifact = try #require(try JSONSerialization.jsonObject(with: Data(artifactJSON.utf8)) as? [String: Any])
        #expect((artifact["subject"] as? [String: Any])?["digest"] as? String == subject)
        #expect(tree != nil && (artifact["layers"] as? [[String: Any]])?.first?["digest"] as? String == tree)

        var requireVerity = f.options()
        requireVerity.requireVerity = true
        let out = try f.runtime.mount(MountRequest(source: "oci://\(proxy.host)/team/ref:v1", mountpoint: f.mnt,
                                                   remote: requireVerity))
        defer { try? f.runtime.umount(f.mnt) }
        #expect(out.notes.contains { $0.contains("every block checked against fs-verity digest") }, "\(out.notes)")
        #expect(TreeFactsLite(f.mnt) == (try f.oracle(img)))
    }

    /// Bad pushes: one line each, the documented exit code, nothing uploaded.
    @Test func badPushesAreRefused() throws {
        let f = try OCIFixture("oci-push-bad")
        defer { f.remove() }
        let notImage = f.dir.file("not-an-image")
        try "hello\n".write(toFile: notImage, atomically: false, encoding: .utf8)
        let img = try f.image("img", budget: 1 << 20)
        let cases: [([String], Int32, String)] = [
            (["push", notImage, "oci://\(f.registry.host)/t/x:v1"], 3, "not an EROFS image"),
            (["push", f.dir.file("missing"), "oci://\(f.registry.host)/t/x:v1"], 3, "does not exist"),
            (["push", img, "oci://\(f.registry.host)/t/x@sha256:" + String(repeating: "a", count: 64)], 2, "not a digest"),
            (["push", img, "http://\(f.registry.host)/t/x:v1"], 2, "REFERENCE"),
            (["push", img, "oci://127.0.0.1:1/t/x:v1"], 1, "push failed"),
            (["push", "--platform", "linux", img, "oci://\(f.registry.host)/t/x:v1"], 2, "--platform"),
        ]
        for (args, code, says) in cases {
            let r = try run(cliBinary, args)
            #expect(r.status == code && r.stderr.contains(says), "\(args): \(r.status) \(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1, "\(args): \(r.stderr)")
        }
        let tags = try run("/usr/bin/curl", ["-s", "http://\(f.registry.host)/v2/t/x/tags/list"]).stdout
        #expect(!tags.contains("v1"), "\(tags)")
    }

    /// A tampered blob (one byte flipped in the registry's storage) fails loudly when verified.
    @Test func tamperedBlobFailsLoudly() throws {
        let f = try OCIFixture("oci-tamper")
        defer { f.remove() }
        let img = try f.image("img", budget: 1 << 20)
        try f.registry.pushImage("test/t", reference: "v1", layers: [img], arch: OCIFixture.hostPlatform.architecture)
        let hex = sha256Hex([UInt8](try Data(contentsOf: URL(fileURLWithPath: img))))
        let stored = f.registry.dir.file("storage/docker/registry/v2/blobs/sha256/\(hex.prefix(2))/\(hex)/data")
        let fd = try Sys.open(stored, O_RDWR)
        let size = try Sys.fstat(fd.rawValue).st_size
        var b = try Sys.preadFully(fd.rawValue, count: 1, at: Int64(size) - 100)
        b[0] ^= 0xff
        _ = try b.withUnsafeBytes { try Sys.pwrite(fd.rawValue, $0, at: Int64(size) - 100) }
        Sys.close(fd.rawValue)
        let msg = remoteMessage { _ = try f.mount("oci://\(f.registry.host)/test/t:v1", at: f.mnt, backend: .file) }
        #expect(msg?.contains("does not match its digest") == true, "\(msg ?? "mounted")")
        #expect(!FileManager.default.fileExists(atPath: f.dir.file("cache/blobs/sha256/\(hex)")), "the entry was discarded")
        #expect(currentMounts().filter { $0.hasPrefix(f.dir.path) }.isEmpty && f.runtime.state.all().isEmpty)
    }

    @Test func badReferencesAreRejected() throws {
        let f = try OCIFixture("oci-bad")
        defer { f.remove() }
        for (src, needle) in [("oci://\(f.registry.host)", "no repository"), ("oci://\(f.registry.host)/UPPER/case", "not a repository name"),
                              ("oci://\(f.registry.host)/a@sha256:123", "not a sha256"), ("oci://\(f.registry.host)/missing/repo:v1", "no manifest"),
                              ("oci://127.0.0.1:1/x/y", "cannot reach")] {
            let msg = remoteMessage { _ = try f.mount(src, at: f.mnt) }
            #expect(msg?.contains(needle) == true, "\(src): \(msg ?? "mounted")")
        }
        // Plain http only for 127.0.0.0/8 or with --insecure: the same registry named "localhost".
        let img = try f.image("img", budget: 256 << 10)
        try f.registry.pushImage("test/x", reference: "v1", layers: [img], arch: OCIFixture.hostPlatform.architecture)
        let viaName = "oci://localhost:\(f.registry.port)/test/x:v1"
        let refused = remoteMessage { _ = try f.mount(viaName, at: f.mnt) }
        #expect(refused?.contains("plain http is used only with --insecure") == true, "\(refused ?? "mounted")")
        var oci = OCIOptions(environment: [:])
        oci.insecure = true
        _ = try f.mount(viaName, at: f.mnt, oci: oci)
        #expect(TreeFactsLite(f.mnt) == (try f.oracle(img)))
        try f.runtime.umount(f.mnt)
        #expect(f.runtime.state.all().isEmpty && currentMounts().filter { $0.hasPrefix(f.dir.path) }.isEmpty)
    }
}
