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
    /// Seconds a mount's preparation (manifest, probe, metadata) may take before it fails.
    public var prepareTimeout: Double = 120
    /// Check every block against this fs-verity tree before it is served (http(s) sources; an OCI
    /// layer names its own in its annotations).
    public var verity: VeritySource?
    /// Refuse a source without an fs-verity digest (`--require-verity`).
    public var requireVerity: Bool?

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
    /// after downloading it whole into the cache. The global state lock is held only for the
    /// attach and the record, never across network I/O; mounts of one cache entry are serialised by
    /// the entry's setup lock instead.
    func mountRemote(_ req: MountRequest, override: [Finding], note: (String) -> Void) throws -> MountOutcome {
        let target = try MountTarget(req.mountpoint)
        var req = try validatedRemote(req)
        req.source = URLUserinfo.strip(req.source)
        try checkNotMounted(target, source: req.source)
        guard Sys.hasCapSysAdmin() else { throw RuntimeError.notPrivileged("mounting") }
        try state.ensureDirectories()
        let cache = BlobCache(directory: req.remote.cacheDir)
        // An unsafe cache directory is refused before any network I/O; a missing one is created
        // only once the source answered (a bad source leaves nothing behind).
        do { try cache.checkDirectories() } catch { throw RuntimeError.state("\(error)") }
        var notes: [String] = []
        let blob = try openRemoteBlob(&req, notes: &notes)
        defer { blob.setDeadline(seconds: nil) }
        let planned = MountPlanning.planRemote(cacheDir: cache.blobsDir, implemented: Self.implemented, override: override,
                                               cacheFile: Sys.hasCapSysAdmin() ? state.hostCache : nil)
        let plan = planned.plan
        if req.dryRun { return MountOutcome(plan: plan, record: nil, notes: notes) }
        do { try cache.ensureDirectories() } catch { throw RuntimeError.state("\(error)") }
        req.options = req.options.forRemoteImage
        let digest = req.remote.digest?.lowercased()
        // A complete blob verified against this digest, from whichever source filled it.
        if let digest, let verified = cache.verifiedEntry(digest: digest, size: blob.size) {
            return try mountVerified(req, blob: blob, paths: verified, plan: plan, target: target, notes: notes + ["cached and verified"])
        }
        let paths = cache.paths(key: BlobCache.partialKey(source: blob.url, verity: req.remote.verity?.digest))
        let setup = try BlobCache.lockForSetup(entry: paths.data)
        var setupReleased = false
        defer { if !setupReleased { Sys.close(setup.rawValue) } }
        if let changed = try cache.reconcile(paths: paths, with: blob, digest: digest, verity: req.remote.verity?.digest) {
            notes.append(changed)
            note(changed)
        }
        var candidates = try choose(plan, requested: req.backend, allowed: req.allowed)
        if blob.wholeOnly {
            // Nothing lazy is possible: the blob is downloaded whole, then mounted by the kernel
            // where it can (a FUSE backend only where it is all that is left, or named).
            candidates.removeAll { $0 == .fanotify }
            let kernel = candidates.filter { $0 != .fuseBlob && $0 != .fuseErofs && $0 != .nbd }
            if !kernel.isEmpty, req.backend == nil { candidates = kernel }
        }
        guard let backend = candidates.first else {
            throw RuntimeError.noBackend("the server does not support Range requests, which lazy mounting needs")
        }
        if backend != plan.candidates.first(where: { $0.verdict == .viable })?.backend, req.backend == nil, blob.wholeOnly {
            note("using \(backend.rawValue): the server answers without Range support")
        }
        if req.backend == nil, req.allowed == nil, digest == nil, [.fuseBlob, .nbd].contains(backend),
           Self.isComplete(paths.data, size: blob.size) {
            // Nothing is left to fetch and there is no digest to check: the entry is a local image (as
            // a verified one is), which the kernel reads without a server in between — a FUSE file,
            // a loop device over it and a second page cache cost a warm read 1.2-1.6x a local mount.
            return try mountVerified(req, blob: blob, paths: paths, plan: plan, target: target,
                                     notes: notes + ["cached and complete"])
        }
        var record = MountRecord(source: req.source, sourceKind: OCIReference.isOCI(req.source) ? "oci" : "http", backend: backend.rawValue,
                                 mountpoint: target.path, options: req.options.summary, device: nil, workerPID: nil,
                                 since: Date().timeIntervalSince1970, sourceIdentity: blob.etag ?? blob.lastModified ?? "",
                                 mountID: nil, cachePath: paths.data, statsPath: nil)
        if backend == .fanotify {
            return try mountLazy(req, blob: blob, paths: paths, record: record, plan: plan, target: target, notes: notes)
        }
        if backend == .fuseBlob || backend == .fuseErofs || backend == .nbd {
            Sys.close(setup.rawValue)
            setupReleased = true
            // The server takes the blob as resolved here (no second manifest fetch or size probe);
            // one without Range support it fetches whole itself.
            let resolved = blob.wholeOnly ? nil
                : (BlobSpec(blob, entry: paths.data, remote: req.remote), blob.auth?.secret())
            return try mountServed(req, backend: backend, record: record, plan: plan, target: target, notes: notes,
                                   resolved: resolved, fetcher: blob.wholeOnly ? nil : blob)
        }
        let blockSize = try download(req, blob: blob, paths: paths, digest: digest)
        guard let impl = Backends.all[backend] else { throw RuntimeError.noBackend("\(backend.rawValue) is not available") }
        if let note = BlobCache.handToKernel(entry: paths.data) { notes.append(note) }
        try attachCacheFile(impl, paths.data, blockSize: blockSize, req, target: target, record: &record)
        return MountOutcome(plan: plan, record: record, notes: notes)
    }

    /// A remote image served by a FUSE backend from the lazy reader: the server opens the blob's
    /// cache entry itself (this process has released it), so the mount is as lazy as the reads.
    func mountServed(_ req: MountRequest, backend: Backend, record: MountRecord, plan: Plan, target: MountTarget,
                     notes: [String], resolved: (BlobSpec, [UInt8]?)? = nil, fetcher: HTTPBlob? = nil) throws -> MountOutcome {
        guard let impl = Backends.all[backend] else { throw RuntimeError.noBackend("\(backend.rawValue) is not available") }
        var record = record
        record.cachePath = nil
        var prepared = PreparedMount(source: req.source, target: target, options: req.options, blockSize: 4096,
                                     stateRoot: state.root, remote: req.remote, host: serving)
        (prepared.blob, prepared.credentials) = (resolved?.0, resolved?.1 ?? nil)
        prepared.fetcher = serving == nil ? nil : fetcher
        try state.withLock {
            try checkNotMounted(target, source: req.source)
            let attachment: Attachment
            do {
                attachment = try attachRecorded(&record) { try impl.attach(prepared) }
            } catch let f as BackendFailure {
                throw RuntimeError.mountFailed(backend: backend.rawValue, detail: f.detail)
            }
            record.apply(attachment)
            do { try state.save(record) } catch {
                try? MountAPI.umount(target.path)
                impl.release(record)
                state.remove(target.path)
                throw error
            }
        }
        return MountOutcome(plan: plan, record: record, notes: notes)
    }

    /// Checks the remote options and makes their paths absolute.
    func validatedRemote(_ req: MountRequest) throws -> MountRequest {
        var req = req
        req.originalSource = req.source
        if let d = req.remote.digest, d.count != 64 || !d.allSatisfy(\.isHexDigit) {
            throw RuntimeError.badOptionValue("--digest", detail: "expected sha256:<64 hex digits>")
        }
        req.remote.cacheDir = BlobCache.canonicalDirectory(req.remote.cacheDir)
        if var v = req.remote.verity, v.origin == nil {
            guard !OCIReference.isOCI(req.source) else {
                throw RuntimeError.badOptionValue("--verity", detail: "applies to http(s) sources (an OCI image names its tree in its manifest)")
            }
            guard v.digest.count == 64, v.digest.allSatisfy(\.isHexDigit) else {
                throw RuntimeError.badOptionValue("--verity", detail: "expected sha256:<64 hex digits>")
            }
            // Credentials in either URL are the source's: never carried in the tree's (it reaches argv).
            v.treeURL = URLUserinfo.strip(v.treeURL.isEmpty ? req.source + ".verity" : v.treeURL)
            req.remote.verity = v
        }
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
        return req
    }

    /// The blob behind an http(s) URL or an OCI reference, opened (size, validators, Range support)
    /// within the preparation deadline, which stays set until the caller clears it.
    func openRemoteBlob(_ req: inout MountRequest, notes: inout [String]) throws -> HTTPBlob {
        let blob: HTTPBlob
        var expectedSize: UInt64?
        do {
            if OCIReference.isOCI(req.source) {
                let resolved = try resolveOCI(req)
                if let d = req.remote.digest, "sha256:" + d.lowercased() != resolved.digest {
                    throw RuntimeError.badOptionValue("--digest", detail: "the reference resolves to \(resolved.digest), not sha256:\(d)")
                }
                req.remote.digest = String(resolved.digest.dropFirst(7))
                if let v = resolved.verity {
                    req.remote.verity = v
                    notes.append("every block checked against fs-verity digest sha256:\(v.digest) (\(v.origin ?? "given"))")
                }
                blob = resolved.blob
                expectedSize = resolved.size
                notes.append(resolved.summary)
            } else {
                blob = try HTTPBlob(url: req.originalSource ?? req.source)
            }
            if req.remote.requireVerity == true, req.remote.verity == nil {
                throw RuntimeError.remote("\(req.source) names no fs-verity digest (--require-verity): push the image with "
                                          + "'erofs-compat push', pass --verity for an http(s) source, or drop --require-verity")
            }
            blob.setDeadline(seconds: req.remote.prepareTimeout)
            // In the daemon the cache file is written in this process: the probe fetches the
            // superblock area too (one round trip less before the mount).
            try blob.open(allowFullDownload: req.remote.allowFullDownload, head: serving != nil ? 256 << 10 : 1)
            if let expectedSize, blob.size != expectedSize {
                throw RemoteError.blobChanged(url: blob.url, detail: "\(blob.size) bytes, but the manifest says \(expectedSize)")
            }
        } catch let e as RemoteError {
            throw RuntimeError.remote(e.description)
        }
        return blob
    }

    /// Saves the record of a mount just attached; on failure undoes the mount (never a mount
    /// without its record).
    func saveOrUndo(_ record: MountRecord) throws {
        do { try state.save(record) } catch {
            try? MountAPI.umount(record.mountpoint)
            if record.servedByDaemon { serving?.abandon(record.mountpoint) } else { stopWorker(record) }
            state.remove(record.mountpoint)
            throw error
        }
    }

    /// A complete cache entry, verified against its digest or with none to check: mounted straight
    /// from the cache file (no worker, no mark).
    func mountVerified(_ req: MountRequest, blob: HTTPBlob, paths: (data: String, record: String, info: String, lock: String),
                       plan: Plan, target: MountTarget, notes: [String]) throws -> MountOutcome {
        // The complete cache file is a local image now: the kernel mounts it where it can.
        let viable = plan.candidates.filter { $0.backend != .fanotify && $0.verdict != .rejected }.map(\.backend)
        let local = viable.filter { $0 == .file || $0 == .loop } + viable.filter { $0 != .file && $0 != .loop }
        guard let backend = req.backend.map({ local.contains($0) ? $0 : .fanotify }) ?? local.first, backend != .fanotify,
              let impl = Backends.all[backend] else {
            throw RuntimeError.noBackend("the cached blob is complete; mount it with --backend file or loop")
        }
        let blockSize: Int
        do {
            let fd = try Sys.openNoSymlinks(paths.data, O_RDONLY)
            defer { Sys.close(fd.rawValue) }
            let head = try Sys.preadFully(fd.rawValue, count: 4096 - Int(Superblock.offset), at: Int64(Superblock.offset))
            blockSize = try Superblock(parsing: head,
                                       verifyChecksum: false).blockSize
        } catch {
            throw RuntimeError.state("cache entry \(paths.data): \(error)")
        }
        var record = MountRecord(source: req.source, sourceKind: OCIReference.isOCI(req.source) ? "oci" : "http", backend: backend.rawValue,
                                 mountpoint: target.path, options: req.options.summary, device: nil, workerPID: nil,
                                 since: Date().timeIntervalSince1970, sourceIdentity: blob.etag ?? blob.lastModified ?? "",
                                 mountID: nil, cachePath: paths.data, statsPath: nil)
        var notes = notes
        if let note = BlobCache.handToKernel(entry: paths.data) { notes.append(note) }
        try attachCacheFile(impl, paths.data, blockSize: blockSize, req, target: target, record: &record)
        return MountOutcome(plan: plan, record: record, notes: notes)
    }

    /// True when the entry holds every byte of a blob of `size` (its record says so, the file is whole).
    static func isComplete(_ data: String, size: UInt64) -> Bool {
        guard PopulationRecord.presentFraction(path: data + ".pop") == 1,
              let st = try? Sys.lstat(data) else { return false }
        return st.st_mode & S_IFMT == S_IFREG && UInt64(st.st_size) == size
    }

    /// Mounts a complete cache file with a local backend and records it (under the state lock).
    func attachCacheFile(_ impl: any MountBackend, _ data: String, blockSize: Int, _ req: MountRequest, target: MountTarget,
                         record: inout MountRecord) throws {
        try state.withLock {
            try checkNotMounted(target, source: req.source)
            do {
                let a = try attachRecorded(&record) {
                    try impl.attach(PreparedMount(source: data, target: target, options: req.options, blockSize: blockSize,
                                                  stateRoot: state.root))
                }
                record.apply(a)
            } catch let f as BackendFailure {
                throw RuntimeError.mountFailed(backend: impl.kind.rawValue, detail: f.detail)
            }
            try saveOrUndo(record)
        }
    }

    /// Downloads the whole blob into the cache file (streamed, bounded by the size learned first),
    /// verifies it, links it under its digest; returns the image's block size.
    func download(_ req: MountRequest, blob: HTTPBlob, paths: (data: String, record: String, info: String, lock: String),
                  digest: String?) throws -> Int {
        do {
            let entryLock = try BlobCache.lockForWriting(entry: paths.data)
            defer { Sys.close(entryLock.rawValue) }
            blob.setDeadline(seconds: nil)
            let verifier = try req.remote.verity?.verifier(for: blob, cacheFile: paths.data + ".verity")
            let lazy = try LazyBlob(blob: blob, dataPath: paths.data, recordPath: paths.record, verifier: verifier)
            if blob.wholeOnly {
                try blob.readAll(into: lazy.writerFD)
                if let verity = req.remote.verity { try Self.checkWhole(lazy, against: verity) }
            } else {
                try lazy.ensure(offset: 0, length: blob.size)
            }
            if let digest {
                try lazy.verify(sha256: digest)
                try lazy.markAllPresent()
                BlobCache.promote(entry: paths.data, digest: digest)
            } else {
                try lazy.markAllPresent()
            }
            let head = try Sys.preadFully(lazy.writerFD, count: 4096 - Int(Superblock.offset), at: Int64(Superblock.offset))
            return try Superblock(parsing: head,
                                  verifyChecksum: false).blockSize
        } catch let e as RemoteError {
            // A whole download cannot be resumed, and a mismatch must not be kept: nothing is left.
            if case .digestMismatch = e { BlobCache.discard(entry: paths.data) }
            if blob.wholeOnly { BlobCache.discard(entry: paths.data) }
            throw RuntimeError.remote(e.description)
        }
    }

    /// A whole download against its fs-verity digest (a server without Range support: no per-block checks).
    static func checkWhole(_ lazy: LazyBlob, against verity: VeritySource) throws {
        let tree = try FsVerityTree(size: lazy.size) { try Sys.preadFully(lazy.writerFD, count: $1, at: Int64($0)) }
        let hex = tree.digest.map { String(hexByte: $0) }.joined()
        guard hex == verity.digest else { throw RemoteError.digestMismatch(expected: verity.digest, actual: hex) }
    }

    /// A client of the reference's repository with the credentials the options name (--username,
    /// else the credential files).
    func registryClient(_ ref: OCIReference, _ o: OCIOptions) throws -> RegistryClient {
        let credentials: RegistryCredentials?
        if let u = o.username {
            credentials = RegistryCredentials(username: u, password: o.password ?? "", origin: "--username")
        } else {
            credentials = try RegistryCredentials.lookup(registry: ref.registry, authFile: o.authFile,
                                                         environment: o.environment ?? ProcessInfo.processInfo.environment)
        }
        return RegistryClient(ref: ref, credentials: credentials, insecure: o.insecure)
    }

    /// An `oci://` reference resolved to its blob (with the registry's authentication attached).
    func resolveOCI(_ req: MountRequest) throws
        -> (blob: HTTPBlob, digest: String, size: UInt64?, summary: String, verity: VeritySource?) {
        let o = req.remote.oci
        let ref = try OCIReference(parsing: req.source)
        let platform = try o.platform.map(OCIPlatform.init(parsing:)) ?? OCIPlatform.host(machine: Sys.uname().machine)
        let client = try registryClient(ref, o)
        let resolved = try client.resolve(platform: platform, layer: o.layer, blob: o.blob)
        let blob = try HTTPBlob(url: resolved.url, auth: client.auth)
        var what = "\(ref): blob \(resolved.digest)"
        if let i = resolved.layerIndex { what += ", layer \(i)" }
        if let p = resolved.platform { what += ", platform \(p)" }
        if let m = resolved.manifestDigest { what += ", manifest \(m)" }
        return (blob, resolved.digest, resolved.size, what, resolved.verity)
    }

    /// The binary to run as worker: this executable, unless overridden (tests run in-process).
    nonisolated(unsafe) public static var workerExecutable = Sys.executablePath()
}
