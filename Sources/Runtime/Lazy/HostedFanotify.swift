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

/// A fanotify lazy mount served in the daemon: its group, cache writer and entry lock (and its
/// credentials, in a memfd) are durable, so a crash never closes the group (which would let the
/// kernel allow pending reads: zeros); the successor answers what its predecessor had read, from
/// the journal.
final class HostedFanotify: HostedMount, @unchecked Sendable {  // immutable but `server`, set by its start
    /// With its credentials (the supervisor of a hand-over gets them on its pipe).
    let serve: ServeSpec
    let blobSpec: BlobSpec
    let lazy: LazyBlob
    /// The fanotify group, the entry lock and the credentials' memfd: the fd store and any
    /// successor hold copies of their own, so these close once, when this process is done.
    let group: OwnedDescriptor
    let lock: OwnedDescriptor
    let authFD: OwnedDescriptor?
    let auth: RegistryAuth?
    let log: @Sendable (String) -> Void
    private var server: FanotifyServer?
    private let stopped = Locked(false)
    private let finished = DispatchSemaphore(value: 0)
    /// Set when serving ended because the mount is gone (not a hand-over).
    private let unmounted = Locked(false)

    var spec: ServeSpec { serve.stored }

    var durable: [(kind: Character, fd: Int32)] {
        var list: [(kind: Character, fd: Int32)] = [("g", group.rawValue), ("w", lazy.writerFD), ("l", lock.rawValue)]
        if let authFD { list.append(("a", authFD.rawValue)) }
        return list
    }

    init(serve: ServeSpec, blob: BlobSpec, lazy: LazyBlob, group: FileDescriptor, lock: FileDescriptor, authFD: Int32?,
         auth: RegistryAuth?, log: @escaping @Sendable (String) -> Void) {
        (self.serve, blobSpec, self.lazy, self.auth) = (serve, blob, lazy, auth)
        self.group = OwnedDescriptor(group)
        self.lock = OwnedDescriptor(lock)
        self.authFD = authFD.map { OwnedDescriptor($0) }
        self.log = { [mp = serve.mountpoint] in log("\(mp): \($0)") }
    }

    /// Every mount of the cache file shares this server.
    func serves(_ record: MountRecord) -> Bool {
        record.attached.kind == .fanotify && record.cachePath == blobSpec.entry
    }

    func start(restarted: Bool, ended: @escaping @Sendable () -> Void) {
        let server: FanotifyServer
        do {
            // The server owns a duplicate of the group: this copy outlives it for a hand-over.
            server = try LazyWorker.makeServer(lazy, groupFD: Sys.dup(group.rawValue), journal: serve.journalPath,
                                               LazyWorker.Options(serve: serve), log: log)
        } catch {
            // Without a server nobody answers: keep the group (readers wait, never see zeros) and say so.
            log("cannot serve: \(error)")
            return
        }
        self.server = server
        if restarted { server.replayJournal() }
        let statsPath = serve.statsPath
        LazyWorker.writeStats(server.snapshot, to: statsPath)
        // No thread of its own: the watch and the figures run on the ticker, the server on the pool.
        let watch = MountWatch(serve.mountpoint, source: blobSpec.entry, parent: getppid(), writerFD: lazy.writerFD)
        ServingTicker.shared.every(250) { [self] in
            guard !stopped.get() else { return false }
            guard watch.isGoneWhenDue() else { return true }
            if !stopped.get() { unmounted.set(true) }
            stopped.set(true)
            server.stop()
            return false
        }
        let written = Locked(server.counters)
        ServingTicker.shared.every(100) { [self] in
            guard !stopped.get() else { return false }
            written.set(LazyWorker.writeStatsIfChanged(server, to: statsPath, since: written.get()))
            return true
        }
        server.start { [self] in
            LazyWorker.writeStats(server.snapshot, to: statsPath)
            if unmounted.get() {
                log("the mount is gone; stopped serving it")
                ended()
            }
            finished.signal()
        }
    }

    func stop() -> Bool {
        stopped.set(true)
        if let server {
            server.stop()
            finished.wait()
            finished.signal()
        }
        // Unmounted moments ago, before the watch looked: nothing to hand over (a supervisor would
        // wait for a mount that never comes).
        if Backends.kernelEROFSMounts(of: blobSpec.entry).isEmpty, (try? Sys.fileIsShared(lazy.writerFD)) == false {
            unmounted.set(true)
        }
        return !unmounted.get()
    }

    func spawnSupervisor() throws -> Int32 {
        try LazyWorker.spawnSupervisor(serve, group: group.rawValue, writer: lazy.writerFD, lock: lock.rawValue)
    }

    func close() {
        group.close()
        lock.close()
        authFD?.close()
    }

    /// Before the mount: locks the cache entry, marks the cache file, fetches all metadata. Throws,
    /// leaving nothing behind, when any step fails.
    static func prepare(_ serve: ServeSpec, blob: HTTPBlob,
                        log: @escaping @Sendable (String) -> Void) throws -> HostedFanotify {
        let spec = try LazyWorker.Options(serve: serve).blob
        let lock = try BlobCache.lockForWriting(entry: spec.entry)
        var authFD: Int32?
        do {
            let prepared = try LazyWorker.prepareCache(spec.lazyBlob(blob), statsPath: serve.statsPath,
                                                       commit: false, log: { log("\(serve.mountpoint): \($0)") })
            do {
                try? Sys.unlink(serve.journalPath)
                if let auth = blob.auth { authFD = try Sys.memfd("erofs-compat-auth", holding: auth.secret()) }
            } catch {
                Sys.close(prepared.group.rawValue)
                throw error
            }
            return HostedFanotify(serve: serve, blob: spec, lazy: prepared.lazy, group: prepared.group, lock: lock,
                                  authFD: authFD, auth: blob.auth, log: log)
        } catch {
            Sys.close(lock.rawValue)
            throw error
        }
    }

    /// After a restart: the mount again from its spec and the stored group (g), writer (w), lock
    /// (l) and credentials (a).
    static func restore(_ stored: ServeSpec, _ fds: [Character: Int32],
                        log: @escaping @Sendable (String) -> Void) throws -> HostedFanotify {
        guard let g = fds["g"], let w = fds["w"], let l = fds["l"] else {
            throw RuntimeError.state("the stored descriptors lack the group, writer or lock")
        }
        var serve = stored
        serve.credentials = try fds["a"].map { try Sys.preadFully($0, count: Int(Sys.fstat($0).st_size), at: 0) }
        let spec = try LazyWorker.Options(serve: serve).blob
        let auth = try serve.registryAuth()
        let lazy = try spec.lazyBlob(spec.open(auth: auth), writerFD: w)
        return HostedFanotify(serve: serve, blob: spec, lazy: lazy, group: FileDescriptor(rawValue: g),
                              lock: FileDescriptor(rawValue: l), authFD: fds["a"], auth: auth, log: log)
    }
}

extension InProcessServing {
    /// Before a fanotify mount served here: the cache entry locked and marked, its metadata fetched,
    /// the descriptors stored. Throws, leaving nothing behind, when any step fails.
    func prepare(_ serve: ServeSpec, blob: HTTPBlob) throws {
        var serve = serve
        serve.hostID = Self.newID()
        try add(HostedFanotify.prepare(serve, blob: blob, log: log))
    }
}
