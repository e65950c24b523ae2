import Glibc
import Synchronization
import Syscall

/// The descriptor side of a FUSE connection: threads that read requests from /dev/fuse, hand them
/// to the session and write the replies. Each thread blocks in read(2) on the same descriptor; the
/// kernel gives every request to exactly one of them.
public final class FUSEServer: Sendable {
    public let session: FUSESession
    /// The /dev/fuse descriptor; owned by whoever opened it (a supervisor keeps it across restarts).
    public let fd: Int32
    /// Serving threads that have seen the connection end.
    private let finished = Mutex<Int>(0)

    private let splicer = FUSESplicer()
    /// Where the requests in flight are recorded, for a successor after a crash.
    public let journal: FUSEJournal?

    public init(session: FUSESession, fd: Int32, journal: FUSEJournal? = nil) {
        (self.session, self.fd, self.journal) = (session, fd, journal)
    }

    /// Answers what a dead predecessor had read and not answered (from the journal); the count.
    @discardableResult
    public func answerJournaled() -> Int {
        guard let journal else { return 0 }
        let pending = journal.pending()
        for (slot, request) in pending {
            answer(request[...])
            journal.clear(slot)
        }
        return pending.count
    }

    /// Records `request` in the journal, answers it, and clears it.
    public func answerRecorded(_ request: ArraySlice<UInt8>) {
        let slot = journal?.record(request)
        answer(request)
        if let slot { journal?.clear(slot) }
    }

    /// Serves on `threads` threads until the connection ends (the filesystem was unmounted or the
    /// connection aborted: ENODEV), then returns.
    public func run(threads: Int) {
        for _ in 1..<max(1, threads) {
            Threads.detach { [self] in
                serveLoop()
                finished.withLock { $0 += 1 }
            }
        }
        serveLoop()
        // The others see ENODEV too; wait briefly so none writes to a descriptor being closed.
        for _ in 0..<100 where finished.withLock({ $0 }) < threads - 1 { usleep(10_000) }
    }

    /// Asks the kernel to queue again every request a dead predecessor read but never answered
    /// (FUSE_NOTIFY_RESEND, Linux 6.9+): false when the kernel cannot.
    @discardableResult
    public func requestResend() -> Bool {
        guard session.kernelFlags.contains(.hasResend) else { return false }
        return write(FUSEReply.notify(FUSELayout.notifyResend))
    }

    private func serveLoop() {
        var buffer = FUSELayout.newRequestBuffer()
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                switch errno {
                case EINTR, EAGAIN, ENOENT: continue  // ENOENT: the request was interrupted before we read it
                default: return  // ENODEV: unmounted
                }
            }
            if n == 0 { return }
            answerRecorded(buffer[0..<n])
        }
    }

    /// Answers one request: a READ whose data lies in a file is spliced from it, anything else (or
    /// a splice that failed before the device took it) written.
    public func answer(_ request: ArraySlice<UInt8>) {
        switch session.respond(request) {
        case nil: return
        case .bytes(let reply): _ = write(reply)
        case .file(let header, let region):
            if splicer.send(header, region, to: fd) == .failed, let reply = session.handle(request) { _ = write(reply) }
        }
        // After the reply: the reader is not kept waiting for what it may read next.
        session.pushAhead(request) { _ = write($0) }
    }

    /// ENOENT from the kernel means the request was interrupted and needs no answer.
    private func write(_ reply: [UInt8]) -> Bool {
        reply.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == reply.count
    }
}
