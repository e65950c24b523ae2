import Dispatch
import Glibc
import Syscall

/// Serves NBD sessions on sockets: a thread per connection reads requests, a fixed pool of
/// threads performs the reads (so replies may leave out of order), and a reply is written only
/// once its data is in hand. Bounded: at most `maxConnections` at once, at most `maxInFlight`
/// requests per connection and `byteBudget` bytes of reads in flight in all; a negotiation that
/// stalls, or a client that stops reading its replies, is cut off after `stallSeconds`.
public final class NBDServer: @unchecked Sendable {  // immutable configuration; mutable state is behind locks
    public typealias Read = @Sendable (_ offset: UInt64, _ length: Int) throws -> [UInt8]
    public typealias Prefetch = @Sendable (_ offset: UInt64, _ length: Int) throws -> Void
    /// Where a read's bytes lie in an open file once present, so the reply is sent with sendfile(2)
    /// (no copy through this process); nil: use `read`.
    public typealias Region = @Sendable (_ offset: UInt64, _ length: Int) throws -> (fd: Int32, offset: UInt64)?

    let exports: [NBDExport]
    let read: Read
    let prefetch: Prefetch
    let region: Region?
    let log: @Sendable (String) -> Void
    public var maxConnections = 64
    public var maxInFlight = 64
    public var stallSeconds = 30
    /// Runs a read's work: on the server's own threads, or on a pool the caller shares.
    let submit: Submit
    let budget: ByteBudget
    let connections = Locked(0)
    /// Requests answered, for figures and tests.
    package let served = Locked<(reads: Int, errors: Int, bytes: UInt64)>((0, 0, 0))

    public typealias Submit = @Sendable (@escaping @Sendable () -> Void) -> Void

    /// `submit` nil: `threads` threads of its own perform the reads.
    public init(exports: [NBDExport], threads: Int = 8, byteBudget: Int = 128 << 20, read: @escaping Read,
                region: Region? = nil, prefetch: @escaping Prefetch, submit: Submit? = nil,
                log: @escaping @Sendable (String) -> Void) {
        self.exports = exports
        self.read = read
        self.region = region
        self.prefetch = prefetch
        self.log = log
        self.submit = submit ?? { [pool = WorkPool(threads: threads)] in pool.submit($0) }
        budget = ByteBudget(limit: byteBudget)
    }

    /// Accepts connections on a listening socket until `stop` is set (checked each second).
    package func serve(listening fd: Int32, until stop: Locked<Bool>) {
        while !stop.get() {
            guard (try? Sys.poll(fd, timeoutMs: 1000)) == true, let conn = try? Sys.accept(fd) else { continue }
            let admitted = connections.withLock { n -> Bool in
                guard n < maxConnections else { return false }
                n += 1
                return true
            }
            guard admitted else {
                log("refusing a connection: \(maxConnections) already open")
                Sys.close(conn)
                continue
            }
            Threads.detach { [self] in
                serve(connection: conn)
                connections.withLock { $0 -= 1 }
            }
        }
    }

    /// Serves one connection until the client disconnects or fails; closes `fd`.
    public func serve(connection fd: Int32) {
        let c = Connection(fd: fd, session: NBDSession(exports: exports), server: self)
        c.run()
    }

    /// Serves a socket whose other end the kernel's NBD driver holds (no negotiation: requests from
    /// the first byte); closes `fd` when the device disconnects.
    public func serve(kernelConnection fd: Int32) {
        let c = Connection(fd: fd, session: NBDSession(transmissionOf: exports[0]), server: self)
        c.run()
    }

    /// The work behind a `.read` or `.cache` action.
    func perform(_ action: NBDSession.Action) -> Result<[UInt8], NBD.Error> {
        do {
            switch action {
            case .read(_, let offset, let length):
                let data = try read(offset, Int(length))
                served.withLock { $0.reads += 1; $0.bytes += UInt64(data.count) }
                return data.count == Int(length) ? .success(data) : .failure(.io)
            case .cache(_, let offset, let length):
                try prefetch(offset, Int(length))
                return .success([])
            default:
                return .failure(.invalid)
            }
        } catch {
            served.withLock { $0.errors += 1 }
            return .failure(.io)
        }
    }
}

/// One connection: reads and feeds the session, sends in order under a lock, hands reads to the pool.
final class Connection: @unchecked Sendable {  // `session` is used by the reading thread only; sends are locked
    let fd: Int32
    let session: NBDSession
    unowned let server: NBDServer
    let sendLock = Locked(false)  // true once a send failed
    let inFlight = Locked(0)
    let slot: DispatchSemaphore

    init(fd: Int32, session: NBDSession, server: NBDServer) {
        (self.fd, self.session, self.server) = (fd, session, server)
        slot = DispatchSemaphore(value: server.maxInFlight)
    }

    func run() {
        defer { finish() }
        _ = try? Sys.setTimeouts(fd, receive: server.stallSeconds, send: server.stallSeconds)
        // A whole large read reply fits in the socket: its thread does not wait for the client.
        _ = try? Sys.setSendBuffer(fd, 4 << 20)
        guard perform(session.start()) else { return }
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            // Negotiation must progress; a transmission-phase client may idle as long as it likes.
            if session.export != nil { _ = try? Sys.setTimeouts(fd, receive: 0, send: server.stallSeconds) }
            let n: Int
            do { n = try buf.withUnsafeMutableBytes { try Sys.read(fd, into: $0) } } catch { return }
            if n == 0 { return }
            guard perform(session.receive(Array(buf[0..<n]))) else { return }
        }
    }

    /// Performs actions in order; false when the connection is to end.
    func perform(_ actions: [NBDSession.Action]) -> Bool {
        for a in actions {
            switch a {
            case .send(let bytes):
                guard send(bytes) else { return false }
            case .read(_, _, let length), .cache(_, _, let length):
                slot.wait()
                let cost = if case .read = a { Int(length) } else { 0 }
                server.budget.acquire(cost)
                inFlight.withLock { $0 += 1 }
                server.submit { [self] in
                    answer(a)
                    server.budget.release(cost)
                    inFlight.withLock { $0 -= 1 }
                    slot.signal()
                }
            case .close(let reason):
                if !reason.hasPrefix("the client") { server.log("closing an NBD connection: \(reason)") }
                return false
            }
        }
        return true
    }

    /// Replies to a read or cache request: a present file region goes out with sendfile, anything
    /// else (and every failure) through the bytes path.
    func answer(_ a: NBDSession.Action) {
        if case .read(_, let offset, let length) = a, let region = server.region {
            do {
                if let r = try region(offset, Int(length)), let head = session.readReplyHead(to: a) {
                    server.served.withLock { $0.reads += 1; $0.bytes += UInt64(length) }
                    _ = send(head, file: r, length: Int(length))
                    return
                }
            } catch {
                server.served.withLock { $0.errors += 1 }
                _ = send(session.replyParts(to: a, result: .failure(.io)).head)
                return
            }
        }
        let (head, data) = session.replyParts(to: a, result: server.perform(a))
        _ = send(head, data)
    }

    /// Sends `head` then `length` bytes of the file region as one reply. A file that ends early
    /// cannot be patched over once the header is out: the connection is failed.
    func send(_ head: [UInt8], file r: (fd: Int32, offset: UInt64), length: Int) -> Bool {
        sendLock.withLock { failed in
            guard !failed else { return false }
            do {
                try Sys.sendAll(fd, head, more: true)
                try Sys.sendFileAll(fd, from: r.fd, offset: r.offset, count: length)
            } catch { failed = true }
            return !failed
        }
    }

    /// Sends `bytes` then `more` as one message (no other reply between them).
    func send(_ bytes: [UInt8], _ more: [UInt8] = []) -> Bool {
        sendLock.withLock { failed in
            guard !failed else { return false }
            do {
                try Sys.sendAll(fd, bytes)
                if !more.isEmpty { try Sys.sendAll(fd, more) }
            } catch { failed = true }
            return !failed
        }
    }

    /// Waits for the replies in flight (each is written or fails), then closes.
    func finish() {
        while inFlight.get() > 0 { usleep(1000) }
        Sys.close(fd)
    }
}

/// A fixed set of threads running submitted work in order of submission.
final class WorkPool: @unchecked Sendable {  // the queue is behind its lock
    private let queue = Locked<[@Sendable () -> Void]>([])
    private let ready = DispatchSemaphore(value: 0)

    init(threads: Int) {
        for _ in 0..<max(threads, 1) {
            Threads.detach { [self] in
                while true {
                    ready.wait()
                    if let work = queue.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) { work() }
                }
            }
        }
    }

    func submit(_ work: @escaping @Sendable () -> Void) {
        queue.withLock { $0.append(work) }
        ready.signal()
    }
}

/// Bytes that may be in flight at once; a request larger than the whole budget still gets through
/// alone.
final class ByteBudget: @unchecked Sendable {  // `used` is behind its lock
    private let limit: Int
    private let used = Locked(0)
    private let freed = DispatchSemaphore(value: 0)

    init(limit: Int) { self.limit = limit }

    func acquire(_ n: Int) {
        guard n > 0 else { return }
        while !used.withLock({ u -> Bool in
            guard u == 0 || u + n <= limit else { return false }
            u += n
            return true
        }) {
            _ = freed.wait(timeout: .now() + .milliseconds(10))
        }
    }

    func release(_ n: Int) {
        guard n > 0 else { return }
        used.withLock { $0 -= n }
        freed.signal()
    }
}
