#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto
import Dispatch
import Glibc
import Remote
import Syscall
import SystemPackage

/// What a lazy mount served by the daemon needs to be served again after a restart: written next to
/// its figures (never a secret: registry credentials live in the fd store, in a memfd).
struct LazySpec: Codable, Sendable {
    var id: String
    var url: String
    var dataPath: String
    var recordPath: String
    var mountpoint: String
    var statsPath: String
    var digest: String?
    var prefetch: String
    var recordProfile: String?
    var size: UInt64
    var etag: String?
    var lastModified: String?
    var verity: VeritySource?

    var journalPath: String { StateStore.sibling(of: statsPath, ".journal") }
    var specPath: String { StateStore.sibling(of: statsPath, ".spec") }

    /// The fd-store name of one of this mount's descriptors: group, writer, lock, auth.
    func fdName(_ kind: Character) -> String { "lazy-\(id)-\(kind)" }

    /// The options a per-mount supervisor takes over with.
    var workerOptions: LazyWorker.Options {
        var o = LazyWorker.Options(url: url, dataPath: dataPath, recordPath: recordPath, mountpoint: mountpoint,
                                   statsPath: statsPath, readyFD: -1, digest: digest, allowFullDownload: false)
        o.prefetch = Prefetch(argument: prefetch)
        o.recordProfile = recordProfile
        o.known = LazyWorker.Options.Known(size: size, etag: etag, lastModified: lastModified)
        o.verity = verity
        return o
    }
}

/// Lazy mounts served inside `erofs-compat daemon` (no process start per mount). Crash safety comes
/// from the service manager's file-descriptor store: every mount's fanotify group, cache writer and
/// entry lock (and its credentials, in a memfd) are stored there, so a crash of the daemon never
/// closes the group (which would let the kernel allow pending reads: zeros); the restarted daemon
/// gets them back and answers what its predecessor had read, from the journal. On a clean stop each
/// mount is handed to a per-mount supervisor process, which keeps serving it.
public final class InProcessServing: @unchecked Sendable {  // the entries behind their lock
    final class Entry: @unchecked Sendable {  // immutable but `server`, set and cleared by its serving thread
        let spec: LazySpec
        let lazy: LazyBlob
        /// The fanotify group, the entry lock and the credentials' memfd: the fd store and any
        /// successor hold copies of their own, so these close once, when this process is done.
        let group: OwnedDescriptor
        let lock: OwnedDescriptor
        let authFD: OwnedDescriptor?
        let auth: RegistryAuth?
        var server: FanotifyServer?
        let stop = Locked(false)
        let finished = DispatchSemaphore(value: 0)
        /// Set when serving ended because the mount is gone (not a hand-over).
        let unmounted = Locked(false)

        init(spec: LazySpec, lazy: LazyBlob, group: FileDescriptor, lock: FileDescriptor, authFD: Int32?, auth: RegistryAuth?) {
            self.spec = spec
            self.lazy = lazy
            self.group = OwnedDescriptor(group)
            self.lock = OwnedDescriptor(lock)
            self.authFD = authFD.map { OwnedDescriptor($0) }
            self.auth = auth
        }

        /// Closes what this process holds (the fd store and any successor keep their own copies).
        func close() {
            group.close()
            lock.close()
            authFD?.close()
        }
    }

    let state: StateStore
    let entries = Locked<[String: Entry]>([:])
    let log: @Sendable (String) -> Void

    public init(state: StateStore, log: @escaping @Sendable (String) -> Void) {
        self.state = state
        self.log = log
    }

    /// A fresh id per mount (never reused, so a late cleanup of an earlier mount at the same
    /// mountpoint cannot touch a newer one's stored descriptors or files).
    static func newID() -> String {
        var rng = SystemRandomNumberGenerator()
        return (0..<12).map { _ in String(hexByte: UInt8.random(in: 0...255, using: &rng)) }.joined()
    }

    /// How many mounts this process serves.
    public var count: Int { entries.get().count }

    /// Before the mount: locks the cache entry, marks the cache file, fetches all metadata, stores the
    /// descriptors with the service manager. Throws (leaving nothing behind) when any step fails.
    func prepare(blob: HTTPBlob, paths: (data: String, record: String, info: String, lock: String), mountpoint: String,
                 statsPath: String, digest: String?, verity: VeritySource?, prefetch: Prefetch, recordProfile: String?) throws {
        let spec = LazySpec(id: Self.newID(), url: blob.url, dataPath: paths.data, recordPath: paths.record,
                            mountpoint: mountpoint, statsPath: statsPath, digest: digest, prefetch: prefetch.argument,
                            recordProfile: recordProfile, size: blob.size, etag: blob.etag, lastModified: blob.lastModified,
                            verity: verity)
        let lock = try BlobCache.lockForWriting(entry: paths.data)
        var group: FileDescriptor?
        var authFD: Int32?
        var owned = false
        do {
            let prepared = try LazyWorker.prepareCache(spec.workerOptions.lazyBlob(blob), statsPath: statsPath,
                                                       commit: false, log: { [log] in log("\(mountpoint): \($0)") })
            let lazy = prepared.lazy
            group = prepared.group
            try? Sys.unlink(spec.journalPath)
            if let auth = blob.auth { authFD = try Sys.memfd("erofs-compat-auth", holding: auth.secret()) }
            let data = try JSONEncoder().encode(spec)
            try Sys.writeFileAtomically(spec.specPath, [UInt8](data))
            // From here the entry owns the descriptors (and closes them when it goes).
            let entry = Entry(spec: spec, lazy: lazy, group: group!, lock: lock, authFD: authFD, auth: blob.auth)
            (group, authFD, owned) = (nil, nil, true)
            do { try store(entry) } catch {
                entry.close()
                throw error
            }
            entries.withLock { $0[mountpoint] = entry }
        } catch {
            group.map { Sys.close($0.rawValue) }
            authFD.map(Sys.close)
            if !owned { Sys.close(lock.rawValue) }
            forget(spec)
            throw error
        }
    }

    /// Hands the descriptors to the service manager's store (the group first: it is what matters).
    func store(_ e: Entry) throws {
        var list: [(Character, Int32)] = [("g", e.group.rawValue), ("w", e.lazy.writerFD), ("l", e.lock.rawValue)]
        if let a = e.authFD { list.append(("a", a.rawValue)) }
        for (kind, fd) in list {
            guard try ServiceManager.notify("FDSTORE=1\nFDNAME=\(e.spec.fdName(kind))", fds: [fd]) else {
                throw RuntimeError.state("no service manager holds the descriptors ($NOTIFY_SOCKET is unset)")
            }
        }
    }

    /// Removes a mount's descriptors from the store and its spec file (and journal, unless a
    /// successor serves the mount now).
    func forget(_ spec: LazySpec, keepJournal: Bool = false) {
        for kind: Character in ["g", "w", "l", "a"] {
            _ = try? ServiceManager.notify("FDSTOREREMOVE=1\nFDNAME=\(spec.fdName(kind))")
        }
        // The files are per mountpoint: leave them to a newer mount there.
        let current = (try? Sys.readFile(spec.specPath)).flatMap { try? JSONDecoder().decode(LazySpec.self, from: Data($0)) }
        guard current == nil || current?.id == spec.id else { return }
        try? Sys.unlink(spec.specPath)
        if !keepJournal { try? Sys.unlink(spec.journalPath) }
    }

    /// After a failed mount: drops what `prepare` set up.
    func abandon(_ mountpoint: String) {
        guard let e = entries.withLock({ $0.removeValue(forKey: mountpoint) }) else { return }
        forget(e.spec)
        e.close()
    }

    /// Starts serving a prepared (and now mounted) entry.
    func serve(_ mountpoint: String) {
        guard let e = entries.withLock({ $0[mountpoint] }) else { return }
        start(e, replay: false)
    }

    func start(_ e: Entry, replay: Bool) {
        let server: FanotifyServer
        do {
            // The server owns a duplicate of the group: the entry's copy outlives it for a hand-over.
            server = try LazyWorker.makeServer(e.lazy, groupFD: Sys.dup(e.group.rawValue), journal: e.spec.journalPath, e.spec.workerOptions,
                                               log: { [log, mp = e.spec.mountpoint] in log("\(mp): \($0)") })
        } catch {
            // Without a server nobody answers: keep the group (readers wait, never see zeros) and say so.
            log("\(e.spec.mountpoint): cannot serve: \(error)")
            return
        }
        e.server = server
        if replay { server.replayJournal() }
        LazyWorker.writeStats(server.snapshot, to: e.spec.statsPath)
        let spec = e.spec
        // No thread of its own: the watch and the figures run on the ticker, the server on the pool.
        let watch = MountWatch(spec.mountpoint, source: spec.dataPath, parent: getppid(), writerFD: e.lazy.writerFD)
        ServingTicker.shared.every(250) {
            guard !e.stop.get() else { return false }
            guard watch.isGoneWhenDue() else { return true }
            if !e.stop.get() { e.unmounted.set(true) }
            e.stop.set(true)
            server.stop()
            return false
        }
        let written = Locked(server.counters)
        ServingTicker.shared.every(100) {
            guard !e.stop.get() else { return false }
            written.set(LazyWorker.writeStatsIfChanged(server, to: spec.statsPath, since: written.get()))
            return true
        }
        server.start { [self] in
            LazyWorker.writeStats(server.snapshot, to: spec.statsPath)
            if e.unmounted.get() {
                log("\(spec.mountpoint) is gone; stopped serving it")
                entries.withLock { if $0[spec.mountpoint] === e { $0[spec.mountpoint] = nil } }
                forget(spec)
                e.server = nil
                e.close()
            }
            e.finished.signal()
        }
    }

    /// At start: takes back the mounts a previous daemon process served, from the descriptors the
    /// service manager kept, and answers the events it had read but not answered.
    public func restore(_ fds: [(name: String, fd: Int32)]) {
        var byID: [String: [Character: Int32]] = [:]
        for (name, fd) in fds {
            let parts = name.split(separator: "-")
            guard parts.count == 3, parts[0] == "lazy", let kind = parts[2].first, parts[2].count == 1 else { continue }
            byID[String(parts[1]), default: [:]][kind] = fd
        }
        let specs = (try? FileManager.default.contentsOfDirectory(atPath: state.root + "/workers")) ?? []
        var known: [String: LazySpec] = [:]
        for name in specs where name.hasSuffix(".spec") {
            if let b = try? Sys.readFile(state.root + "/workers/" + name), let s = try? JSONDecoder().decode(LazySpec.self, from: Data(b)) {
                known[s.id] = s
            }
        }
        for (id, f) in byID {
            guard let spec = known[id], let g = f["g"], let w = f["w"], let l = f["l"] else {
                // Descriptors without a spec: nothing can serve them; the group must not close while a
                // mount might use it, so keep them (the next hand-over or stop ends them).
                log("stored descriptors \(id) have no spec; keeping them")
                continue
            }
            do {
                let auth = try f["a"].map { try RegistryAuth(secret: Sys.preadFully($0, count: Int(Sys.fstat($0).st_size), at: 0)) }
                let blob = try HTTPBlob(url: spec.url, auth: auth)
                blob.adopt(size: spec.size, etag: spec.etag, lastModified: spec.lastModified)
                let lazy = try spec.workerOptions.lazyBlob(blob, writerFD: w)
                let e = Entry(spec: spec, lazy: lazy, group: FileDescriptor(rawValue: g), lock: FileDescriptor(rawValue: l), authFD: f["a"], auth: auth)
                entries.withLock { $0[spec.mountpoint] = e }
                updateRecords(of: spec, pid: getpid(), servedBy: MountRecord.daemon)
                log("\(spec.mountpoint): serving again after a restart")
                start(e, replay: true)
            } catch {
                log("\(spec.mountpoint): cannot serve again: \(error)")
            }
        }
    }

    /// Points every record of this cache file at `pid`.
    func updateRecords(of spec: LazySpec, pid: Int32, servedBy: String?) {
        try? state.withLock {
            for var r in state.all() where r.attached.kind == .fanotify && r.cachePath == spec.dataPath {
                r.workerPID = pid
                r.servedBy = servedBy
                try? state.save(r)
            }
        }
    }

    /// On a clean stop: each mount still served goes to its own supervisor process (started with the
    /// group, writer and lock), which keeps serving it after this process exits.
    public func handOver() {
        for (_, e) in entries.get() {
            e.stop.set(true)
            e.server?.stop()
        }
        for (mountpoint, e) in entries.get() {
            if e.server != nil { e.finished.wait() }
            if e.unmounted.get() { continue }
            do {
                let pid = try LazyWorker.spawnSupervisor(e.spec.workerOptions, group: e.group.rawValue, writer: e.lazy.writerFD,
                                                         lock: e.lock.rawValue, auth: e.auth)
                updateRecords(of: e.spec, pid: pid, servedBy: nil)
                entries.withLock { if $0[mountpoint] === e { $0[mountpoint] = nil } }
                log("\(mountpoint): handed to supervisor \(pid)")
                forget(e.spec, keepJournal: true)
            } catch {
                // Keep the descriptors stored: the manager holds the group until the next start.
                log("\(mountpoint): cannot hand over (\(error)); its descriptors stay in the store")
            }
        }
    }
}
