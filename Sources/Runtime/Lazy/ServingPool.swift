import Dispatch
import Glibc
import Syscall

/// The threads every lazy server of a process shares: a process that serves twenty mounts (the
/// daemon) runs as many threads as one that serves one, not twenty sets of event readers, fetchers
/// and committers. Jobs block on network I/O, so the pool grows on demand up to `maxThreads` and
/// threads idle for `idleSeconds` exit. Demand jobs (a reader waits) run before background ones
/// (readahead), whatever mount they belong to.
final class ServingPool: @unchecked Sendable {  // all state behind `mutex`, at a stable heap address
    enum Priority { case demand, background }
    typealias Job = () -> Void

    static let shared = ServingPool(maxThreads: 64, idleSeconds: 5)

    let maxThreads: Int
    let idleSeconds: Int
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var demand = JobQueue()
    private var background = JobQueue()
    private var threads = 0
    private var idle = 0
    /// Signals sent to idle threads that no thread has woken for yet: an idle thread counts as
    /// available only once, however many jobs arrive before it wakes.
    private var wakeups = 0

    init(maxThreads: Int, idleSeconds: Int) {
        (self.maxThreads, self.idleSeconds) = (maxThreads, idleSeconds)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
    }

    /// The number of pool threads alive now.
    var threadCount: Int { locked { threads } }

    func submit(_ priority: Priority = .demand, _ job: @escaping Job) {
        let spawn: Bool = locked {
            if priority == .demand { demand.push(job) } else { background.push(job) }
            if idle > wakeups {
                wakeups += 1
                pthread_cond_signal(cond)
                return false
            }
            guard threads < maxThreads else { return false }
            threads += 1
            return true
        }
        if spawn { Threads.detach { [self] in work() } }
    }

    private func locked<T>(_ body: () -> T) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return body()
    }

    private func work() {
        pthread_mutex_lock(mutex)
        while true {
            if let job = demand.pop() ?? background.pop() {
                pthread_mutex_unlock(mutex)
                job()
                pthread_mutex_lock(mutex)
                continue
            }
            idle += 1
            var deadline = timespec()
            clock_gettime(CLOCK_REALTIME, &deadline)
            deadline.tv_sec += idleSeconds
            let rc = pthread_cond_timedwait(cond, mutex, &deadline)
            idle -= 1
            if wakeups > 0 { wakeups -= 1 }
            if rc == ETIMEDOUT, demand.isEmpty, background.isEmpty {
                threads -= 1
                pthread_mutex_unlock(mutex)
                return
            }
        }
    }
}

/// A FIFO of jobs without per-pop copying (a head index; compacted when half is consumed).
private struct JobQueue {
    private var items: [ServingPool.Job?] = []
    private var head = 0
    var isEmpty: Bool { head == items.count }

    mutating func push(_ job: @escaping ServingPool.Job) { items.append(job) }

    mutating func pop() -> ServingPool.Job? {
        guard head < items.count else { return nil }
        let job = items[head]
        items[head] = nil
        head += 1
        if head > 64, head * 2 > items.count {
            items.removeFirst(head)
            head = 0
        }
        return job
    }
}

/// One server's jobs on the shared pool: at most `limit` run at once, in the order submitted, so a
/// server whose blob stalls holds at most `limit` pool threads and every other mount keeps going.
final class PoolLane: @unchecked Sendable {  // state behind its lock
    let limit: Int
    let priority: ServingPool.Priority
    let pool: ServingPool
    private let state = Locked<(queue: [ServingPool.Job], active: Int)>(([], 0))

    init(limit: Int, priority: ServingPool.Priority, pool: ServingPool = .shared) {
        (self.limit, self.priority, self.pool) = (max(limit, 1), priority, pool)
    }

    func submit(_ job: @escaping ServingPool.Job) {
        let start: Bool = state.withLock { s in
            s.queue.append(job)
            guard s.active < limit else { return false }
            s.active += 1
            return true
        }
        if start { pool.submit(priority) { [self] in drain() } }
    }

    /// Jobs queued or running.
    var pending: Int { state.withLock { $0.queue.count + $0.active } }

    /// Drops the jobs not started yet (readahead whose readers moved on); returns them.
    func removeQueued() -> [ServingPool.Job] {
        state.withLock { s in
            defer { s.queue.removeAll() }
            return s.queue
        }
    }

    /// Returns once nothing is queued or running.
    func waitIdle() {
        while pending > 0 { usleep(5_000) }
    }

    private func drain() {
        while let job = state.withLock({ s -> ServingPool.Job? in
            if s.queue.isEmpty { s.active -= 1; return nil }
            return s.queue.removeFirst()
        }) {
            job()
        }
    }
}

/// Periodic work of every server in the process on one timer thread: each task runs on the pool
/// when due (never two runs of one task at once) and is dropped once it returns false.
final class ServingTicker: @unchecked Sendable {  // state behind its lock
    static let shared = ServingTicker()

    private final class Task: @unchecked Sendable {  // `running` and `due` behind the ticker's lock
        let intervalNs: UInt64
        let body: () -> Bool
        var due: UInt64
        var running = false
        var removed = false
        init(intervalMs: Int, body: @escaping () -> Bool) {
            intervalNs = UInt64(intervalMs) * 1_000_000
            self.body = body
            due = DispatchTime.now().uptimeNanoseconds + intervalNs
        }
    }

    /// A task's handle, to remove it.
    struct Token: Hashable { fileprivate let id: Int }

    private let state = Locked<(tasks: [Int: Task], next: Int, started: Bool)>(([:], 0, false))
    private let pool: ServingPool

    init(pool: ServingPool = .shared) { self.pool = pool }

    /// Runs `body` every `intervalMs` until it returns false or the task is removed.
    @discardableResult
    func every(_ intervalMs: Int, _ body: @escaping () -> Bool) -> Token {
        let task = Task(intervalMs: intervalMs, body: body)
        let (id, start): (Int, Bool) = state.withLock { s in
            s.next += 1
            s.tasks[s.next] = task
            defer { s.started = true }
            return (s.next, !s.started)
        }
        if start { Threads.detach { [self] in loop() } }
        return Token(id: id)
    }

    /// Removes the task; returns once a run of it in progress has finished.
    func remove(_ token: Token) {
        guard let task = state.withLock({ s -> Task? in
            let t = s.tasks.removeValue(forKey: token.id)
            t?.removed = true
            return t
        }) else { return }
        while state.withLock({ _ in task.running }) { usleep(2_000) }
    }

    private func loop() {
        while true {
            usleep(20_000)
            let now = DispatchTime.now().uptimeNanoseconds
            let due: [(Int, Task)] = state.withLock { s in
                s.tasks.filter { !$0.value.running && $0.value.due <= now }.map { id, t in
                    t.running = true
                    t.due = now + t.intervalNs
                    return (id, t)
                }
            }
            for (id, task) in due {
                pool.submit { [self] in
                    let again = task.body()
                    state.withLock { s in
                        task.running = false
                        if !again, !task.removed { s.tasks[id] = nil }
                    }
                }
            }
        }
    }
}

/// Readiness of every server's descriptors (fanotify groups) on one thread, with poll(2): a
/// handler runs on this thread when its descriptor is readable and must not block (it reads what
/// is there, answers what it can at once and hands the rest to the pool).
final class ServingPoller: @unchecked Sendable {  // state behind its lock
    static let shared = ServingPoller()

    struct Token: Hashable { fileprivate let id: Int }
    private struct Entry { let fd: Int32; let handler: () -> Void }

    private let state = Locked<(entries: [Int: Entry], next: Int, running: Int?, thread: Bool)>(([:], 0, nil, false))
    /// Written to wake the poll when the set of descriptors changes.
    private let wake: (read: Int32, write: Int32)

    init() {
        wake = (try? Sys.pipe()) ?? (-1, -1)
        if wake.read >= 0 { _ = fcntl(wake.read, F_SETFL, fcntl(wake.read, F_GETFL) | O_NONBLOCK) }
    }

    func add(_ fd: Int32, _ handler: @escaping () -> Void) -> Token {
        let (id, start): (Int, Bool) = state.withLock { s in
            s.next += 1
            s.entries[s.next] = Entry(fd: fd, handler: handler)
            defer { s.thread = true }
            return (s.next, !s.thread)
        }
        if start { Threads.detach { [self] in loop() } } else { poke() }
        return Token(id: id)
    }

    /// Stops watching; returns once the descriptor's handler is not running (never call it from a
    /// handler).
    func remove(_ token: Token) {
        state.withLock { _ = $0.entries.removeValue(forKey: token.id) }
        poke()
        while state.withLock({ $0.running == token.id }) { usleep(1_000) }
    }

    private func poke() {
        var b: UInt8 = 1
        _ = Glibc.write(wake.write, &b, 1)
    }

    private func loop() {
        while true {
            let entries = state.withLock { $0.entries }
            var fds = [pollfd(fd: wake.read, events: Int16(POLLIN), revents: 0)]
            let ids = Array(entries.keys)
            for id in ids { fds.append(pollfd(fd: entries[id]!.fd, events: Int16(POLLIN), revents: 0)) }
            guard (try? Sys.poll(&fds, timeoutMs: 1000)) ?? 0 > 0 else { continue }
            if fds[0].revents != 0 {
                var buf = [UInt8](repeating: 0, count: 64)
                while Glibc.read(wake.read, &buf, buf.count) > 0 {}
            }
            for (i, id) in ids.enumerated() where fds[i + 1].revents != 0 {
                // Removed meanwhile: its descriptor may already be closed (or reused).
                guard let e = state.withLock({ s -> Entry? in
                    guard let e = s.entries[id] else { return nil }
                    s.running = id
                    return e
                }) else { continue }
                e.handler()
                state.withLock { $0.running = nil }
            }
        }
    }
}
