import Glibc
import Probe
import Remote
import Syscall

/// Kernel EROFS on a lazy cache file whose reads a fanotify pre-content mark holds until the
/// bytes are present: the mark and its server (a worker process, or the daemon) are set up before
/// the mount (`Runtime.mountLazy`), so attaching is the file-backed mount of the cache file.
struct FanotifyBackend: MountBackend {
    var kind: Backend { .fanotify }

    /// `request.source` is the cache file, mounted as the file backend mounts an image.
    func attach(_ request: PreparedMount) throws -> Attachment { try FileBackend().attach(request) }

    /// The server ends by itself once every mount of the cache file is gone (`MountWatch`); umount
    /// stops a worker process no other mount shares.
    func release(_ record: MountRecord) {}

    /// The mount's source is the cache file.
    func recognises(_ m: MountInfoEntry, as r: MountRecord) -> Bool {
        m.fsType == "erofs" && r.cachePath != nil && m.source == r.cachePath
    }
}

/// A cache entry's files: the data, its population record, its info and its lock.
typealias CachePaths = (data: String, record: String, info: String, lock: String)

extension Runtime {
    /// The fanotify backend: a worker (or the daemon) marks the cache file and fetches the metadata,
    /// then the cache file is mounted. A blob already served by a live worker is shared: its mark
    /// covers every mount of the cache file (a second group on the same file could deadlock).
    func mountLazy(_ req: MountRequest, blob: HTTPBlob, paths: CachePaths, record: MountRecord, plan: Plan,
                   target: MountTarget, notes: [String]) throws -> MountOutcome {
        var record = record
        let backend = FanotifyBackend()
        let prepared = PreparedMount(source: paths.data, target: target, options: req.options, blockSize: 4096,
                                     stateRoot: state.root)
        func attach() throws {
            do {
                try attachRecorded(&record) { _ = try backend.attach(prepared) }
            } catch {
                throw RuntimeError.mountFailed(backend: backend.kind.rawValue,
                                               detail: "\((error as? BackendFailure)?.detail ?? "\(error)")")
            }
        }
        let live = state.all().first { $0.cachePath == paths.data && $0.workerPID.map(Sys.processExists) == true }
        if let shared = live {
            (record.workerPID, record.statsPath) = (shared.workerPID, shared.statsPath)
            record.servedBy = shared.servedBy
            try state.withLock {
                try checkNotMounted(target, source: req.source)
                try attach()
                try saveOrUndo(record)
            }
            let note = "sharing the worker of \(shared.mountpoint)"
            return MountOutcome(plan: plan, record: record, notes: notes + [note])
        }
        let stats = state.root + "/workers/" + StateStore.key(for: target.path)
        try? Sys.mkdir(state.root + "/workers", mode: 0o700)
        record.statsPath = stats
        if let serving {
            do {
                try serving.prepare(servedBlob(.fanotify, req, blob: blob, entry: paths.data, mountpoint: target.path,
                                               statsPath: stats), blob: blob)
            } catch let e as RemoteError {
                throw RuntimeError.remote(e.description)
            }
            (record.workerPID, record.servedBy) = (Sys.processID, MountRecord.daemon)
        } else {
            record.workerPID = try startWorker(req, blob: blob, paths: paths, mountpoint: target.path, statsPath: stats)
        }
        do {
            try state.withLock {
                try checkNotMounted(target, source: req.source)
                try attach()
                try saveOrUndo(record)
            }
        } catch {
            if let serving { serving.abandon(target.path) } else if let pid = record.workerPID {
                try? Sys.kill(pid, SIGKILL)
                _ = Sys.reap(pid)
            }
            throw error
        }
        if record.servedByDaemon { serving?.serve(target.path) }
        return MountOutcome(plan: plan, record: record, notes: notes)
    }

    /// Spawns the worker and waits until it has marked the cache and fetched all metadata.
    func startWorker(_ req: MountRequest, blob: HTTPBlob, paths: CachePaths, mountpoint: String,
                     statsPath: String) throws -> Int32 {
        let (r, w) = try Sys.pipe()
        defer { Sys.close(r) }
        // What this process just learned from the server (it also checked the cache against it).
        var spec = LazyWorker.Options(serve: servedBlob(.fanotify, req, blob: blob, entry: paths.data,
                                                        mountpoint: mountpoint, statsPath: statsPath))
        (spec.readyFD, spec.prepareTimeout) = (w, req.remote.prepareTimeout)
        let log = state.root + "/workers/" + StateStore.sibling(of: StateStore.key(for: mountpoint), ".log")
        let pid: Int32
        do {
            defer { Sys.close(w) }
            pid = try LazyWorker.spawnServe(spec, keep: [w], executable: Runtime.workerExecutable)
        } catch {
            throw RuntimeError.mountFailed(backend: "fanotify", detail: "cannot start the worker: \(error)")
        }
        let text = Sys.readLine(r, timeoutMs: Int32(min(req.remote.prepareTimeout + 30, 3600) * 1000)).trimmed
        guard text == "ready" else {
            try? Sys.kill(pid, SIGKILL)
            _ = Sys.reap(pid)
            throw RuntimeError.remote(text.hasPrefix("error: ") ? String(text.dropFirst(7))
                                      : "the worker exited before it was ready (log: \(log))")
        }
        return pid
    }

    /// The spec of a remote mount served from the cache entry `entry` of `blob` as the mount
    /// resolved it (credentials included, for the server's pipe).
    func servedBlob(_ frontend: ServeSpec.Frontend, _ req: MountRequest, blob: HTTPBlob, entry: String,
                    filesystem: ServeSpec.Filesystem = .blob, mountpoint: String, statsPath: String) -> ServeSpec {
        var spec = ServeSpec(frontend: frontend, filesystem: filesystem, source: URLUserinfo.strip(req.source),
                             mountpoint: mountpoint, statsPath: statsPath,
                             blob: BlobSpec(blob, entry: entry, remote: req.remote))
        spec.credentials = blob.auth?.secret()
        return spec
    }
}
