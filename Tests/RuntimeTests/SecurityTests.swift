import Dispatch
import Foundation
import Glibc
import Testing
@testable import Remote
@testable import Runtime
import Syscall
import TestSupport

/// A tree whose layout depends only on its shape (so two seeds give images of one size): a setuid
/// program, a device node and a filler the tests never read (the lazy cache stays incomplete).
func shapedTree(_ root: String, seed: UInt64) throws {
    var rng = SplitMix(seed: seed)
    func bytes(_ n: Int) -> Data { Data((0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }) }
    try FileManager.default.createDirectory(atPath: root + "/bin", withIntermediateDirectories: true)
    try bytes(64 << 10).write(to: URL(fileURLWithPath: root + "/bin/tool"))
    chmod(root + "/bin/tool", 0o4755)
    try bytes(6 << 20).write(to: URL(fileURLWithPath: root + "/filler"))
    mknod(root + "/null", S_IFCHR | 0o666, dev_t(1 << 8 | 3))  // 1:3, /dev/null
}

/// ST_NOSUID and ST_NODEV (statvfs f_flag bits, not exported to Swift).
let stNoSuid: UInt = 2, stNoDev: UInt = 4

func mountFlags(_ path: String) -> UInt {
    var st = statvfs()
    return statvfs(path, &st) == 0 ? st.f_flag : 0
}

/// The CLI's own answer to a `mount` (a subprocess: a crash shows as a signal, not a test abort).
func cliMount(_ args: [String], state: String) throws -> RunResult {
    try run(cliBinary, ["mount", "--no-daemon"] + args, environment: ["EROFS_COMPAT_STATE_DIR": state, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"])
}

/// Issue 13: each defect found by trying the lazy path as an attacker would, with a test that failed
/// before the fix.
@Suite(.serialized, .enabled(if: canInjectFaults, Comment(rawValue: faultReason)))
struct SecurityTests {
    /// 1. An untrusted source that names a trusted image's digest (same size, other bytes) fills
    /// only its own cache entry: a later mount of the trusted image never sees those bytes. Remote
    /// mounts are nosuid,nodev unless `-o suid,dev`.
    @Test func anotherSourceNeverFillsATrustedEntry() throws {
        let f = try RemoteFixture("poison", mkfs: []) { try shapedTree($0, seed: 1) }
        defer { f.remove() }
        try shapedTree(f.dir.file("evil-tree"), seed: 2)
        try Samples.mkfs(f.dir.file("evil-tree"), f.server.root + "/evil.erofs", [])
        let good = try Data(contentsOf: URL(fileURLWithPath: f.server.root + "/img.erofs"))
        let evil = try Data(contentsOf: URL(fileURLWithPath: f.server.root + "/evil.erofs"))
        try #require(good.count == evil.count && good != evil, "two images of one size")
        let expected = try f.oracle()
        var opts = f.remote
        opts.digest = sha256Hex([UInt8](good))

        // The attacker's server, with the trusted digest: served lazily, its bytes reach the cache.
        let attacker = try f.runtime.mount(MountRequest(source: f.server.base + "/evil.erofs", mountpoint: f.mnt, remote: opts))
        let flags = mountFlags(f.mnt)
        #expect(flags & stNoSuid != 0 && flags & stNoDev != 0, "remote mounts are nosuid,nodev")
        #expect(attacker.record?.options.contains("nosuid,nodev") == true)
        _ = TreeFactsLite.digest(f.mnt + "/bin/tool")
        try umountRetryingBusy(f.runtime, f.mnt)

        // The trusted image: every byte its own.
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: opts))
        defer { try? f.runtime.umount(f.mnt) }
        #expect(expected.entries["bin/tool"]?.hasSuffix(" " + TreeFactsLite.digest(f.mnt + "/bin/tool")) == true)

        // Opting out, for an image the caller trusts with setuid programs and devices.
        var o = MountOptions()
        o.suid = true
        o.dev = true
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.dir.file("mnt2"), options: o, remote: opts))
        defer { try? f.runtime.umount(f.dir.file("mnt2")) }
        #expect(mountFlags(f.dir.file("mnt2")) & (stNoSuid | stNoDev) == 0)
    }

    /// 2. The mountpoint is opened once and the mount attached to that directory: a path component
    /// swapped for a symlink while the metadata is fetched never redirects the mount.
    @Test func aSwappedMountpointIsNeverMountedOn() throws {
        let f = try RemoteFixture("mnt-race")
        defer { f.remove() }
        let proxy = try FaultProxy(upstream: f.server.base)
        defer { proxy.remove() }
        let user = f.dir.file("user"), victim = f.dir.file("victim")
        for d in [user + "/mnt", victim + "/mnt"] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        // The probe passes; the metadata requests after it are held back 1.5 s each.
        try proxy.set("{\"fault\":\"stall\",\"seconds\":1.5,\"after\":1,\"match\":\"/img.erofs\"}")
        let result = Locked<String?>(nil)
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            defer { done.signal() }
            let msg = remoteMessage { _ = try f.runtime.mount(MountRequest(source: proxy.base + "/img.erofs", mountpoint: user + "/mnt", remote: f.remote)) }
            result.set(msg ?? "mounted")
        }
        usleep(700_000)
        try FileManager.default.moveItem(atPath: user, toPath: f.dir.file("user.orig"))
        try FileManager.default.createSymbolicLink(atPath: user, withDestinationPath: victim)
        #expect(done.wait(timeout: .now() + 60) == .success)
        #expect(!currentMounts().contains(victim + "/mnt"), "mounted over the directory the symlink named")
        let msg = result.get() ?? ""
        #expect(msg.contains("changed while the mount was prepared") || currentMounts().contains(f.dir.file("user.orig/mnt")), "\(msg)")
        for m in currentMounts() where m.hasPrefix(f.dir.path) { try? MountAPI.umount(m, detach: true) }
        for r in f.runtime.state.all() { try? f.runtime.umount(r.mountpoint) }
    }

    /// 3. A blob that changed on the server (new ETag, same size) discards the partial entry: no
    /// mount shows granules of both versions.
    @Test func aChangedBlobInvalidatesItsPartialEntry() throws {
        let f = try RemoteFixture("changed", mkfs: []) { try shapedTree($0, seed: 3) }
        defer { f.remove() }
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote))
        _ = TreeFactsLite.digest(f.mnt + "/bin/tool")
        try f.runtime.umount(f.mnt)
        #expect(Self.holdersOfLockedEntries(f.dir.file("cache")).isEmpty)
        // Version 2: same size, other bytes, a later mtime (nginx's ETag changes with it).
        try shapedTree(f.dir.file("v2"), seed: 4)
        try Samples.mkfs(f.dir.file("v2"), f.dir.file("v2.erofs"), [])
        try FileManager.default.removeItem(atPath: f.server.root + "/img.erofs")
        try FileManager.default.copyItem(atPath: f.dir.file("v2.erofs"), toPath: f.server.root + "/img.erofs")
        var times = [timeval(tv_sec: time(nil) + 100, tv_usec: 0), timeval(tv_sec: time(nil) + 100, tv_usec: 0)]
        utimes(f.server.root + "/img.erofs", &times)
        let expected = try f.oracle()
        var notes: [String] = []
        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote)) { notes.append($0) }
        defer { try? f.runtime.umount(f.mnt) }
        #expect(expected.entries["bin/tool"]?.hasSuffix(" " + TreeFactsLite.digest(f.mnt + "/bin/tool")) == true)
        #expect((notes + out.notes).contains { $0.contains("changed since it was cached") }, "\(notes + out.notes)")
    }

    /// Cache entries still locked after their mount went, each with whoever still has the data file
    /// open or a mount of it (any process's descriptors and mount namespace): what a failure needs.
    static func holdersOfLockedEntries(_ cacheDir: String) -> [String] {
        let files = (FileManager.default.subpaths(atPath: cacheDir) ?? []).map { cacheDir + "/" + $0 }
        let locked = files.filter { !($0.split(separator: "/").last ?? "").contains(".") && BlobCache.isLocked(entry: $0) }
        let procs = (try? FileManager.default.contentsOfDirectory(atPath: "/proc"))?.filter { Int($0) != nil } ?? []
        return locked.map { entry in
            let holders = procs.compactMap { pid -> String? in
                let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
                let open = fds.contains {
                    let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)")
                    return target == entry || target == entry + ".lock"
                }
                let mounted = (try? String(contentsOfFile: "/proc/\(pid)/mountinfo", encoding: .utf8))?.contains(entry) == true
                guard open || mounted else { return nil }
                let cmd = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8))?.replacingOccurrences(of: "\0", with: " ")
                return "\(pid)\(open ? " open" : "")\(mounted ? " mounted" : "") \(cmd?.prefix(80) ?? "")"
            }
            return "\(entry) locked; holders: \(holders.joined(separator: "; "))"
        }
    }

    /// 4. As root, a cache directory another user owns is refused; links planted in the cache are
    /// never followed (the files they name stay untouched).
    @Test func plantedLinksAndForeignCacheDirectories() throws {
        let f = try RemoteFixture("links")
        defer { f.remove() }
        // A cache directory owned by someone else: refused in one line, nothing created in it.
        let foreign = f.dir.file("foreign")
        try FileManager.default.createDirectory(atPath: foreign, withIntermediateDirectories: true)
        chown(foreign, 65534, 65534)
        let msg = remoteMessage { _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: RemoteOptions(cacheDir: foreign))) }
        #expect(msg?.contains("refusing cache directory") == true, "\(msg ?? "mounted")")
        #expect(!currentMounts().contains(f.mnt))
        // Links planted under every name an entry of this URL has had, pointing at a root-owned file.
        let victim = f.dir.file("victim")
        try "precious\n".write(toFile: victim, atomically: false, encoding: .utf8)
        let cache = BlobCache(directory: f.dir.file("cache"))
        try cache.ensureDirectories()
        let keys = [BlobCache.partialKey(source: f.url), sha256Hex(Array(f.url.utf8))]
        for key in keys {
            for suffix in ["", ".pop", ".json", ".lock", ".setup"] {
                try FileManager.default.createSymbolicLink(atPath: cache.paths(key: key).data + suffix, withDestinationPath: victim)
            }
        }
        _ = remoteMessage { _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote)) }
        try? f.runtime.umount(f.mnt)
        #expect(try String(contentsOfFile: victim, encoding: .utf8) == "precious\n", "a planted link was written through")
    }

    /// 4. The daemon client sends a request (which may carry credentials) only to a daemon of its own uid.
    @Test func theDaemonSocketMustBeRoots() throws {
        let dir = try ScratchDir("foreign-daemon")
        defer { dir.remove() }
        chown(dir.path, 65534, 65534)
        let sock = dir.file("daemon.sock"), got = dir.file("got")
        let script = """
            import socket, sys
            s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)
            open(sys.argv[2] + ".ready", "w").close()
            c, _ = s.accept(); c.settimeout(3)
            data = b""
            try:
                data = c.recv(65536)
            except Exception:
                pass
            open(sys.argv[2], "wb").write(data)
            """
        let pid = try Sys.spawnDetached("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script, sock, got],
                                        keep: [], logPath: dir.file("log"))
        defer { try? Sys.kill(pid, SIGKILL); _ = Sys.reap(pid) }
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: got + ".ready") { usleep(50_000) }
        let req = DaemonRequest(MountRequest(source: "https://127.0.0.1:1/x", mountpoint: "/tmp"), environment: [:])
        #expect(throws: RuntimeError.self) { _ = try DaemonClient.mount(req, socket: sock) }
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: got) { usleep(50_000) }
        #expect(((try? Data(contentsOf: URL(fileURLWithPath: got))) ?? Data()).isEmpty, "the request reached a daemon of uid 65534")
    }

    /// 5. After a digest mismatch the mount is detached: nothing more is served from it.
    @Test func aFailedVerificationDetachesTheMount() throws {
        let f = try RemoteFixture("mismatch")
        defer { f.remove() }
        var opts = f.remote
        opts.digest = String(repeating: "cd", count: 32)
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: opts))
        defer { try? f.runtime.umount(f.mnt) }
        let files = (FileManager.default.subpaths(atPath: f.mnt) ?? []).filter { Sys.isRegularFile(f.mnt + "/" + $0) }
        _ = TreeFactsLite(f.mnt)
        for _ in 0..<60 where currentMounts().contains(f.mnt) { usleep(100_000) }
        #expect(!currentMounts().contains(f.mnt), "the mount stays attached after its cache failed verification")
        #expect(files.allSatisfy { !FileManager.default.fileExists(atPath: f.mnt + "/" + $0) })
        // The worker writes its figures within moments of the check.
        var status = try f.runtime.status().first
        for _ in 0..<50 where status?.problems.contains(where: { $0.contains("failed verification") }) != true {
            usleep(100_000)
            status = try f.runtime.status().first
        }
        #expect(status?.problems.contains { $0.contains("failed verification") } == true, "\(status?.problems ?? [])")
    }

    /// 6. A 206 for another range than the one asked is never stored as the asked one: retried, and
    /// every byte read is right.
    @Test func aWrongContentRangeIsRetried() throws {
        try withProxiedMount("shifted", config: "{\"fault\":\"shiftrange\",\"shift\":4096,\"every\":3,\"after\":1,\"match\":\"/img.erofs\"}") { f, proxy, expected, _ in
            #expect(TreeFactsLite(f.mnt) == expected)
            #expect(proxy.log.contains { $0.hasPrefix("shiftrange") }, "the proxy shifted ranges")
        }
    }

    /// 8. A Content-Range total above Int64.max, and a HEAD that claims a terabyte for a server
    /// without Range support, end the mount with one line (no trap, no huge allocation).
    @Test func hostileSizesFailCleanly() throws {
        let f = try RemoteFixture("sizes")
        defer { f.remove() }
        let proxy = try FaultProxy(upstream: f.server.base)
        defer { proxy.remove() }
        let state = f.dir.file("cli-state")
        try proxy.set("{\"fault\":\"hugetotal\",\"match\":\"/img.erofs\"}")
        var r = try cliMount([proxy.base + "/img.erofs", f.mnt, "--cache-dir", f.dir.file("cache")], state: state)
        #expect(r.status == 3, "\(r.status): \(r.stderr)")
        try proxy.set("{\"fault\":\"norange\",\"length\":1099511627776,\"match\":\"/img.erofs\"}")
        r = try cliMount([proxy.base + "/img.erofs", f.mnt, "--cache-dir", f.dir.file("cache"), "--allow-full-download"], state: state)
        #expect(r.status == 3, "\(r.status): \(r.stderr)")
        #expect(r.stderr.contains("returned 2") && !r.stderr.contains("Fatal error"), Comment(rawValue: r.stderr))
        let left = (try? FileManager.default.contentsOfDirectory(atPath: f.dir.file("cache/blobs/sha256"))) ?? []
        #expect(left.allSatisfy { !$0.hasSuffix(".pop") && $0.count != 64 }, "a failed whole download leaves \(left)")
        #expect(!currentMounts().contains(f.mnt))
    }

    /// 8. A server trickling bytes fails the mount at its preparation deadline, and never holds the
    /// global state lock meanwhile (other mounts and umounts go on).
    @Test func aTricklingServerNeitherStallsNorBlocks() throws {
        let f = try RemoteFixture("trickle")
        defer { f.remove() }
        let proxy = try FaultProxy(upstream: f.server.base)
        defer { proxy.remove() }
        try proxy.set("{\"fault\":\"trickle\",\"seconds\":0.5,\"after\":1,\"match\":\"/img.erofs\"}")
        var tight = f.remote
        tight.prepareTimeout = 4
        let opts = tight
        let done = DispatchSemaphore(value: 0)
        let result = Locked<String?>(nil)
        DispatchQueue.global().async {
            defer { done.signal() }
            result.set(remoteMessage { _ = try f.runtime.mount(MountRequest(source: proxy.base + "/img.erofs", mountpoint: f.mnt, remote: opts)) })
        }
        usleep(1_500_000)
        // Meanwhile the state lock is free.
        let lock = try Sys.open(f.runtime.state.root + "/lock", O_RDWR | O_CREAT)
        defer { Sys.close(lock.rawValue) }
        var free = false
        do { try Sys.flock(lock.rawValue, exclusive: true, nonBlocking: true); free = true; Sys.unlock(lock.rawValue) } catch {}
        #expect(free, "the state lock is held across network I/O")
        let finished = done.wait(timeout: .now() + 90) == .success
        #expect(finished, "the mount never gave up on a trickling server")
        if !finished { proxy.stop(); _ = done.wait(timeout: .now() + 60) }
        let message = result.get() ?? "mounted"
        #expect(message.contains("deadline"), "\(message)")
        #expect(!currentMounts().contains(f.mnt))
    }

    /// 9. user:password in a URL never reaches the record, the cache info, `status` or a worker's argv.
    @Test func urlCredentialsAreNeverStoredOrShown() throws {
        let f = try RemoteFixture("userinfo")
        defer { f.remove() }
        let secret = "s3cr3t-\(UInt32.random(in: 0...UInt32.max))"
        let url = f.server.base.replacingOccurrences(of: "http://", with: "http://alice:\(secret)@") + "/img.erofs"
        // With a tree beside it (its URL derived from the source's) the worker is told where it is too.
        let tree = try run(cliBinary, ["image", "verity", f.server.root + "/img.erofs", "--tree", f.server.root + "/img.erofs.verity"])
        var remote = f.remote
        remote.verity = VeritySource(digest: String(tree.stdout.dropFirst(7).prefix(64)), treeURL: "")
        let out = try f.runtime.mount(MountRequest(source: url, mountpoint: f.mnt, remote: remote))
        defer { try? f.runtime.umount(f.mnt) }
        let rec = try #require(out.record)
        #expect(!rec.source.contains(secret) && rec.source == f.url)
        let stored = (try? String(contentsOfFile: f.runtime.state.path(for: f.mnt), encoding: .utf8)) ?? ""
        let info = (try? String(contentsOfFile: (rec.cachePath ?? "") + ".json", encoding: .utf8)) ?? ""
        #expect(!stored.isEmpty && !stored.contains(secret) && !info.contains(secret))
        let pid = try #require(rec.workerPID)
        let argv = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? ""
        #expect(!argv.isEmpty && !argv.contains(secret))
        #expect(!"\(try f.runtime.status())".contains(secret))
    }

    /// 10. A Bearer realm on plain http elsewhere than this host never receives the credentials.
    @Test func credentialsGoToARealmOnlyOverHTTPSOrLoopback() throws {
        #expect(RegistryAuth.mayCarryCredentials("https://auth.example/token"))
        #expect(RegistryAuth.mayCarryCredentials("http://127.0.0.1:5000/token") && RegistryAuth.mayCarryCredentials("http://[::1]/t"))
        #expect(!RegistryAuth.mayCarryCredentials("http://auth.example/token"))
        #expect(!RegistryAuth.mayCarryCredentials("http://127.0.0.1.evil.example/token"))
        // A realm that is this host, spelled so it does not look like it: treated as elsewhere.
        let f = try OCIFixture("realm")
        defer { f.remove() }
        let image = try f.image("realm", budget: 256 << 10)
        _ = try f.registry.pushImage("test/realm", reference: "v1", layers: [image])
        let proxy = try FaultProxy(upstream: "http://" + f.registry.host)
        defer { proxy.remove() }
        try proxy.set("{\"bearer\":{\"user\":\"alice\",\"password\":\"pw\"},\"realm\":\"http://[::ffff:127.0.0.1]:\(proxy.port)/token\"}")
        var oci = OCIOptions(environment: [:])
        oci.username = "alice"
        oci.password = "pw"
        let msg = remoteMessage { _ = try f.mount("oci://\(proxy.host)/test/realm:v1", at: f.mnt, oci: oci) }
        #expect(msg?.contains("credentials are sent only over https or to this host") == true, "\(msg ?? "mounted")")
        #expect(!proxy.log.contains { $0.hasPrefix("token ") }, "the realm got the credentials")
    }

    /// 13. `cache prune` recognises an entry in use however the cache directory is spelled.
    @Test func pruneMatchesEntriesByIdentity() throws {
        let f = try RemoteFixture("prune-spelling")
        defer { f.remove() }
        // Downloaded whole and mounted file-backed: no worker holds the entry's lock.
        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: .file, remote: f.remote))
        defer { try? f.runtime.umount(f.mnt) }
        #expect(out.record?.workerPID == nil)
        let spelled = f.dir.path + "/./cache/"
        let removed = try CacheManager(directory: spelled, runtime: f.runtime).prune(maxSize: nil)
        #expect(removed.isEmpty, "pruned \(removed.map(\.key)) while mounted")
        #expect(TreeFactsLite(f.mnt) == (try f.oracle()))
    }

    /// 15. Remote images in the newest formats (48bit with lzma, metadata compressed in a metabox)
    /// mount lazily, every byte as the kernel shows it; a whole download is 100 % present.
    @Test(arguments: ["48bit-lzma", "metabox-lz4hc"])
    func newestFormatsMountLazily(name: String) throws {
        let f = try RemoteFixture("whole-\(name)") { try FileManager.default.createDirectory(atPath: $0, withIntermediateDirectories: true) }
        defer { f.remove() }
        try FileManager.default.removeItem(atPath: f.server.root + "/img.erofs")
        try FileManager.default.copyItem(atPath: TestEnv.repoRoot + "/Tests/Fixtures/mkfs-erofs-1.9.3/\(name).erofs", toPath: f.server.root + "/img.erofs")
        let expected = try f.oracle()
        let out = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote))
        #expect(out.record?.backend == "fanotify", "\(String(describing: out.record))")
        #expect(TreeFactsLite(f.mnt) == expected)
        try f.runtime.umount(f.mnt)
        // Downloaded whole (file-backed), the entry is complete in `cache ls`.
        let whole = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, backend: .file, remote: f.remote))
        defer { try? f.runtime.umount(f.mnt) }
        #expect(whole.record?.backend == "file")
        #expect(TreeFactsLite(f.mnt) == expected)
        let entries = CacheManager(directory: f.dir.file("cache"), runtime: f.runtime).entries()
        #expect(entries.first?.presentPercent == 100, "a whole download is 100 % present")
    }

    /// 14. A lazy mount's worker files (figures, journal, log) go with its `umount`.
    @Test func workerFilesGoWithTheMount() throws {
        let f = try RemoteFixture("worker-files")
        defer { f.remove() }
        _ = try f.runtime.mount(MountRequest(source: f.url, mountpoint: f.mnt, remote: f.remote))
        _ = TreeFactsLite(f.mnt)
        let workers = f.runtime.state.root + "/workers"
        #expect(!((try? FileManager.default.contentsOfDirectory(atPath: workers)) ?? []).isEmpty)
        try f.runtime.umount(f.mnt)
        let left = (try? FileManager.default.contentsOfDirectory(atPath: workers)) ?? []
        #expect(left.isEmpty, "left in \(workers): \(left)")
    }
}
