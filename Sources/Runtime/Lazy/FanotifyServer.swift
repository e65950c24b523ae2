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

/// Serves FAN_PRE_ACCESS events on a lazy cache file: one thread reads events and hands them to a
/// fetch pool; present ranges are answered from the population record without I/O; missing ones
/// are fetched (aligned, coalesced, grown by an adaptive readahead window for sequential readers)
/// and answered FAN_ALLOW; a range that cannot be fetched is answered FAN_DENY_ERRNO(EIO), never
/// FAN_ALLOW.
public final class FanotifyServer: @unchecked Sendable {
    public struct Stats: Codable, Sendable {
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
    }

    let lazy: LazyBlob
    let group: FileDescriptor
    let digest: String?
    let log: (String) -> Void
    private let queue = Locked<[Fanotify.Event]>([])
    private let pending = DispatchSemaphore(value: 0)
    private let stats = Locked(Stats())
    private let latencies = Locked<[Double]>([])
    private let readahead = Locked<(lastEnd: UInt64, window: UInt64)>((0, 0))
    private let stopping = Locked(false)
    private let marked = Locked(true)
    public let workers: Int

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

    public var snapshot: Stats {
        var s = stats.get()
        s.bytesFetched = lazy.blob.bytesFetched.get()
        s.requests = lazy.blob.requestCount.get()
        s.population = Double(lazy.record.presentCount) / Double(max(lazy.record.granules, 1)) * 100
        let l = latencies.get().sorted()
        if !l.isEmpty {
            s.p50Ms = l[l.count / 2]
            s.p99Ms = l[min(l.count - 1, l.count * 99 / 100)]
        }
        return s
    }

    public func stop() { stopping.set(true) }

    /// Runs the event loop, the fetch pool and the committer until `stop()`.
    public func run() {
        let done = DispatchGroup()
        for _ in 0..<workers {
            done.enter()
            Threads.detach { [self] in
                defer { done.leave() }
                workerLoop()
            }
        }
        done.enter()
        Threads.detach { [self] in
            defer { done.leave() }
            while !stopping.get() {
                usleep(250_000)
                commitAndMaybeFinish()
            }
            commitAndMaybeFinish()
        }
        readLoop()
        for _ in 0..<workers { pending.signal() }
        done.wait()
    }

    func readLoop() {
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while !stopping.get() {
            guard (try? Sys.poll(group.rawValue, timeoutMs: 200)) == true else { continue }
            let n: Int
            do { n = try buf.withUnsafeMutableBytes { try Sys.read(group.rawValue, into: $0) } } catch { continue }
            guard let events = try? buf.withUnsafeBytes({ try Fanotify.decode(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }) else { continue }
            stats.withLock { $0.events += events.count }
            journalAppend(events.map { "R \($0.fd) \($0.range?.offset ?? 0) \($0.range?.count ?? lazy.size)\n" }.joined())
            for ev in events {
                let start = DispatchTime.now().uptimeNanoseconds
                // Present data (or a truncate, count 0) is answered right here without I/O.
                if let r = ev.range, r.count == 0 || lazy.isAvailable(offset: r.offset, length: r.count) {
                    answer(ev, Fanotify.allow, start: start)
                    stats.withLock { $0.allowedFromCache += 1 }
                } else {
                    queue.withLock { $0.append(ev) }
                    pending.signal()
                }
            }
        }
    }

    func workerLoop() {
        while true {
            pending.wait()
            guard let ev = queue.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) else {
                if stopping.get() { return }
                continue
            }
            let start = DispatchTime.now().uptimeNanoseconds
            let r = ev.range ?? (0, lazy.size)
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
    }

    /// The required range, grown for sequential readers (128 KiB doubling to 4 MiB).
    func fetch(offset: UInt64, count: UInt64) throws {
        let window: UInt64 = readahead.withLock { ra in
            ra.window = offset == ra.lastEnd && ra.window > 0 ? min(ra.window * 2, 4 << 20) : 128 << 10
            ra.lastEnd = offset + count
            return ra.window
        }
        let want = max(count, window)
        do {
            try lazy.ensure(offset: offset, length: want)
        } catch {
            // The readahead part may be what failed: the required part alone decides.
            try lazy.ensure(offset: offset, length: count)
        }
    }

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

    /// Commits written ranges; when everything is present verifies the digest and removes the mark,
    /// so complete caches cost nothing extra.
    func commitAndMaybeFinish() {
        do { try lazy.commit() } catch { log("commit failed: \(error)") }
        guard marked.get(), lazy.record.isComplete else { return }
        if let digest {
            do {
                try lazy.verify(sha256: digest)
                stats.withLock { $0.verified = true }
            } catch {
                log("\(error)")
                stats.withLock { $0.verified = false; $0.error = "\(error)" }
                try? Sys.unlink(lazy.dataPath)
                try? Sys.unlink(lazy.record.path)
                marked.set(false)  // keep the mark: every further read is denied
                return
            }
        }
        try? Fanotify.mark(group, flags: Fanotify.markRemove, mask: Fanotify.preAccess, path: lazy.dataPath)
        marked.set(false)
        stats.withLock { $0.complete = true }
        log("cache complete\(digest == nil ? "" : " and verified"); mark removed")
    }
}
