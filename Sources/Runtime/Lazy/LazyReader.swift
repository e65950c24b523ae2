import Dispatch
import Glibc
import Remote
import Syscall

/// What a lazy reader has done, the same for every backend that serves through one: `status`
/// shows it for fanotify, FUSE and NBD mounts alike.
public struct LazyFigures: Codable, Sendable, Equatable {
    public var bytesFetched: UInt64 = 0
    /// HTTP requests made for the blob.
    public var requests = 0
    /// How much of the blob is in the cache, in percent.
    public var population = 0.0
    public var complete = false
    /// After completion: whether the digest matched (nil: no digest known).
    public var verified: Bool?
    public var error: String?
    /// Set when every block is checked against an fs-verity tree: blocks that failed the check.
    public var verityFailures: Int?
}

/// The lazy reader every serving backend reads through (fanotify events, FUSE and NBD requests): it
/// knows nothing of how a read arrived. Over the granule cache of a `LazyBlob` (coalescing and
/// in-flight dedup are the blob's) it adds per-stream readahead, prefetch (all, or a profile),
/// profile recording, commit batching and the digest check once the cache is complete. A range
/// that cannot be fetched throws: the caller answers EIO, never zeros.
final class LazyReader: @unchecked Sendable {  // state behind locks; prefetch/recordProfile/hooks set before start
    let lazy: LazyBlob
    let digest: String?
    let log: (String) -> Void
    /// What to fetch in the background, at low priority (only while no reader is waiting).
    var prefetch: Prefetch = .none
    /// Where to record the ranges readers asked for, in first-seen order (a prefetch profile).
    var recordProfile: String?
    /// Readers queued by the caller but not in `ensure` yet (prefetch waits for them too).
    var queuedReaders: () -> Int = { 0 }
    /// Runs once, when the cache is complete: nil after the digest matched (or there is none), the
    /// error after it did not — the entry is discarded then and every further read fails.
    var onComplete: ((Error?) -> Void)?

    /// Sequential streams seen recently: where each one's last request ended and its window. Several
    /// readers interleave, so each stream is recognised on its own.
    private let streams = Locked<[(end: UInt64, window: UInt64)]>([])
    private let profile = Locked<(ranges: [(UInt64, UInt64)], seen: Set<UInt64>, dirty: Bool)>(([], [], true))
    /// Readers inside `ensure` now.
    private let busy = Locked(0)
    /// Readahead windows waiting for a fetcher, oldest first (each has a job on `readaheadLane`).
    /// Queued readahead windows; `aligned`: fetched in whole chunks (a stream's, not a random read's).
    private let readahead = Locked<[(offset: UInt64, length: UInt64, aligned: Bool)]>([])
    private let readaheadLane: PoolLane
    private let readaheadFailures = Locked(0)
    private let prefetching = DispatchGroup()
    private let stopping = Locked(false)
    /// Set when the check of the complete cache began (it runs once).
    private let completed = Locked(false)
    /// Set when that check ended: passed (or there was no digest).
    private let checked = Locked(false)
    private let failure = Locked<String?>(nil)
    private let tick = Locked<ServingTicker.Token?>(nil)
    /// The blob's fetched-bytes counter at the last tick, and when the last commit ran.
    private let commitPace = Locked<(fetched: UInt64, at: UInt64)>((0, 0))

    /// Readahead after a read that continues no stream (it may be random).
    let firstWindow: UInt64
    /// The first window of a stream that continues, doubling up to `maxWindow`.
    let sequentialWindow: UInt64
    /// Sequential fetches and readahead in `chunk`-aligned pieces: requests of one stream in flight
    /// together (a FUSE or NBD client's queue, fanotify events of one file's readahead) join one fetch.
    let aligned: Bool

    /// `readaheadFetches`: background fetches at once (large requests that overlap readers);
    /// `firstWindow`: readahead after a read that continues no stream — some for fanotify, whose
    /// events come per page-cache miss, none for NBD and FUSE clients, whose requests are their own.
    /// `sequentialWindow`: where a continuing stream's readahead starts (4 MiB: a reader walking files
    /// in image order reads the blob sequentially, across file boundaries too).
    init(lazy: LazyBlob, digest: String?, readaheadFetches: Int = 8, firstWindow: UInt64 = 0,
         sequentialWindow: UInt64 = 4 << 20, aligned: Bool = true, log: @escaping (String) -> Void) {
        (self.lazy, self.digest, self.log, self.firstWindow) = (lazy, digest, log, firstWindow)
        (self.sequentialWindow, self.aligned) = (sequentialWindow, aligned)
        readaheadLane = PoolLane(limit: readaheadFetches, priority: .background)
    }

    /// Set once the complete cache failed its digest check: every read fails from then on.
    var failed: String? { failure.get() }

    /// What this reader has done so far (this process's part of it).
    var figures: LazyFigures {
        var f = LazyFigures()
        (f.bytesFetched, f.requests) = (lazy.blob.bytesFetched.get(), lazy.blob.requestCount.get())
        f.population = lazy.populationPercent
        // Complete and verified only once the check has ended (it reads the whole blob first).
        f.complete = checked.get()
        if digest != nil, checked.get() || failure.get() != nil { f.verified = failure.get() == nil }
        f.error = failure.get()
        if lazy.verifier != nil { f.verityFailures = lazy.verityFailures.get() }
        return f
    }

    func isAvailable(offset: UInt64, length: UInt64) -> Bool { lazy.isAvailable(offset: offset, length: length) }

    /// Starts prefetching (its own thread, which sleeps while readers wait and ends when done) and
    /// the commits (checked every 250 ms on the shared ticker; `commitWhenDue`).
    func start() {
        if prefetch != .none {
            prefetching.enter()
            Threads.detach { [self] in
                defer { prefetching.leave() }
                prefetchLoop()
            }
        }
        tick.set(ServingTicker.shared.every(250) { [self] in
            commitWhenDue()
            saveProfile()
            return true
        })
    }

    /// Stops the background work, waits for it, and makes the last commit.
    func stop() {
        stopping.set(true)
        if let t = tick.withLock({ t -> ServingTicker.Token? in defer { t = nil }; return t }) {
            ServingTicker.shared.remove(t)
        }
        readahead.withLock { $0.removeAll() }
        readaheadLane.waitIdle()
        prefetching.wait()
        commitAndCheck()
        saveProfile()
    }

    /// Makes [offset, offset+count) present: the range now, then the stream's readahead window after
    /// it in the background (`firstWindow`, then `sequentialWindow` doubling to `maxWindow` per
    /// stream; a read within `slack` of a stream's end, or inside its window, continues it), so
    /// that a sequential reader finds its next range present or in flight. A sequential reader that
    /// outran its readahead fetches a bigger piece itself (up to `LazyBlob.maxRequest`):
    /// fewer, larger requests, which is what servers slow per request (a registry) need; a read that
    /// continues no stream fetches only its own range. Throws when it cannot be had.
    func ensure(offset: UInt64, count: UInt64) throws {
        if let why = failure.get() { throw RemoteError.cache(why) }
        busy.withLock { $0 += 1 }
        defer { busy.withLock { $0 -= 1 } }
        let (window, sequential): (UInt64, Bool) = streams.withLock { list in
            // A stream continues when this read starts at (or inside the readahead of) its last end.
            if let i = list.firstIndex(where: { s in
                let reach = max(s.window, Self.slack)
                return offset >= s.end &- min(reach, s.end) && offset <= s.end + reach
            }) {
                let w = min(max(list[i].window * 2, sequentialWindow), Self.maxWindow)
                list.remove(at: i)
                list.append((offset + count + w, w))
                return (w, true)
            }
            if list.count >= 32 { list.removeFirst() }
            list.append((offset + count + firstWindow, firstWindow))
            return (firstWindow, false)
        }
        // Aligned, a sequential piece ends on a chunk boundary: requests in flight together (a
        // client's queue) then ask for the same piece and join one fetch instead of each fetching a
        // sliver.
        var end = offset + count
        if sequential {
            end = offset + max(count, min(window, Self.chunk))
            if aligned { end = (end + Self.chunk - 1) / Self.chunk * Self.chunk }
        }
        end = min(end, lazy.size)
        try lazy.ensure(offset: offset, length: end - offset)
        if window > 0 { scheduleReadahead(offset: end, length: window, aligned: aligned && sequential) }
    }

    /// A continuing stream's window doubles up to `maxWindow`; requests in flight arrive out of
    /// order, so a stream is continued by reads up to `slack` away from its end.
    static let slack: UInt64 = 128 << 10
    /// Sequential fetches and readahead go in pieces aligned to this (one request each).
    static let chunk: UInt64 = 4 << 20
    static let maxWindow: UInt64 = 16 << 20

    /// The readahead piece of a window: `chunk`, and `lazy.maxRequest` (16 MiB unchecked) once the
    /// stream's window is at `maxWindow` — a stream that has run that far streams on. A registry
    /// pays per request: docker-registry used 41 ticks of CPU to send 256 MiB in 4 MiB ranges, 25 in
    /// 16 MiB ranges, 12-13 in one response, and on two cores that CPU is the stream's. A reader only
    /// waits for a whole piece when it catches up with one in flight; its own fetches stay `chunk`.
    func piece(of window: UInt64) -> UInt64 {
        window >= Self.maxWindow ? max(Self.chunk, lazy.maxRequest / Self.chunk * Self.chunk) : Self.chunk
    }

    /// Notes a reader's range for the profile (first time each granule is touched): the caller notes
    /// every read, also those answered from the cache without `ensure`.
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

    /// Queues a readahead window (the oldest dropped beyond 64 queued: their readers moved on).
    private func scheduleReadahead(offset: UInt64, length: UInt64, aligned: Bool) {
        let len = min(offset + length, lazy.size) &- offset
        guard offset < lazy.size, !stopping.get(), !lazy.isAvailable(offset: offset, length: len) else { return }
        readahead.withLock { q in
            q.append((offset, len, aligned))
            if q.count > 64 { q.removeFirst(q.count - 64) }
        }
        readaheadLane.submit { [self] in readaheadOne() }
    }

    /// Fetches what nobody is fetching yet of the oldest queued readahead window, a stream's in
    /// aligned pieces where `aligned` (`piece(of:)`, one request each, to the piece's end; else
    /// requests of up to `lazy.maxRequest`), each readable as soon as it is written (a reader that
    /// catches up joins it); a failure only means the reader fetches that range itself when it gets
    /// there (and gets EIO if that fails too). A random read's small window is fetched as it is,
    /// not rounded out to a piece.
    private func readaheadOne() {
        guard !stopping.get(),
              let (offset, length, aligned) = readahead.withLock({ $0.isEmpty ? nil : $0.removeFirst() })
        else { return }
        do {
            guard aligned else { return try lazy.fetchUnclaimed(offset: offset, length: length) }
            let piece = piece(of: length)
            var pos = offset / piece * piece
            while pos < offset + length, !stopping.get() {
                let from = max(pos, offset)
                try lazy.fetchUnclaimed(offset: from, length: min(pos + piece, lazy.size) - from)
                pos += piece
            }
        } catch {
            let failures = readaheadFailures.withLock { $0 += 1; return $0 }
            if failures == 1 || failures % 100 == 0 {
                log("readahead of \(length) bytes at \(offset) failed (\(failures) so far): \(error)")
            }
        }
    }

    /// Background fetching: the profile's ranges first, then (for `.all`) everything else in 1 MiB
    /// steps. Waits whenever readers are waiting, so it never competes with them.
    private func prefetchLoop() {
        var ranges: [(UInt64, UInt64)] = []
        switch prefetch {
        case .none: return
        case .all:
            var off: UInt64 = 0
            while off < lazy.size { ranges.append((off, min(1 << 20, lazy.size - off))); off += 1 << 20 }
        case .profile(let path):
            do { ranges = try PrefetchProfile.load(path) } catch { log("prefetch profile \(path): \(error)") }
        }
        var failures = 0
        for (offset, length) in ranges where offset < lazy.size {
            let len = min(length, lazy.size - offset)
            while !stopping.get(), busy.get() > 0 || queuedReaders() > 0 { usleep(20_000) }
            if stopping.get() || failure.get() != nil { return }
            if lazy.isAvailable(offset: offset, length: len) { continue }
            do { try lazy.ensure(offset: offset, length: len) } catch {
                failures += 1
                if failures == 1 || failures % 100 == 0 {
                    log("prefetch of \(len) bytes at \(offset) failed (\(failures) so far): \(error)")
                }
            }
        }
        log("prefetch done\(failures > 0 ? " with \(failures) failed ranges (fetched on demand instead)" : "")")
    }

    /// How long a commit may wait while fetches keep streaming.
    static let busyCommitInterval: UInt64 = 2_000_000_000

    /// Commits once fetching paused since the last tick (a finished stream, a complete blob), or every
    /// `busyCommitInterval` while it streams. A commit's fdatasync in the middle of a stream forces
    /// the writeback a plain download leaves to the kernel for later, and its disk and CPU time are the
    /// stream's: `nbdcopy` of a cold 256 MiB export over docker-registry took 1.22x a pull with commits
    /// every 250 ms, 1.03x with commits every 5 s (7 alternating runs). Waiting costs only a refetch of
    /// what was not recorded yet, after a crash: the record never names bytes that are not durable.
    private func commitWhenDue() {
        let fetched = lazy.blob.bytesFetched.get()
        let now = DispatchTime.now().uptimeNanoseconds
        let due = commitPace.withLock { p -> Bool in
            defer { p.fetched = fetched }
            guard fetched == p.fetched || now - p.at >= Self.busyCommitInterval else { return false }
            p.at = now
            return true
        }
        if due { commitAndCheck() }
    }

    /// Commits what was fetched; the first time the cache is complete, checks the digest (and links
    /// the entry under it) or, on a mismatch, discards the entry and fails every further read.
    func commitAndCheck() {
        do { try lazy.commit() } catch { log("commit failed: \(error)") }
        guard lazy.record.isComplete, !completed.withLock({ c in defer { c = true }; return c }) else { return }
        var mismatch: Error?
        if let digest {
            do {
                try lazy.verify(sha256: digest)
                BlobCache.promote(entry: lazy.dataPath, digest: digest)
            } catch {
                mismatch = error
                failure.set("\(error)")
                BlobCache.discard(entry: lazy.dataPath)
            }
        }
        if mismatch == nil { checked.set(true) }
        onComplete?(mismatch)
    }

    private func saveProfile() {
        guard let path = recordProfile else { return }
        let ranges: [(UInt64, UInt64)]? = profile.withLock { p in
            guard p.dirty else { return nil }
            p.dirty = false
            return p.ranges
        }
        guard let ranges else { return }
        do { try PrefetchProfile.save(ranges, to: path) } catch { log("cannot write the profile \(path): \(error)") }
    }
}
