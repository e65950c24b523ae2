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
/// population record without I/O; missing ones are fetched (aligned, coalesced) on this server's
/// demand lane and answered FAN_ALLOW while its background lane fetches what a sequential reader
/// asks for next; a range that cannot be fetched is answered FAN_DENY_ERRNO(EIO), never FAN_ALLOW.
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
    /// Sequential streams seen recently: where each one's last request ended and its window. Several
    /// readers interleave their events, so each stream is recognised on its own.
    private let streams = Locked<[(end: UInt64, window: UInt64)]>([])
    private let stopping = Locked(false)
    private let marked = Locked(true)
    public let workers: Int
    /// What to fetch in the background, at low priority (only while no reader is waiting).
    public var prefetch: Prefetch = .none
    /// Where to record the ranges readers asked for, in first-seen order (a prefetch profile).
    public var recordProfile: String?
    private let profile = Locked<(ranges: [(UInt64, UInt64)], seen: Set<UInt64>, dirty: Bool)>(([], [], true))
    private let busy = Locked(0)
    /// Readahead windows waiting for a fetcher, oldest first (each has a job on `readaheadLane`).
    private let readahead = Locked<[(UInt64, UInt64)]>([])
    /// Fetches for events, at most `workers` at once.
    private let demandLane: PoolLane
    /// Readahead fetches, at most 2 × `workers` at once (large requests that overlap readers).
    private let readaheadLane: PoolLane
    private let prefetching = DispatchGroup()
    /// What `start` registered, removed by the teardown after `stop()`.
    private let running =
        Locked<(poll: ServingPoller.Token?, tick: ServingTicker.Token?, tornDown: Bool)>((nil, nil, false))
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
        readaheadLane = PoolLane(limit: 2 * workers, priority: .background)
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
                try fetch(offset: r.0, count: r.1)
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
        s.bytesFetched = base.bytesFetched + lazy.blob.bytesFetched.get()
        s.requests = base.requests + lazy.blob.requestCount.get()
        s.population = lazy.populationPercent
        if lazy.verifier != nil { s.verityFailures = (base.verityFailures ?? 0) + lazy.verityFailures.get() }
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
            return !r.tornDown && (r.poll != nil || r.tick != nil)
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
        if prefetch != .none {
            prefetching.enter()
            // Its own thread: it sleeps while readers are busy and ends when everything is fetched.
            Threads.detach { [self] in
                defer { prefetching.leave() }
                prefetchLoop()
            }
        }
        let tick = ServingTicker.shared.every(250) { [self] in
            commitAndMaybeFinish()
            saveProfile()
            return true
        }
        // The poller thread must never block in read(2) (the group is made non-blocking, but one
        // inherited from elsewhere may not be).
        _ = fcntl(group.rawValue, F_SETFL, fcntl(group.rawValue, F_GETFL) | O_NONBLOCK)
        let poll = ServingPoller.shared.add(group.rawValue) { [self] in readEvents() }
        let stopped = running.withLock { r -> Bool in
            (r.poll, r.tick) = (poll, tick)
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
        let (poll, tick) = running.withLock { ($0.poll, $0.tick) }
        poll.map(ServingPoller.shared.remove)
        tick.map(ServingTicker.shared.remove)
        demandLane.waitIdle()
        readahead.withLock { $0.removeAll() }
        readaheadLane.waitIdle()
        prefetching.wait()
        commitAndMaybeFinish()
        saveProfile()
        onFinished?()
    }

    /// Background fetching: the profile's ranges first, then (for `.all`) everything else in 1 MiB
    /// steps. Waits whenever readers have events queued or in flight, so it never competes with them.
    func prefetchLoop() {
        var ranges: [(UInt64, UInt64)] = []
        var all = false
        switch prefetch {
        case .none: return
        case .all: all = true
        case .profile(let path):
            do { ranges = try PrefetchProfile.load(path) } catch { log("prefetch profile \(path): \(error)") }
        }
        if all {
            var off: UInt64 = 0
            while off < lazy.size { ranges.append((off, min(1 << 20, lazy.size - off))); off += 1 << 20 }
        }
        var failures = 0
        for (offset, length) in ranges where offset < lazy.size {
            let len = min(length, lazy.size - offset)
            while !stopping.get(), busy.get() > 0 || demandLane.pending > 0 { usleep(20_000) }
            if stopping.get() { return }
            if lazy.isAvailable(offset: offset, length: len) { continue }
            do { try lazy.ensure(offset: offset, length: len) } catch {
                failures += 1
                if failures == 1 || failures % 100 == 0 { log("prefetch of \(len) bytes at \(offset) failed (\(failures) so far): \(error)") }
            }
        }
        log("prefetch done\(failures > 0 ? " with \(failures) failed ranges (fetched on demand instead)" : "")")
    }

    /// Notes a reader's range for the profile (first time each granule is touched).
    func noteForProfile(_ offset: UInt64, _ count: UInt64) {
        guard recordProfile != nil, count > 0 else { return }
        let g = lazy.granule
        profile.withLock { p in
            let first = offset / g, last = (offset + count - 1) / g
            guard (first...last).contains(where: { !p.seen.contains($0) }) else { return }
            for i in first...last { p.seen.insert(i) }
            p.ranges.append((offset, count))
            p.dirty = true
        }
    }

    func saveProfile() {
        guard let path = recordProfile else { return }
        let ranges: [(UInt64, UInt64)]? = profile.withLock { p in
            guard p.dirty else { return nil }
            p.dirty = false
            return p.ranges
        }
        guard let ranges else { return }
        do { try PrefetchProfile.save(ranges, to: path) } catch { log("cannot write the profile \(path): \(error)") }
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
                if let r = ev.range { noteForProfile(r.offset, r.count) }
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
        busy.withLock { $0 += 1 }
        defer { busy.withLock { $0 -= 1 } }
        do {
            try fetch(offset: r.offset, count: r.count)
            answer(ev, Fanotify.allow, start: start)
            stats.withLock { $0.fetched += 1 }
        } catch {
            log("denying read of \(r.count) bytes at \(r.offset) with EIO: \(error)")
            answer(ev, Fanotify.denyErrno(.ioError), start: start)
            stats.withLock { $0.denied += 1; $0.error = "\(error)" }
        }
    }

    /// The required range now, then the stream's readahead window after it in the background
    /// (`firstWindow`, then `sequentialWindow` doubling to `maxWindow` per sequential stream), so that
    /// a sequential reader finds its next range present or in flight: the transfer of what comes next
    /// overlaps the reading of this. A sequential reader that outran its readahead fetches a bigger
    /// piece itself (up to `LazyBlob.maxRequest`): fewer, larger requests, which is what servers slow
    /// per request (a registry) need; a read that continues no stream fetches only its own range.
    func fetch(offset: UInt64, count: UInt64) throws {
        let (window, sequential): (UInt64, Bool) = streams.withLock { list in
            // A stream continues when this read starts at (or inside the readahead of) its last end.
            if let i = list.firstIndex(where: { offset >= $0.end &- min($0.window, $0.end) && offset <= $0.end + $0.window }) {
                let w = min(max(list[i].window * 2, Self.sequentialWindow), Self.maxWindow)
                list.remove(at: i)
                list.append((offset + count + w, w))
                return (w, true)
            }
            if list.count >= 32 { list.removeFirst() }
            list.append((offset + count + Self.firstWindow, Self.firstWindow))
            return (Self.firstWindow, false)
        }
        let now = sequential ? max(count, min(window, lazy.maxRequest)) : count
        try lazy.ensure(offset: offset, length: now)
        scheduleReadahead(offset: offset + now, length: window)
    }

    /// A read that continues no stream may be random: a small readahead. A continuing stream gets at
    /// least `sequentialWindow`, doubling up to `maxWindow`.
    static let firstWindow: UInt64 = 128 << 10
    static let sequentialWindow: UInt64 = 1 << 20
    static let maxWindow: UInt64 = 16 << 20

    /// Queues a readahead window (the oldest dropped beyond 64 queued: their readers moved on).
    func scheduleReadahead(offset: UInt64, length: UInt64) {
        let len = min(offset + length, lazy.size) &- offset
        guard offset < lazy.size, !lazy.isAvailable(offset: offset, length: len) else { return }
        readahead.withLock { q in
            q.append((offset, len))
            if q.count > 64 { q.removeFirst(q.count - 64) }
        }
        readaheadLane.submit { [self] in readaheadOne() }
    }

    /// Fetches what nobody is fetching yet of the oldest queued readahead window (one request of at
    /// most 4 MiB at a time, each readable as soon as it is written); a failure only means the
    /// reader fetches that range itself when it gets there (and is denied EIO if that fails too).
    func readaheadOne() {
        guard !stopping.get(),
              let (offset, length) = readahead.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) else { return }
        do { try lazy.fetchUnclaimed(offset: offset, length: length) } catch {
            let failures = readaheadFailures.withLock { $0 += 1; return $0 }
            if failures == 1 || failures % 100 == 0 {
                log("readahead of \(length) bytes at \(offset) failed (\(failures) so far): \(error)")
            }
        }
    }
    private let readaheadFailures = Locked(0)

    func answer(_ ev: Fanotify.Event, _ response: UInt32, start: UInt64, closeFD: Bool = true) {
        if stats.get().verified == false { try? Fanotify.respond(group, fd: ev.fd, response: Fanotify.denyErrno(.ioError)) } else {
            try? Fanotify.respond(group, fd: ev.fd, response: response)
        }
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
        for m in MountInfo.current() where m.fsType == "erofs" && m.source == lazy.dataPath {
            do { try MountAPI.umount(m.mountPoint, detach: true); log("detached \(m.mountPoint): the cache failed verification") } catch {
                log("cannot detach \(m.mountPoint) after the failed verification: \(error)")
            }
        }
        _ = posix_fadvise(lazy.writerFD, 0, 0, POSIX_FADV_DONTNEED)
    }

    /// Commits written ranges; when everything is present verifies the digest and removes the mark,
    /// so complete caches cost nothing extra.
    func commitAndMaybeFinish() {
        do { try lazy.commit() } catch { log("commit failed: \(error)") }
        guard marked.get(), lazy.record.isComplete else { return }
        if let digest {
            do {
                try lazy.verify(sha256: digest)
                stats.withLock { $0.verified = true }
                BlobCache.promote(entry: lazy.dataPath, digest: digest)
            } catch {
                log("\(error)")
                stats.withLock { $0.verified = false; $0.error = "\(error)" }
                try? Sys.unlink(lazy.dataPath)
                try? Sys.unlink(lazy.record.path)
                marked.set(false)  // keep the mark: every further read is denied
                detachAfterMismatch()
                return
            }
        }
        try? Fanotify.mark(group, flags: Fanotify.markRemove, mask: Fanotify.preAccess, path: lazy.dataPath)
        marked.set(false)
        stats.withLock { $0.complete = true }
        log("cache complete\(digest == nil ? "" : " and verified"); mark removed")
    }
}
