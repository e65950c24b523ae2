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

/// What a lazy worker fetches without being asked.
public enum Prefetch: Sendable, Equatable {
    case none
    /// Everything, in the background.
    case all
    /// The ranges of a profile recorded by `--record-profile`, first-seen first.
    case profile(String)

    /// "none", "all" or a profile path.
    public init(argument: String) {
        switch argument {
        case "none": self = .none
        case "all": self = .all
        default: self = .profile(argument)
        }
    }

    public var argument: String {
        switch self {
        case .none: return "none"
        case .all: return "all"
        case .profile(let p): return p
        }
    }
}

extension Prefetch: Codable {
    public init(from decoder: Decoder) throws { self.init(argument: try decoder.singleValueContainer().decode(String.self)) }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(argument)
    }
}

/// A prefetch profile: a header line, then "OFFSET LENGTH" per line, in the order readers first
/// touched the ranges.
public enum PrefetchProfile {
    static let header = "erofs-compat-profile 1"

    public static func load(_ path: String) throws -> [(UInt64, UInt64)] {
        let bytes: [UInt8]
        do { bytes = try Sys.readFile(path) } catch { throw RuntimeError.badOptionValue("--prefetch \(path)", detail: "cannot read it: \(error)") }
        let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\n")
        guard lines.first.map(String.init) == header else {
            throw RuntimeError.badOptionValue("--prefetch \(path)", detail: "not a profile written by --record-profile")
        }
        var out: [(UInt64, UInt64)] = []
        for (i, l) in lines.dropFirst().enumerated() {
            let f = l.split(separator: " ")
            guard f.count == 2, let o = UInt64(f[0]), let n = UInt64(f[1]), n > 0 else {
                throw RuntimeError.badOptionValue("--prefetch \(path)", detail: "line \(i + 2) is not 'OFFSET LENGTH'")
            }
            out.append((o, n))
        }
        return out
    }

    static func save(_ ranges: [(UInt64, UInt64)], to path: String) throws {
        let text = ([header] + ranges.map { "\($0.0) \($0.1)" }).joined(separator: "\n") + "\n"
        try Sys.writeFileAtomically(path, Array(text.utf8))
    }
}

/// Serves FAN_PRE_ACCESS events on a lazy cache file, on the threads every server of the process
/// shares (`ServingPool`): the poller thread reads events and answers present ranges from the
/// population record without I/O; missing ones are fetched through the `LazyReader` (readahead,
/// prefetch, profile, commits and the digest check are its) on this server's demand lane and
/// answered FAN_ALLOW; a range that cannot be fetched is answered FAN_DENY_ERRNO(EIO), never FAN_ALLOW.
/// What is fanotify's is here: the group, decoding events, the fast path, answering, the journal,
/// and after the cache is complete removing the mark (or, after a digest mismatch, denying all).
public final class FanotifyServer: @unchecked Sendable {  // state behind locks; prefetch/profile/base set before start
    public struct Stats: Codable, Sendable, Equatable {
        public var events = 0
        public var allowedFromCache = 0
        public var fetched = 0
        public var denied = 0
        public var bytesFetched: UInt64 = 0
        public var requests = 0
        public var population = 0.0
        public var p50Ms = 0.0
        public var p99Ms = 0.0
        public var complete = false
        public var verified: Bool?
        public var error: String?
        /// Set when every block is checked against an fs-verity tree: blocks that failed the check.
        public var verityFailures: Int?
    }

    let lazy: LazyBlob
    let group: FileDescriptor
    let digest: String?
    let log: (String) -> Void
    private let stats = Locked(Stats())
    private let latencies = Locked<[Double]>([])
    private let stopping = Locked(false)
    public let workers: Int
    /// Fetching, readahead, prefetch, profile, commits and the digest check.
    let reader: LazyReader
    /// What to fetch in the background, at low priority (only while no reader is waiting).
    public var prefetch: Prefetch {
        get { reader.prefetch }
        set { reader.prefetch = newValue }
    }
    /// Where to record the ranges readers asked for, in first-seen order (a prefetch profile).
    public var recordProfile: String? {
        get { reader.recordProfile }
        set { reader.recordProfile = newValue }
    }
    /// Fetches for events, at most `workers` at once.
    private let demandLane: PoolLane
    /// What `start` registered, removed by the teardown after `stop()`.
    private let running = Locked<(poll: ServingPoller.Token?, started: Bool, tornDown: Bool)>((nil, false, false))
    private var onFinished: (() -> Void)?
    /// The mount's figures before this process started (the supervisor's metadata traffic, earlier
    /// workers' events and traffic): the counters carry on from them.
    public var base = Stats()

    /// Creates the group and places the mark. The lazy blob's writer was opened before, so its
    /// writes raise no events.
    /// Events read but not yet answered, journaled so a restarted worker can answer them: a response
    /// is matched by the event's fd number within the group, so it still works after the reader of
    /// the event died.
    let journal: FileDescriptor?

    /// Serves an existing group (inherited from the supervisor, mark already placed).
    public init(lazy: LazyBlob, groupFD: Int32, journalPath: String?, digest: String?, workers: Int = 4, log: @escaping (String) -> Void) throws {
        self.lazy = lazy
        self.digest = digest
        self.workers = workers
        self.log = log
        demandLane = PoolLane(limit: workers, priority: .demand)
        // A stream's readahead in 4 MiB aligned pieces, as for FUSE and NBD clients: over a registry
        // (slow per request) fewer, larger requests read a 256 MiB image 3-19 % faster than 1 MiB
        // unaligned windows did (`make bench` (a), the two binaries in the same run, twice).
        reader = LazyReader(lazy: lazy, digest: digest, readaheadFetches: 2 * workers, firstWindow: 128 << 10,
                            sequentialWindow: 4 << 20, aligned: true, log: log)
        group = FileDescriptor(rawValue: groupFD)
        journal = try journalPath.map { try Sys.open($0, O_RDWR | O_CREAT | O_APPEND, mode: 0o600) }
    }

    /// Creates a group and places the FAN_PRE_ACCESS mark on the cache file.
    public static func makeGroup(marking path: String) throws -> FileDescriptor {
        let group = try Fanotify.initGroup(Fanotify.classPreContent | Fanotify.cloexec | Fanotify.nonblock)
        do {
            try Fanotify.mark(group, flags: Fanotify.markAdd, mask: Fanotify.preAccess, path: path)
        } catch {
            Sys.close(group.rawValue)
            throw error
        }
        return group
    }

    func journalAppend(_ line: String) {
        guard let journal else { return }
        _ = try? Array(line.utf8).withUnsafeBytes { try Sys.write(journal.rawValue, $0) }
    }

    /// Answers the events a previous worker read but did not answer (from the journal), then
    /// empties the journal. Runs before any new event is read, so fd numbers cannot collide.
    public func replayJournal() {
        guard let journal else { return }
        let size = (try? Sys.fstat(journal.rawValue).st_size) ?? 0
        let bytes = (try? Sys.preadFully(journal.rawValue, count: Int(size), at: 0)) ?? []
        var pending: [Int32: (UInt64, UInt64)] = [:]
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count == 4, f[0] == "R", let fd = Int32(f[1]), let off = UInt64(f[2]), let cnt = UInt64(f[3]) { pending[fd] = (off, cnt) }
            if f.count == 2, f[0] == "A", let fd = Int32(f[1]) { pending[fd] = nil }
        }
        if !pending.isEmpty { log("answering \(pending.count) events left by a previous worker") }
        for (fd, r) in pending {
            let ev = Fanotify.Event(mask: Fanotify.preAccess, fd: fd, pid: 0, range: r)
            let start = DispatchTime.now().uptimeNanoseconds
            do {
                try reader.ensure(offset: r.0, count: r.1)
                answer(ev, Fanotify.allow, start: start, closeFD: false)
            } catch {
                answer(ev, Fanotify.denyErrno(.ioError), start: start, closeFD: false)
            }
        }
        try? Sys.ftruncate(journal.rawValue, 0)
    }

    deinit {
        Sys.close(group.rawValue)
        if let journal { Sys.close(journal.rawValue) }
    }

    /// The figures without the latency percentiles: cheap, for noticing a change (every answered event
    /// changes a counter).
    public var counters: Stats {
        var s = stats.get()
        s.events += base.events
        s.allowedFromCache += base.allowedFromCache
        s.fetched += base.fetched
        s.denied += base.denied
        // The reader's figures, carried on from the mount's earlier processes.
        let f = reader.figures
        (s.bytesFetched, s.requests) = (base.bytesFetched + f.bytesFetched, base.requests + f.requests)
        s.population = f.population
        s.verityFailures = f.verityFailures.map { (base.verityFailures ?? 0) + $0 }
        (s.complete, s.verified) = (f.complete, f.verified)
        if let e = f.error { s.error = e }
        return s
    }

    public var snapshot: Stats {
        var s = counters
        let l = latencies.get().sorted()
        if !l.isEmpty {
            s.p50Ms = l[l.count / 2]
            s.p99Ms = l[min(l.count - 1, l.count * 99 / 100)]
        }
        return s
    }

    /// Stops reading events; what was read is still answered, then the last commit is made and
    /// `start`'s `onFinished` runs (or `run` returns).
    public func stop() {
        stopping.set(true)
        let first = running.withLock { r -> Bool in
            defer { r.tornDown = true }
            return !r.tornDown && r.started
        }
        if first { ServingPool.shared.submit { [self] in tearDown() } }
    }

    /// Serves until `stop()`, blocking the caller.
    public func run() {
        let done = DispatchSemaphore(value: 0)
        start { done.signal() }
        done.wait()
    }

    /// Serves on the shared threads: events through the poller, fetches on this server's lanes,
    /// commits every 250 ms on the ticker. `onFinished` runs once serving has ended after `stop()`.
    public func start(onFinished: @escaping () -> Void) {
        self.onFinished = onFinished
        reader.queuedReaders = { [demandLane] in demandLane.pending }
        reader.onComplete = { [self] mismatch in finish(mismatch) }
        reader.start()
        // The poller thread must never block in read(2) (the group is made non-blocking, but one
        // inherited from elsewhere may not be).
        _ = fcntl(group.rawValue, F_SETFL, fcntl(group.rawValue, F_GETFL) | O_NONBLOCK)
        let poll = ServingPoller.shared.add(group.rawValue) { [self] in readEvents() }
        let stopped = running.withLock { r -> Bool in
            (r.poll, r.started) = (poll, true)
            return r.tornDown
        }
        // stop() came before the registration above: it could not tear down what was not there yet.
        if stopped {
            running.withLock { $0.tornDown = false }
            stop()
        }
    }

    /// After `stop()`: no more events, every event read answered, readahead dropped, the last
    /// commit made; then `onFinished`.
    private func tearDown() {
        running.withLock { $0.poll }.map(ServingPoller.shared.remove)
        demandLane.waitIdle()
        reader.stop()
        onFinished?()
    }

    /// On the poller thread: reads every event there is (the group is non-blocking), answers the
    /// present ranges at once and queues the rest on the demand lane.
    func readEvents() {
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while !stopping.get() {
            let n: Int
            do { n = try buf.withUnsafeMutableBytes { try Sys.read(group.rawValue, into: $0) } } catch { return }
            guard n > 0 else { return }
            let decoded = try? buf.withUnsafeBytes { try Fanotify.decode(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            guard let events = decoded else { return }
            stats.withLock { $0.events += events.count }
            journalAppend(events.map { "R \($0.fd) \($0.range?.offset ?? 0) \($0.range?.count ?? lazy.size)\n" }.joined())
            for ev in events {
                if let r = ev.range { reader.noteForProfile(r.offset, r.count) }
                let start = DispatchTime.now().uptimeNanoseconds
                // Present data (or a truncate, count 0) is answered right here without I/O.
                if let r = ev.range, r.count == 0 || lazy.isAvailable(offset: r.offset, length: r.count) {
                    answer(ev, Fanotify.allow, start: start)
                    stats.withLock { $0.allowedFromCache += 1 }
                } else {
                    demandLane.submit { [self] in serve(ev, since: start) }
                }
            }
        }
    }

    /// Fetches an event's range and answers it: FAN_ALLOW once present, EIO when it cannot be had.
    func serve(_ ev: Fanotify.Event, since start: UInt64) {
        let r = ev.range ?? (0, lazy.size)
        do {
            try reader.ensure(offset: r.offset, count: r.count)
            answer(ev, Fanotify.allow, start: start)
            stats.withLock { $0.fetched += 1 }
        } catch {
            log("denying read of \(r.count) bytes at \(r.offset) with EIO: \(error)")
            answer(ev, Fanotify.denyErrno(.ioError), start: start)
            stats.withLock { $0.denied += 1; $0.error = "\(error)" }
        }
    }

    func answer(_ ev: Fanotify.Event, _ response: UInt32, start: UInt64, closeFD: Bool = true) {
        // After a digest mismatch nothing is allowed any more, whatever the event's range.
        let verdict = reader.failed != nil ? Fanotify.denyErrno(.ioError) : response
        try? Fanotify.respond(group, fd: ev.fd, response: verdict)
        journalAppend("A \(ev.fd)\n")
        if closeFD, ev.fd >= 0 { Sys.close(ev.fd) }
        let ms = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6
        latencies.withLock { l in
            l.append(ms)
            if l.count > 10_000 { l.removeFirst(l.count - 10_000) }
        }
    }

    /// After a digest mismatch the bytes readers got were not the blob's: every mount of the cache
    /// file is detached (no new opens, no path to it), and the cache file's page cache dropped;
    /// reads that reach the cache file are denied by the mark that stays. What the kernel cannot
    /// take back: a file a process already has open keeps the pages EROFS itself cached.
    func detachAfterMismatch() {
        for m in Backends.kernelEROFSMounts(of: lazy.dataPath) {
            do { try MountAPI.umount(m.mountPoint, detach: true); log("detached \(m.mountPoint): the cache failed verification") } catch {
                log("cannot detach \(m.mountPoint) after the failed verification: \(error)")
            }
        }
        _ = posix_fadvise(lazy.writerFD, 0, 0, POSIX_FADV_DONTNEED)
    }

    /// Once the cache is complete (the reader checked the digest): removes the mark, so complete
    /// caches cost nothing extra; after a mismatch keeps it, so every further read is denied, and
    /// detaches the mounts that read the wrong bytes.
    func finish(_ mismatch: Error?) {
        if let mismatch {
            log("\(mismatch)")
            detachAfterMismatch()
            return
        }
        try? Fanotify.mark(group, flags: Fanotify.markRemove, mask: Fanotify.preAccess, path: lazy.dataPath)
        log("cache complete\(digest == nil ? "" : " and verified"); mark removed")
    }
}
