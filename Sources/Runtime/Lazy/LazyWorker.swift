#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Glibc
import Remote
import Syscall
import SystemPackage

/// The per-mount worker process of the fanotify backend: it owns the fanotify group, fetches the
/// image's metadata before the mount, reports readiness on a pipe, serves events while the mount
/// exists, writes progress to a stats file, and exits when the mount is gone (also after a plain
/// umount(8)). Its standard streams are detached from the caller.
public enum LazyWorker {
    /// What a `__serve` process is told, as one Codable value handed over a pipe (never argv): the
    /// mount's `ServeSpec` (its blob and cache entry, credentials included), and the process's role
    /// and the descriptors it inherits.
    public struct Options: Sendable, Codable {
        /// The supervisor (owns the group, prepares, restarts) or its serving child.
        public enum Role: String, Codable, Sendable { case supervisor, worker }
        public var role = Role.supervisor
        public var serve: ServeSpec
        public var readyFD: Int32 = -1
        /// The supervisor that started this serving worker (its exit means the mount is being torn down).
        public var supervisorPID: Int32?
        /// Take over a mount another process prepared and served (the daemon, stopping): its group,
        /// cache writer and entry lock; no metadata fetch, no readiness line.
        public var adopt: Adopted?
        public struct Adopted: Codable, Sendable {
            public var group: Int32
            public var writer: Int32
            public var lock: Int32
        }
        /// The serving child's inherited group and cache writer, and its journal.
        public var groupFD: Int32 = -1
        public var writerFD: Int32 = -1
        public var journal = ""
        /// Seconds the metadata fetch before the mount may take.
        public var prepareTimeout: Double?

        public init(serve: ServeSpec) { self.serve = serve }

        /// The blob and its cache entry: every fanotify mount has one.
        public var blob: BlobSpec {
            get throws {
                guard let b = serve.blob else { throw RuntimeError.state("the serve spec names no remote blob") }
                return b
            }
        }

        /// The registry's credentials, from the spec.
        var auth: RegistryAuth? { get throws { try serve.registryAuth() } }

        /// The blob as the mount learned it (no request to the server).
        func openBlob() throws -> HTTPBlob { try blob.open(auth: auth) }

        /// The blob's cache through a verifier when the spec names a tree.
        func lazyBlob(_ blob: HTTPBlob, writerFD: Int32? = nil) throws -> LazyBlob {
            try self.blob.lazyBlob(blob, writerFD: writerFD)
        }
    }

    public static func log(_ s: String) {
        let line = "\(Date()) erofs-compat worker[\(Sys.processID)]: \(s)\n"
        _ = try? FileDescriptor.standardError.writeAll(Array(line.utf8))
    }

    /// The supervisor: owns the fanotify group and the cache writer, fetches the metadata, reports
    /// readiness, then runs the serving worker as a child and restarts it if it dies. Because the
    /// supervisor keeps the group open, a worker crash never lets the kernel answer pending reads
    /// with FAN_ALLOW (which would hand readers zeros); the restarted worker answers the events its
    /// predecessor had read, from the journal. Returns its exit status.
    public static func run(_ o: Options) -> Int32 {
        func ready(_ line: String) {
            _ = try? Array((line + "\n").utf8).withUnsafeBytes { try Sys.write(o.readyFD, $0) }
            Sys.close(o.readyFD)
        }
        let lazy: LazyBlob
        let group: FileDescriptor
        let entryLock: FileDescriptor
        if let a = o.adopt {
            do {
                lazy = try o.lazyBlob(o.openBlob(), writerFD: a.writer)
            } catch {
                // Never close the group here: answer everything with EIO until the mount is gone.
                log("cannot take over \(o.serve.mountpoint): \(error)")
                denyUntilUnmounted(group: FileDescriptor(rawValue: a.group), writerFD: a.writer,
                                   journal: o.serve.journalPath, o)
                return 1
            }
            (group, entryLock) = (FileDescriptor(rawValue: a.group), FileDescriptor(rawValue: a.lock))
            log("took over \(o.serve.mountpoint)")
        } else {
            do {
                // One writer per cache entry, for the supervisor's whole life (released when it exits).
                entryLock = try BlobCache.lockForWriting(entry: o.blob.entry)
                let blob = try o.openBlob()
                blob.setDeadline(seconds: o.prepareTimeout)
                (lazy, group) = try prepareCache(o.lazyBlob(blob), statsPath: o.serve.statsPath, log: log)
                blob.setDeadline(seconds: nil)
            } catch {
                log("failed: \(error)")
                ready("error: \(error)")
                return 1
            }
        }
        defer { Sys.close(entryLock.rawValue) }
        let journal = o.serve.journalPath
        if o.adopt == nil { try? Sys.unlink(journal) }
        var restarts = 0
        var readySent = o.adopt != nil
        var child = o
        (child.role, child.readyFD, child.adopt, child.supervisorPID) = (.worker, -1, nil, Sys.processID)
        (child.groupFD, child.writerFD, child.journal) = (group.rawValue, lazy.writerFD, journal)
        while true {
            // The entry lock goes to the worker too: the entry stays locked until the last process
            // holding the fanotify group (and its mark) is gone, so a new writer cannot open the file
            // while a mark is still in place (its own reads would then raise events nobody answers).
            let pid: Int32
            do {
                pid = try spawnServe(child, keep: [group.rawValue, lazy.writerFD, entryLock.rawValue])
            } catch {
                log("cannot start the worker: \(error)")
                if !readySent { ready("error: cannot start the worker: \(error)") }
                return 1
            }
            if !readySent {
                ready("ready")
                readySent = true
            }
            let started = DispatchTime.now().uptimeNanoseconds
            let (code, signal) = Sys.wait(pid)
            if code == 0 { return 0 }
            // Crashes far apart do not add up to giving up.
            if DispatchTime.now().uptimeNanoseconds - started > 60_000_000_000 { restarts = 0 }
            restarts += 1
            log("worker \(pid) died (\(signal.map { "signal \($0)" } ?? "exit \(code ?? -1)")); restart \(restarts)")
            guard restarts <= 50 else {
                log("giving up after \(restarts) restarts: denying every read with EIO until the mount is gone")
                denyUntilUnmounted(group: group, writerFD: lazy.writerFD, journal: journal, o)
                return 1
            }
            usleep(UInt32(min(restarts, 10)) * 50_000)
        }
    }

    /// Last resort when no worker can run: the group must stay open (closing it would let the kernel
    /// allow pending reads, handing out zeros), so answer everything with EIO until the mount goes.
    static func denyUntilUnmounted(group: FileDescriptor, writerFD: Int32, journal: String, _ o: Options) {
        let bytes = (try? Sys.open(journal, O_RDONLY)).map { fd -> [UInt8] in
            defer { Sys.close(fd.rawValue) }
            return (try? Sys.preadFully(fd.rawValue, count: 1 << 22, at: 0)) ?? []
        } ?? []
        var pending = Set<Int32>()
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count == 4, f[0] == "R", let fd = Int32(f[1]) { pending.insert(fd) }
            if f.count == 2, f[0] == "A", let fd = Int32(f[1]) { pending.remove(fd) }
        }
        for fd in pending { try? Fanotify.respond(group, fd: fd, response: Fanotify.denyErrno(.ioError)) }
        let gone = Locked(false)
        let entry = (try? o.blob.entry) ?? ""
        Threads.detach {
            watchMount(o.serve.mountpoint, source: entry, parent: getppid(), writerFD: writerFD)
            gone.set(true)
        }
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while !gone.get() {
            guard (try? Sys.poll(group.rawValue, timeoutMs: 200)) == true,
                  let n = try? buf.withUnsafeMutableBytes({ try Sys.read(group.rawValue, into: $0) }),
                  let events = try? buf.withUnsafeBytes({ try Fanotify.decode(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }) else { continue }
            for ev in events {
                try? Fanotify.respond(group, fd: ev.fd, response: Fanotify.denyErrno(.ioError))
                if ev.fd >= 0 { Sys.close(ev.fd) }
            }
        }
    }

    /// The serving worker, started by the supervisor with the group and writer descriptors.
    public static func runWorker(_ o: Options, groupFD: Int32, writerFD: Int32, journal: String) -> Int32 {
        let server: FanotifyServer
        let entry: String
        do {
            let lazy = try o.lazyBlob(o.openBlob(), writerFD: writerFD)
            server = try makeServer(lazy, groupFD: groupFD, journal: journal, o, log: log)
            entry = try o.blob.entry
        } catch {
            log("worker failed to start: \(error)")
            return 2
        }
        let (mountpoint, statsPath) = (o.serve.mountpoint, o.serve.statsPath)
        server.replayJournal()
        writeStats(server.snapshot, to: statsPath)
        let stop = Locked(false)
        let parent = o.supervisorPID ?? getppid()
        Threads.detach {
            watchMount(mountpoint, source: entry, parent: parent, writerFD: writerFD)
            stop.set(true)
            server.stop()
        }
        Threads.detach { writeStatsOnChange(server, to: statsPath, until: stop) }
        server.run()
        writeStats(server.snapshot, to: statsPath)
        log("mount \(mountpoint) is gone; exiting")
        return 0
    }

    /// Before a lazy mount: opens the cache writer (before the mark, so its writes raise no events),
    /// marks the cache file, fetches every metadata range and writes the mount's first figures (the
    /// metadata traffic; each worker carries on from the last figures written, so `status` counts the
    /// whole mount, across restarts too).
    /// `commit` false: the caller serves with this same LazyBlob, whose committer records the
    /// metadata present moments later (the mount need not wait for an fdatasync).
    static func prepareCache(_ lazy: LazyBlob, statsPath: String, commit: Bool = true,
                             log: (String) -> Void) throws -> (lazy: LazyBlob, group: FileDescriptor) {
        let blob = lazy.blob
        let group = try FanotifyServer.makeGroup(marking: lazy.dataPath)
        do {
            let meta = try lazy.fetchMetadata(commit: commit)
            log("metadata ready: \(meta.totalBytes) bytes in \(meta.ranges.count) ranges of \(blob.size)")
            var first = FanotifyServer.Stats()
            (first.bytesFetched, first.requests) = (blob.bytesFetched.get(), blob.requestCount.get())
            first.population = lazy.populationPercent
            writeStats(first, to: statsPath)
            return (lazy, group)
        } catch {
            Sys.close(group.rawValue)
            throw error
        }
    }

    /// Starts a detached supervisor that takes over a mount (`adopt`): the daemon's hand-over on a
    /// clean stop. The descriptors stay open here too until the caller closes them.
    static func spawnSupervisor(_ serve: ServeSpec, group: Int32, writer: Int32, lock: Int32) throws -> Int32 {
        var spec = Options(serve: serve)
        spec.adopt = Options.Adopted(group: group, writer: writer, lock: lock)
        (spec.groupFD, spec.writerFD) = (group, writer)
        return try spawnServe(spec, keep: [group, writer, lock])
    }

    /// Starts `erofs-compat __serve` with `spec` on a pipe (`--spec-fd`) and the descriptors in
    /// `keep` inherited; its output goes to the mount's log.
    static func spawnServe(_ spec: Options, keep: [Int32], executable: String = Sys.executablePath()) throws -> Int32 {
        let specFD = try Sys.pipe(holding: [UInt8](JSONEncoder().encode(spec)))
        defer { Sys.close(specFD) }
        return try Sys.spawnDetached(executable, serveArguments(spec, specFD: specFD), keep: keep + [specFD],
                                     logPath: StateStore.sibling(of: spec.serve.statsPath, ".log"))
    }

    /// `__serve`'s arguments: the spec's descriptor, and the cache file as a label only (the spec
    /// decides): `umount` signals a recorded pid only when its command line names the record's cache.
    static func serveArguments(_ spec: Options, specFD: Int32) -> [String] {
        ["__serve", "--spec-fd", String(specFD), "--data", spec.serve.blob?.entry ?? ""]
    }

    /// The spec a `__serve` process was started with.
    public static func readSpec(fd: Int32) throws -> Options {
        defer { Sys.close(fd) }
        return try JSONDecoder().decode(Options.self, from: Data(Sys.readAll(fd)))
    }

    /// A server for `lazy` on the group, carrying on from the mount's last figures.
    static func makeServer(_ lazy: LazyBlob, groupFD: Int32, journal: String, _ o: Options,
                           log: @escaping (String) -> Void) throws -> FanotifyServer {
        let blob = try o.blob
        let server = try FanotifyServer(lazy: lazy, groupFD: groupFD, journalPath: journal, digest: blob.digest,
                                        log: log)
        server.prefetch = blob.prefetch
        server.recordProfile = blob.recordProfile
        server.base = previousStats(o.serve.statsPath) ?? FanotifyServer.Stats()
        return server
    }

    /// Writes the server's figures within 0.1 s of a change (a SIGKILLed worker loses at most that
    /// much; its successor carries on from what was written), and not at all while nothing changes,
    /// until `stop`.
    static func writeStatsOnChange(_ server: FanotifyServer, to path: String, until stop: Locked<Bool>) {
        var written = server.counters
        while !stop.get() {
            usleep(100_000)
            written = writeStatsIfChanged(server, to: path, since: written)
        }
    }

    /// The last figures written for this mount, if any.
    static func previousStats(_ path: String) -> FanotifyServer.Stats? {
        guard let bytes = try? Sys.readFile(path) else { return nil }
        return try? JSONDecoder().decode(FanotifyServer.Stats.self, from: Data(bytes))
    }

    static func writeStats(_ s: FanotifyServer.Stats, to path: String) {
        guard let data = try? JSONEncoder().encode(s) else { return }
        try? Sys.writeFileAtomically(path, [UInt8](data))
    }

    /// Returns once the mount of `source` at `mountpoint` has appeared and every mount of it is gone
    /// again (see `MountWatch`), or when `stop` is set. mountinfo signals changes with POLLPRI.
    static func watchMount(_ mountpoint: String, source: String, parent: Int32, writerFD: Int32? = nil, stop: Locked<Bool>? = nil) {
        let watch = MountWatch(mountpoint, source: source, parent: parent, writerFD: writerFD)
        while stop?.get() != true, !watch.isGone() { watch.waitForChange() }
    }

    /// Writes the server's figures when they changed since `written` (every answered event changes a
    /// counter); returns the figures now.
    static func writeStatsIfChanged(_ server: FanotifyServer, to path: String, since written: FanotifyServer.Stats)
        -> FanotifyServer.Stats {
        let now = server.counters
        if now != written { writeStats(server.snapshot, to: path) }
        return now
    }
}

/// Whether a mount of `source` (the one at `mountpoint`, or another sharing its server) has
/// appeared and every mount of `source` is gone again — gone meaning its superblock was shut down, so a
/// lazy umount (`umount -l`) with files still open keeps it served until the last of them is closed
/// (inotify's IN_UNMOUNT on each mount's root). Also gone when no mount appeared within 120 s.
///
/// The decisive test is the cache file itself: a file-backed superblock holds it open until it is
/// shut down, which a write lease on `writerFD` detects (`Sys.fileIsShared`). So a mount that was
/// made and lazily detached before the first look at mountinfo is still served while a file on it
/// is open. One look per `isGone()`: a blocking watcher loops with `waitForChange()`, the daemon
/// asks from its ticker.
final class MountWatch: @unchecked Sendable {  // used by one thread at a time (a ticker task never overlaps itself)
    let mountpoint: String
    let source: String
    let parent: Int32
    let writerFD: Int32?
    private var seen = false
    private var watchedMounts = Set<Int>()
    private var liveWatches = Set<Int32>()
    private var lastMounts: [MountInfoEntry] = []
    private let notify: FileDescriptor?
    private let mountinfo: FileDescriptor?
    private let deadline = DispatchTime.now() + .seconds(120)

    init(_ mountpoint: String, source: String, parent: Int32, writerFD: Int32?) {
        // A lease break signals its holder with SIGIO (default: terminate); the lease is held for two
        // syscalls only, so an opener merely waits for it.
        signal(SIGIO, SIG_IGN)
        (self.mountpoint, self.source, self.parent, self.writerFD) = (mountpoint, source, parent, writerFD)
        notify = try? Sys.inotifyInit()
        mountinfo = try? Sys.open("/proc/self/mountinfo", O_RDONLY)
    }

    deinit {
        notify.map { Sys.close($0.rawValue) }
        mountinfo.map { Sys.close($0.rawValue) }
    }

    private func stillReferenced() -> Bool { writerFD.flatMap { try? Sys.fileIsShared($0) } ?? false }

    /// One look at mountinfo, the unmount watches and the cache file.
    func isGone() -> Bool {
        guard mountinfo != nil else { return true }
        // A supervisor that is gone (umount stops it) means the mount was made.
        if getppid() != parent { seen = true }
        let mounts = Backends.kernelEROFSMounts(of: source)
        lastMounts = mounts
        // Any mount of the cache file counts: a second mount shares this server, and the first may
        // be gone again before a freshly started server first looks.
        if !mounts.isEmpty { seen = true }
        if let notify {
            for m in mounts where !watchedMounts.contains(m.mountID) {
                watchedMounts.insert(m.mountID)
                let wd = try? Sys.inotifyWatchUnmount(notify, m.mountPoint, device: m.device)
                if let wd { liveWatches.insert(wd) }
            }
            liveWatches.subtract(Sys.inotifyEndedWatches(notify))
        }
        if seen && mounts.isEmpty && liveWatches.isEmpty && !stillReferenced() { return true }
        if !seen && DispatchTime.now() > deadline {
            // Never seen: mounted and detached before the first look, or never mounted at all.
            if !stillReferenced() { return true }
            seen = true
        }
        return false
    }

    /// How long to go without a look when mountinfo does not change: 1 s, 250 ms while only open
    /// files keep a detached mount alive (their close is not signalled).
    private var lookIntervalMs: Int32 { liveWatches.isEmpty || !lastMounts.isEmpty ? 1000 : 250 }
    private var lastLook: UInt64?

    /// Waits for mountinfo to change (POLLPRI), at most `lookIntervalMs`.
    func waitForChange() { _ = mountinfoChanged(waitingMs: lookIntervalMs) }

    /// For a caller that asks often (the daemon's ticker): looks only when mountinfo changed or the
    /// interval `waitForChange` would wait has passed, so an idle mount costs a poll(2), not a parse.
    func isGoneWhenDue() -> Bool {
        let now = DispatchTime.now().uptimeNanoseconds
        let due = lastLook.map { now - $0 >= UInt64(lookIntervalMs) * 1_000_000 } ?? true
        guard mountinfoChanged(waitingMs: 0) || due else { return false }
        lastLook = now
        return isGone()
    }

    /// Whether mountinfo signalled a change within `waitingMs` (the signal is consumed).
    private func mountinfoChanged(waitingMs: Int32) -> Bool {
        guard let fd = mountinfo else { return false }
        let events = Int16(POLLPRI | POLLERR)
        guard (try? Sys.poll(fd.rawValue, events: events, timeoutMs: waitingMs)) == true else { return false }
        var b = [UInt8](repeating: 0, count: 4096)
        _ = try? b.withUnsafeMutableBytes { try Sys.pread(fd.rawValue, into: $0, at: 0) }
        return true
    }
}
