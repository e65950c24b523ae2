#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import EROFS
import FUSE
import Glibc
import Probe
import Remote
import Syscall
import SystemPackage

/// A `mount` request as the CLI received it.
public struct MountRequest: Sendable {
    public var source: String
    public var mountpoint: String
    /// nil: the planner's first viable candidate (`--backend auto`).
    public var backend: Backend?
    /// With `backend` nil: only these candidates (`--backend fuse`).
    public var allowed: Set<Backend>?
    public var options: MountOptions
    public var dryRun: Bool
    /// For http(s) sources.
    public var remote: RemoteOptions
    /// The source as given, before credentials were taken out of a URL (never stored or shown).
    var originalSource: String?

    public init(source: String, mountpoint: String, backend: Backend? = nil, options: MountOptions = MountOptions(),
                dryRun: Bool = false, remote: RemoteOptions = RemoteOptions()) {
        self.remote = remote
        self.source = source
        self.mountpoint = mountpoint
        self.backend = backend
        self.options = options
        self.dryRun = dryRun
    }
}

/// What `mount` did.
public struct MountOutcome: Sendable {
    public var plan: Plan
    /// nil for a dry run.
    public var record: MountRecord?
    /// Fallbacks taken, in order ("file failed: …; trying loop").
    public var notes: [String]
}

/// The health of one recorded mount.
public struct MountStatus: Codable, Sendable {
    public var record: MountRecord
    public var mounted: Bool
    public var deviceBound: Bool?
    public var workerAlive: Bool?
    /// Empty when healthy; otherwise why the record no longer matches reality.
    public var problems: [String]
    /// The lazy worker's progress (fanotify backend).
    public var progress: FanotifyServer.Stats?
    /// The FUSE server's request counts and read latency (fuse-blob, fuse-erofs).
    public var fuse: FUSEStats?
    /// What the lazy reader of a served mount fetched (fuse-blob, fuse-erofs, nbd from a remote
    /// source; fanotify's figures are in `progress`).
    public var lazy: LazyFigures?
    public var stale: Bool { !problems.isEmpty }
}

/// Mounts, unmounts and reports local EROFS images with the backend the planner chooses.
public struct Runtime: Sendable {
    /// The backends this build implements.
    public static let implemented: Set<Backend> = [.file, .loop, .fanotify, .fuseBlob, .fuseErofs, .nbd]

    public var state: StateStore
    /// Set inside `erofs-compat daemon`: lazy mounts are served in this process instead of by a
    /// per-mount supervisor process.
    public var serving: InProcessServing?

    public init(state: StateStore = StateStore(), serving: InProcessServing? = nil) {
        self.state = state
        self.serving = serving
    }

    // MARK: mount

    /// Validates, plans and mounts. `override` feeds the planner findings (to simulate other hosts);
    /// `note` receives one line per fallback as it happens.
    public func mount(_ req: MountRequest, override: [Finding] = [], note: (String) -> Void = { _ in }) throws -> MountOutcome {
        if req.source.hasPrefix("http://") || req.source.hasPrefix("https://") || OCIReference.isOCI(req.source) {
            return try mountRemote(req, override: override, note: note)
        }
        let (source, identity, sourceFD) = try openSource(req.source)
        let (target, admin, planned): (MountTarget, Bool, MountPlanning.Result)
        do {
            defer { sourceFD.map { Sys.close($0.rawValue) } }
            target = try MountTarget(req.mountpoint)
            try? state.ensureDirectories()
            admin = Sys.hasCapSysAdmin()
            planned = MountPlanning.planLocal(image: source, imageFD: sourceFD?.rawValue, privileged: admin, offset: req.options.fsOffset,
                                              implemented: Self.implemented, override: override, cacheFile: admin ? state.hostCache : nil)
        }
        // An image the kernel cannot read is still mountable by the user-space reader (fuse-erofs).
        let userSpace = planned.plan.candidates.contains { $0.backend == .fuseErofs && $0.verdict != .rejected }
            && planned.superblock.map { EROFSImage.unimplemented($0) == nil } == true
            && (req.backend ?? .fuseErofs) == .fuseErofs && (req.allowed?.contains(.fuseErofs) ?? true)
        let blockSize = try validateImage(source, planned.findings, superblock: planned.superblock, options: req.options,
                                          kernelReads: !userSpace)
        let plan = planned.plan
        if req.dryRun {
            // A dry run refuses what the mount would refuse.
            try checkNotMounted(target, source: source)
            return MountOutcome(plan: plan, record: nil, notes: [])
        }
        // Without CAP_SYS_ADMIN only fuse-erofs (through the setuid fusermount3) can mount.
        guard admin || userSpace && req.backend != nil || userSpace && plan.chosen == .fuseErofs else {
            let fuse = plan.candidates.first { $0.backend == .fuseErofs }
            let why = fuse.map { $0.verdict == .rejected ? " (fuse-erofs without root: \($0.reasons.joined(separator: "; ")))" : "" } ?? ""
            throw RuntimeError.notPrivileged("mounting" + (req.backend.map { " with \($0.rawValue)" } ?? "") + why)
        }

        return try state.withLock {
            try checkNotMounted(target, source: source)
            let candidates = try choose(plan, requested: req.backend, allowed: req.allowed)
            var notes: [String] = []
            let prepared = PreparedMount(source: source, target: target, options: req.options, blockSize: blockSize,
                                         stateRoot: state.root)
            for (i, backend) in candidates.enumerated() {
                guard let impl = Backends.all[backend] else { continue }
                var record = MountRecord(source: source, sourceKind: "local", backend: backend.rawValue, mountpoint: target.path,
                                         options: req.options.summary, device: nil, workerPID: nil,
                                         since: Date().timeIntervalSince1970, sourceIdentity: identity, mountID: nil)
                let attachment: Attachment
                do {
                    attachment = try attachRecorded(&record) { try impl.attach(prepared) }
                } catch let f as BackendFailure {
                    let canFallBack = req.backend == nil && f.fallback && i + 1 < candidates.count
                    guard canFallBack else { throw RuntimeError.mountFailed(backend: backend.rawValue, detail: f.detail) }
                    let line = "\(backend.rawValue) backend failed (\(f.detail)); trying \(candidates[i + 1].rawValue)"
                    notes.append(line)
                    note(line)
                    continue
                }
                record.apply(attachment)
                do {
                    try state.save(record)
                } catch {
                    // Never leave a mount without its record.
                    try? MountAPI.umount(target.path)
                    impl.release(record)
                    state.remove(target.path)
                    throw error
                }
                return MountOutcome(plan: plan, record: record, notes: notes)
            }
            throw RuntimeError.noBackend(notes.joined(separator: "; "))
        }
    }

    /// Refuses a mountpoint that is already the root of a mount (naming what is there).
    func checkNotMounted(_ target: MountTarget, source: String) throws {
        guard try target.isMountRoot() else { return }
        if let rec = state.load(target.path), rec.source == source { throw RuntimeError.alreadyMounted(target.path, source: source) }
        let existing = MountInfo.mount(at: target.path, in: MountInfo.current())
        throw RuntimeError.mountpointBusy(target.path, by: existing.map { "\($0.fsType) from \($0.source)" } ?? "mounted")
    }

    /// Runs `attach` with the record saved first (pending: no mount id yet), so a crash right after
    /// the kernel attached leaves a mount `umount` still recognises as ours (by mountinfo); the
    /// record is removed again when attaching fails, and gets the new mount's id when it works.
    func attachRecorded<T>(_ record: inout MountRecord, _ attach: () throws -> T) throws -> T {
        try state.save(record, durable: false)
        let result: T
        do { result = try attach() } catch {
            state.remove(record.mountpoint)
            throw error
        }
        record.mountID = try? Sys.mountIdentity(record.mountpoint).id
        return result
    }

    /// The candidates to try, in order: the named backend alone, or every viable one.
    func choose(_ plan: Plan, requested: Backend?, allowed: Set<Backend>? = nil) throws -> [Backend] {
        if let requested {
            guard let c = plan.candidates.first(where: { $0.backend == requested }) else {
                throw RuntimeError.backendUnavailable(requested.rawValue, reasons: "not a candidate for a local image")
            }
            guard c.verdict != .rejected else {
                throw RuntimeError.backendUnavailable(requested.rawValue, reasons: c.reasons.joined(separator: "; "))
            }
            return [requested]
        }
        // Viable first; an unverified candidate (nothing known missing, a trial was inconclusive, e.g.
        // the image sits on tmpfs) is still worth a try, with fallback on failure.
        let considered = plan.candidates.filter { allowed?.contains($0.backend) ?? true }
        let viable = considered.filter { $0.verdict == .viable || $0.verdict == .unverified }.map(\.backend)
        guard !viable.isEmpty else {
            let why = considered.filter { Self.implemented.contains($0.backend) }
                .map { "\($0.backend.rawValue): \($0.reasons.joined(separator: ", "))" }.joined(separator: "; ")
            throw RuntimeError.noBackend(why)
        }
        return viable
    }

    /// The canonical path of a local image, its dev:ino (to recognise it again) and, when it can be
    /// read, the image opened for the planner's checks (one path walk for all of them).
    func openSource(_ path: String) throws -> (path: String, identity: String, fd: FileDescriptor?) {
        // O_NONBLOCK|O_NOCTTY: opening a FIFO or a terminal given by mistake neither waits nor adopts it.
        if let (fd, p) = try? Sys.openCanonical(path, O_RDONLY | O_NONBLOCK | O_NOCTTY) {
            guard let st = try? Sys.fstat(fd.rawValue), st.st_mode & S_IFMT == S_IFREG else {
                Sys.close(fd.rawValue)
                throw RuntimeError.sourceNotFile(path)
            }
            return (p, "\(st.st_dev):\(st.st_ino)", fd)
        }
        // Unreadable or missing.
        let (p, identity) = try canonicalSource(path)
        do { Sys.close(try Sys.open(p, O_RDONLY | O_NONBLOCK | O_NOCTTY).rawValue) } catch let e as Errno where e == .permissionDenied {
            throw RuntimeError.sourceUnreadable(p, detail: "permission denied")
        } catch {}
        return (p, identity, nil)
    }

    /// The canonical path of a local image, and its dev:ino (to recognise it again).
    func canonicalSource(_ path: String) throws -> (path: String, identity: String) {
        guard let (p, st) = try? Sys.canonical(path) else { throw RuntimeError.sourceMissing(path) }
        guard st.st_mode & S_IFMT == S_IFREG else { throw RuntimeError.sourceNotFile(path) }
        return (p, "\(st.st_dev):\(st.st_ino)")
    }

    /// libblkid + superblock + feature bits, from the planner's findings; returns the block size.
    /// `kernelReads` false: features the kernel lacks are no reason to refuse (fuse-erofs reads them).
    func validateImage(_ source: String, _ f: Findings, superblock: Superblock?, options: MountOptions,
                       kernelReads: Bool = true) throws -> Int {
        if f.status("image.superblock") != .present {
            throw RuntimeError.notEROFS(source, detail: f["image.superblock"]?.evidence.first?.result ?? "no superblock")
        }
        if f.status("image.size") == .absent {
            throw RuntimeError.imageTruncated(source, detail: f["image.size"]?.evidence.first?.result ?? "truncated")
        }
        if let blkid = f["image.blkid"]?.value, let type = blkid.split(separator: " ").first(where: { $0.hasPrefix("TYPE=") }), type != "TYPE=erofs" {
            throw RuntimeError.notEROFS(source, detail: "libblkid identifies it as \(type.dropFirst(5))")
        }
        if kernelReads, f.status("image.features") == .absent {
            let missing = f["image.features"]?.evidence.last?.result ?? "unknown features"
            throw RuntimeError.unsupportedFeatures(source, features: missing.replacingPrefix("missing: "))
        }
        guard let sb = superblock else {
            throw RuntimeError.notEROFS(source, detail: f["image.superblock"]?.evidence.first?.result ?? "no superblock")
        }
        if options.fsOffset % UInt64(sb.blockSize) != 0 {
            throw RuntimeError.badOptionValue("fsoffset=\(options.fsOffset)", detail: "must be a multiple of the image's block size \(sb.blockSize)")
        }
        return sb.blockSize
    }

    // MARK: umount

    /// Unmounts what this tool mounted at `path` (any path form), releases its device or worker and
    /// removes its record. A record whose mount is already gone is cleaned up as stale.
    @discardableResult
    public func umount(_ path: String, lazy: Bool = false) throws -> (record: MountRecord, wasStale: Bool) {
        let mountpoint = Self.canonicalExisting(path)
        let admin = Sys.hasCapSysAdmin()
        return try state.withLock {
            guard let record = state.load(mountpoint) else {
                guard admin else { throw RuntimeError.notPrivileged("unmounting") }
                if let m = MountInfo.mount(at: mountpoint, in: MountInfo.current()) {
                    throw RuntimeError.notOurs(mountpoint, owner: Self.describe(m))
                }
                throw RuntimeError.notMounted(mountpoint)
            }
            let impl = Backends.implementation(of: record)
            // A user's own FUSE mount (in their state directory) goes through fusermount3.
            guard admin || record.isFuseServed else { throw RuntimeError.notPrivileged("unmounting") }
            var wasStale = false
            if isOurMount(record), !admin {
                guard FuseMounter.fusermountUnmount(mountpoint, lazy: lazy) else {
                    throw RuntimeError.mountFailed(backend: record.backend, detail: "fusermount3 -u \(mountpoint) failed (busy? close the files or use --lazy)")
                }
            } else if isOurMount(record) {
                do {
                    try MountAPI.umount(mountpoint, detach: lazy)
                } catch let e as Errno where e == .resourceBusy {
                    throw RuntimeError.mountFailed(backend: record.backend, detail: "umount \(mountpoint): busy (files are open); close them or use --lazy")
                } catch {
                    throw RuntimeError.mountFailed(backend: record.backend, detail: "umount \(mountpoint): \(error)")
                }
            } else {
                wasStale = true
            }
            // After a lazy umount the worker must outlive the open files: it exits by itself when the
            // superblock is shut down.
            if !lazy {
                stopWorker(record)
                removeWorkerFiles(record)
            }
            impl?.release(record, lazy: lazy)
            state.remove(mountpoint)
            return (record, wasStale)
        }
    }

    /// Stops a mount's worker unless another recorded mount still uses it.
    func stopWorker(_ record: MountRecord) {
        guard let pid = record.workerPID, Sys.processExists(pid) else { return }
        let others = state.all().filter { $0.workerPID == pid && $0.cachePath == record.cachePath && $0.mountpoint != record.mountpoint }
        guard others.isEmpty else { return }
        // The daemon serves many mounts and stops serving this one by itself once it is gone. A
        // recorded pid may since belong to another process: only this mount's worker is signalled.
        if !record.servedByDaemon, Self.isWorker(pid, serving: record) { try? Sys.kill(pid, SIGTERM) }
        // The serving worker follows within a moment (its mount is gone); wait for it to release the
        // cache entry, so that when `umount` returns the entry is free (e.g. for `cache prune`); up to
        // 10 s on a loaded machine.
        if let cache = record.cachePath {
            for _ in 0..<200 where BlobCache.isLocked(entry: cache) { usleep(50_000) }
            // Complete and verified by now: from here on the kernel can guarantee its bytes.
            if !BlobCache.isLocked(entry: cache) { _ = BlobCache.handToKernel(entry: cache) }
        }
    }

    /// "an ext4 mount of /dev/sda1", "a tmpfs mount of tmpfs".
    static func describe(_ m: MountInfoEntry) -> String {
        let article = m.fsType.first.map { "aeiou".contains($0) } == true ? "an" : "a"
        return "\(article) \(m.fsType) mount of \(m.source)"
    }

    /// A stopped worker's figures, journal and log, once no other recorded mount shares them.
    func removeWorkerFiles(_ record: MountRecord) {
        guard let stats = record.statsPath, !record.servedByDaemon,
              !state.all().contains(where: { $0.statsPath == stats && $0.mountpoint != record.mountpoint }),
              !(record.workerPID.map { Self.isWorker($0, serving: record) } ?? false) else { return }
        for f in [stats, StateStore.sibling(of: stats, ".journal"), StateStore.sibling(of: stats, ".log")] { try? Sys.unlink(f) }
    }

    /// Whether `pid` runs `__serve` for the record's cache file (its command line says so).
    static func isWorker(_ pid: Int32, serving record: MountRecord) -> Bool {
        guard let cache = record.cachePath, let raw = try? Sys.readFile("/proc/\(pid)/cmdline") else { return false }
        let argv = raw.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        return isServeCommandLine(argv, serving: cache)
    }

    /// Whether `argv` (program first) is `__serve` for the cache file `cache`.
    static func isServeCommandLine(_ argv: [String], serving cache: String) -> Bool {
        guard argv.count > 1, argv[1] == "__serve", let i = argv.firstIndex(of: "--data"), i + 1 < argv.count else { return false }
        return argv[i + 1] == cache
    }

    /// realpath when the path exists, else a lexically normalised absolute path.
    static func canonicalExisting(_ path: String) -> String {
        if let (p, _) = try? Sys.canonical(path) { return p }
        let abs = path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
        var parts: [Substring] = []
        for c in abs.split(separator: "/") {
            if c == "." { continue }
            if c == ".." { _ = parts.popLast(); continue }
            parts.append(c)
        }
        return "/" + parts.joined(separator: "/")
    }

    /// Whether `path` is the root of a mount (statx; mountinfo where the kernel does not say).
    func isMountRoot(_ path: String) throws -> Bool {
        if let root = try Sys.mountIdentity(path).isRoot { return root }
        return MountInfo.mount(at: path, in: MountInfo.current()) != nil
    }

    /// The mount at the record's mountpoint is still the one this tool made: same mount id when
    /// recorded (cheap), else EROFS from the recorded source or device in mountinfo.
    func isOurMount(_ r: MountRecord) -> Bool {
        if let id = r.mountID, let now = try? Sys.mountIdentity(r.mountpoint), now.isRoot != nil {
            return now.isRoot == true && now.id == id
        }
        return isOurMount(r, MountInfo.current())
    }

    package func isOurMount(_ r: MountRecord, _ mounts: [MountInfoEntry]) -> Bool {
        mounts.contains { $0.mountPoint == r.mountpoint && Backends.recognises($0, as: r) }
    }

    // MARK: status

    /// Every recorded mount (or the one at `path`) with its health.
    public func status(_ path: String? = nil) throws -> [MountStatus] {
        let mounts = MountInfo.current()
        var records = state.all()
        if let path {
            let mp = Self.canonicalExisting(path)
            records = records.filter { $0.mountpoint == mp }
            if records.isEmpty {
                if let m = MountInfo.mount(at: mp, in: mounts) {
                    throw RuntimeError.notOurs(mp, owner: Self.describe(m))
                }
                throw RuntimeError.notMounted(mp)
            }
        }
        return records.map { health($0, mounts) }
    }

    func health(_ r: MountRecord, _ mounts: [MountInfoEntry]) -> MountStatus {
        var problems: [String] = []
        let mounted = isOurMount(r, mounts)
        if !mounted { problems.append("no longer mounted (plain umount(8)?)") }
        let bound = Backends.deviceBound(r)
        if bound == false, mounted { problems.append("\(r.device ?? "the device") no longer backed by the image") }
        var alive: Bool?
        if let pid = r.workerPID {
            alive = Sys.processExists(pid)
            if alive == false { problems.append("worker \(pid) is gone") }
        }
        let stats = r.statsPath.flatMap { FileManager.default.contents(atPath: $0) }
        if r.isFuseServed || r.attached.kind == .nbd {
            if alive == false, mounted, r.isFuseServed {
                problems.append("reads fail with ENOTCONN; run `erofs-compat umount \(r.mountpoint)` to clear it")
            }
            let fuse = r.isFuseServed ? stats.flatMap { try? JSONDecoder().decode(FUSEStats.self, from: $0) } : nil
            let lazy = stats.flatMap(ServedStats.lazyFigures)
            if lazy?.verified == false { problems.append("cache failed verification: \(lazy?.error ?? "digest mismatch")") }
            return MountStatus(record: r, mounted: mounted, deviceBound: bound, workerAlive: alive, problems: problems,
                               fuse: fuse, lazy: lazy)
        }
        let progress = stats.flatMap { try? JSONDecoder().decode(FanotifyServer.Stats.self, from: $0) }
        if progress?.verified == false { problems.append("cache failed verification: \(progress?.error ?? "digest mismatch")") }
        return MountStatus(record: r, mounted: mounted, deviceBound: bound, workerAlive: alive, problems: problems, progress: progress)
    }

    /// Removes stale records (their mounts are gone), releasing what is left of them.
    public func prune() throws -> [MountRecord] {
        // A user prunes their own state directory (root's is not theirs to write).
        guard Sys.hasCapSysAdmin() || Sys.effectiveUID != 0 && state.root != StateStore.defaultRoot else {
            throw RuntimeError.notPrivileged("pruning state")
        }
        return try state.withLock {
            let mounts = MountInfo.current()
            var pruned: [MountRecord] = []
            for r in state.all() where !isOurMount(r, mounts) {
                stopWorker(r)
                removeWorkerFiles(r)
                Backends.implementation(of: r)?.release(r)
                state.remove(r.mountpoint)
                pruned.append(r)
            }
            return pruned
        }
    }
}

extension String {
    func replacingPrefix(_ p: String) -> String { hasPrefix(p) ? String(dropFirst(p.count)) : self }
}
