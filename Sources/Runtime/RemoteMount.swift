#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto
import EROFS
import Glibc
import Probe
import Remote
import Syscall
import SystemPackage

/// Options for http(s) and OCI sources.
public struct RemoteOptions: Sendable, Codable {
    public var cacheDir: String
    public var allowFullDownload: Bool
    /// Expected sha256 of the whole blob (hex), checked when the cache is complete.
    public var digest: String?
    public var oci: OCIOptions
    /// Background fetching by the lazy worker.
    public var prefetch: Prefetch
    /// Record the ranges readers ask for into this file (a profile for a later --prefetch).
    public var recordProfile: String?

    public init(cacheDir: String = BlobCache.defaultDirectory, allowFullDownload: Bool = false, digest: String? = nil,
                oci: OCIOptions = OCIOptions(), prefetch: Prefetch = .none, recordProfile: String? = nil) {
        self.prefetch = prefetch
        self.recordProfile = recordProfile
        self.cacheDir = cacheDir
        self.allowFullDownload = allowFullDownload
        self.digest = digest
        self.oci = oci
    }
}

/// How an `oci://` reference becomes one blob, and how to authenticate.
public struct OCIOptions: Sendable, Codable {
    /// Index into the manifest's layers (default: the only layer, or the only EROFS layer).
    public var layer: Int?
    /// A blob digest ("sha256:…"), skipping the manifest.
    public var blob: String?
    /// "OS/ARCH[/VARIANT]" (default: this host).
    public var platform: String?
    public var authFile: String?
    public var username: String?
    /// From --password-stdin; kept in memory only.
    public var password: String?
    /// Allow plain http for a registry outside 127.0.0.0/8.
    public var insecure: Bool
    /// Where credential files are looked up ($REGISTRY_AUTH_FILE, $DOCKER_CONFIG, $HOME); nil: this
    /// process's environment, read only when credentials are needed.
    public var environment: [String: String]?

    public init(layer: Int? = nil, blob: String? = nil, platform: String? = nil, authFile: String? = nil, username: String? = nil,
                password: String? = nil, insecure: Bool = false, environment: [String: String]? = nil) {
        self.layer = layer
        self.blob = blob
        self.platform = platform
        self.authFile = authFile
        self.username = username
        self.password = password
        self.insecure = insecure
        self.environment = environment
    }
}

extension Runtime {
    /// Mounts an http(s) image: lazily through a fanotify worker when the planner allows it, else
    /// after downloading it whole into the cache.
    func mountRemote(_ req: MountRequest, override: [Finding], note: (String) -> Void) throws -> MountOutcome {
        let mountpoint = try canonicalMountpoint(req.mountpoint)
        if let d = req.remote.digest, d.count != 64 || !d.allSatisfy(\.isHexDigit) {
            throw RuntimeError.badOptionValue("--digest", detail: "expected sha256:<64 hex digits>")
        }
        var req = req
        if case .profile(let path) = req.remote.prefetch {
            _ = try PrefetchProfile.load(path)
            req.remote.prefetch = .profile(try Sys.realpath(path))
        }
        if let path = req.remote.recordProfile {
            let dir = path.lastIndex(of: "/").map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
            guard Sys.isDirectory(dir) else {
                throw RuntimeError.badOptionValue("--record-profile \(path)", detail: "its directory does not exist")
            }
            let name = path.split(separator: "/").last.map(String.init) ?? path
            req.remote.recordProfile = (try Sys.realpath(dir)) + "/" + name
        }
        guard Sys.hasCapSysAdmin() else { throw RuntimeError.notPrivileged("mounting") }
        let cache = BlobCache(directory: req.remote.cacheDir)
        do { try cache.ensureDirectories() } catch { throw RuntimeError.state("\(error)") }
        var notes: [String] = []
        let blob: HTTPBlob
        var expectedSize: UInt64?
        do {
            if OCIReference.isOCI(req.source) {
                let resolved = try resolveOCI(req)
                if let d = req.remote.digest, "sha256:" + d.lowercased() != resolved.digest {
                    throw RuntimeError.badOptionValue("--digest", detail: "the reference resolves to \(resolved.digest), not sha256:\(d)")
                }
                req.remote.digest = String(resolved.digest.dropFirst(7))
                blob = resolved.blob
                expectedSize = resolved.size
                notes.append(resolved.summary)
            } else {
                blob = try HTTPBlob(url: req.source)
            }
            // In the daemon the cache file is written in this process: the probe fetches the
            // superblock area too (one round trip less before the mount).
            try blob.open(allowFullDownload: req.remote.allowFullDownload, head: serving != nil ? 256 << 10 : 1)
            if let expectedSize, blob.size != expectedSize {
                throw RemoteError.blobChanged(url: blob.url, detail: "\(blob.size) bytes, but the manifest says \(expectedSize)")
            }
        } catch let e as RemoteError {
            throw RuntimeError.remote(e.description)
        }
        let planned = MountPlanning.planRemote(cacheDir: cache.blobsDir, implemented: Self.implemented, override: override,
                                               cacheFile: Sys.hasCapSysAdmin() ? state.hostCache : nil)
        let plan = planned.plan
        if req.dryRun { return MountOutcome(plan: plan, record: nil, notes: notes) }
        let key = req.remote.digest?.lowercased() ?? SHA256.hash(data: Array(req.source.utf8)).map { String(hexByte: $0) }.joined()
        let paths = cache.paths(key: key)
        let info = CacheInfo(url: blob.url, size: blob.size, etag: blob.etag, lastModified: blob.lastModified, digest: req.remote.digest?.lowercased())
        // Descriptive (for `cache ls`), so written without fsync.
        if let data = try? JSONEncoder().encode(info), let fd = try? Sys.open(paths.info, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o600) {
            _ = try? FileDescriptor(rawValue: fd.rawValue).writeAll(data)
            Sys.close(fd.rawValue)
        }
        return try state.withLock {
            if try isMountRoot(mountpoint) {
                if let rec = state.load(mountpoint), rec.source == req.source { throw RuntimeError.alreadyMounted(mountpoint, source: req.source) }
                let existing = MountInfo.mount(at: mountpoint, in: MountInfo.current())
                throw RuntimeError.mountpointBusy(mountpoint, by: existing.map { "\($0.fsType) from \($0.source)" } ?? "mounted")
            }
            var candidates = try choose(plan, requested: req.backend)
            if blob.wholeOnly { candidates.removeAll { $0 == .fanotify } }
            guard let backend = candidates.first else {
                throw RuntimeError.noBackend("the server does not support Range requests, which lazy mounting needs")
            }
            if backend != plan.candidates.first(where: { $0.verdict == .viable })?.backend, req.backend == nil {
                note("using \(backend.rawValue): the server answers without Range support")
            }
            var record = MountRecord(source: req.source, sourceKind: OCIReference.isOCI(req.source) ? "oci" : "http", backend: backend.rawValue, mountpoint: mountpoint,
                                     options: req.options.summary, device: nil, workerPID: nil, since: Date().timeIntervalSince1970,
                                     sourceIdentity: blob.etag ?? blob.lastModified ?? "", mountID: nil,
                                     cachePath: paths.data, statsPath: nil)
            if backend == .fanotify {
                // A blob already served by a live worker: its mark covers every mount of the cache
                // file, so this mount shares it (a second group on the same file could deadlock).
                if let shared = state.all().first(where: { $0.cachePath == paths.data && $0.workerPID.map(Sys.processExists) == true }) {
                    do {
                        try attachEROFS(source: paths.data, at: mountpoint, options: req.options, passOffset: true)
                    } catch {
                        throw RuntimeError.mountFailed(backend: "fanotify", detail: "\((error as? BackendFailure)?.detail ?? "\(error)")")
                    }
                    record.workerPID = shared.workerPID
                    record.statsPath = shared.statsPath
                    record.servedBy = shared.servedBy
                    record.mountID = try? Sys.mountIdentity(mountpoint).id
                    try state.save(record)
                    return MountOutcome(plan: plan, record: record, notes: notes + ["sharing the worker of \(shared.mountpoint)"])
                }
                let stats = state.root + "/workers/" + StateStore.key(for: mountpoint)
                try? Sys.mkdir(state.root + "/workers", mode: 0o700)
                let pid: Int32
                if let serving {
                    do {
                        try serving.prepare(blob: blob, paths: paths, mountpoint: mountpoint, statsPath: stats, digest: req.remote.digest,
                                            prefetch: req.remote.prefetch, recordProfile: req.remote.recordProfile)
                    } catch let e as RemoteError {
                        throw RuntimeError.remote(e.description)
                    }
                    pid = Sys.processID
                    record.servedBy = MountRecord.daemon
                } else {
                    pid = try startWorker(req, blob: blob, paths: paths, mountpoint: mountpoint, statsPath: stats)
                }
                do {
                    try attachEROFS(source: paths.data, at: mountpoint, options: req.options, passOffset: true)
                } catch {
                    if let serving { serving.abandon(mountpoint) } else {
                        try? Sys.kill(pid, SIGKILL)
                        _ = Sys.reap(pid)
                    }
                    throw RuntimeError.mountFailed(backend: "fanotify", detail: "\((error as? BackendFailure)?.detail ?? "\(error)")")
                }
                record.workerPID = pid
                record.statsPath = stats
            } else {
                // Whole download, verified, then a local mount of the cache file.
                let blockSize: Int
                do {
                    let entryLock = try BlobCache.lockForWriting(entry: paths.data)
                    defer { Sys.close(entryLock.rawValue) }
                    let lazy = try LazyBlob(blob: blob, dataPath: paths.data, recordPath: paths.record)
                    if blob.wholeOnly {
                        try blob.readAll(into: lazy.writerFD)
                    } else {
                        try lazy.ensure(offset: 0, length: blob.size)
                        try lazy.commit()
                    }
                    if let d = req.remote.digest { try lazy.verify(sha256: d) }
                    blockSize = try Superblock(parsing: Sys.preadFully(lazy.writerFD, count: 128, at: Int64(Superblock.offset)),
                                               verifyChecksum: false).blockSize
                } catch let e as RemoteError {
                    if case .digestMismatch = e { try? Sys.unlink(paths.data); try? Sys.unlink(paths.record) }
                    throw RuntimeError.remote(e.description)
                }
                guard let impl = Backends.all[backend] else { throw RuntimeError.noBackend("\(backend.rawValue) is not available") }
                do {
                    let a = try impl.attach(PreparedMount(source: paths.data, mountpoint: mountpoint, options: req.options, blockSize: blockSize))
                    record.device = a.device
                } catch let f as BackendFailure {
                    throw RuntimeError.mountFailed(backend: backend.rawValue, detail: f.detail)
                }
            }
            record.mountID = try? Sys.mountIdentity(mountpoint).id
            do { try state.save(record) } catch {
                try? MountAPI.umount(mountpoint)
                if record.servedByDaemon { serving?.abandon(mountpoint) } else { stopWorker(record) }
                throw error
            }
            if record.servedByDaemon { serving?.serve(mountpoint) }
            return MountOutcome(plan: plan, record: record, notes: notes)
        }
    }

    /// An `oci://` reference resolved to its blob (with the registry's authentication attached).
    func resolveOCI(_ req: MountRequest) throws -> (blob: HTTPBlob, digest: String, size: UInt64?, summary: String) {
        let o = req.remote.oci
        let ref = try OCIReference(parsing: req.source)
        let platform = try o.platform.map(OCIPlatform.init(parsing:)) ?? OCIPlatform.host(machine: Sys.uname().machine)
        var credentials: RegistryCredentials?
        if let u = o.username {
            credentials = RegistryCredentials(username: u, password: o.password ?? "", origin: "--username")
        } else {
            credentials = try RegistryCredentials.lookup(registry: ref.registry, authFile: o.authFile, environment: o.environment ?? ProcessInfo.processInfo.environment)
        }
        let client = RegistryClient(ref: ref, credentials: credentials, insecure: o.insecure)
        let resolved = try client.resolve(platform: platform, layer: o.layer, blob: o.blob)
        let blob = try HTTPBlob(url: resolved.url, auth: client.auth)
        var what = "\(ref): blob \(resolved.digest)"
        if let i = resolved.layerIndex { what += ", layer \(i)" }
        if let p = resolved.platform { what += ", platform \(p)" }
        if let m = resolved.manifestDigest { what += ", manifest \(m)" }
        return (blob, resolved.digest, resolved.size, what)
    }

    /// Spawns the worker and waits until it has marked the cache and fetched all metadata.
    func startWorker(_ req: MountRequest, blob: HTTPBlob, paths: (data: String, record: String, info: String, lock: String),
                     mountpoint: String, statsPath: String) throws -> Int32 {
        let (url, auth) = (blob.url, blob.auth)
        let (r, w) = try Sys.pipe()
        defer { Sys.close(r) }
        var keep = [w]
        var secretFD: Int32?
        defer { secretFD.map(Sys.close) }
        var args = ["__serve", "--url", url, "--data", paths.data, "--record", paths.record, "--mountpoint", mountpoint,
                    "--stats", statsPath, "--ready-fd", String(w)]
        if let d = req.remote.digest { args += ["--digest", d] }
        args += LazyWorker.prefetchArguments(req.remote.prefetch, recordProfile: req.remote.recordProfile)
        // What this process just learned from the server (it also checked the cache against it).
        args += LazyWorker.knownArguments(blob)
        do {
            let handOff = try LazyWorker.authHandOff(auth)
            secretFD = handOff.fd
            keep += handOff.fd.map { [$0] } ?? []
            args += handOff.args
        } catch {
            Sys.close(w)
            throw RuntimeError.mountFailed(backend: "fanotify", detail: "cannot pass credentials to the worker: \(error)")
        }
        let log = state.root + "/workers/" + StateStore.sibling(of: StateStore.key(for: mountpoint), ".log")
        let pid: Int32
        do {
            pid = try Sys.spawnDetached(Runtime.workerExecutable, args, keep: keep, logPath: log)
        } catch {
            Sys.close(w)
            throw RuntimeError.mountFailed(backend: "fanotify", detail: "cannot start the worker: \(error)")
        }
        Sys.close(w)
        var line = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 512)
        while !line.contains(0x0A) {
            guard (try? Sys.poll(r, timeoutMs: 300_000)) == true else { break }
            let n = (try? buf.withUnsafeMutableBytes { try Sys.read(r, into: $0) }) ?? 0
            if n <= 0 { break }
            line += buf[0..<n]
        }
        let text = String(decoding: line, as: UTF8.self).trimmed
        guard text == "ready" else {
            try? Sys.kill(pid, SIGKILL)
            _ = Sys.reap(pid)
            throw RuntimeError.remote(text.hasPrefix("error: ") ? String(text.dropFirst(7)) : "the worker exited before it was ready (log: \(log))")
        }
        return pid
    }

    /// The binary to run as worker: this executable, unless overridden (tests run in-process).
    nonisolated(unsafe) public static var workerExecutable = Sys.executablePath()
}
