#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import FUSE
import Glibc
import Remote
import Syscall
import SystemPackage

/// A fuse-blob or fuse-erofs mount served in the daemon's shared threads: the poller reads its
/// /dev/fuse descriptor (non-blocking) and the requests are answered on the pool, at most
/// `lane.limit` at once, so a mount costs the daemon no threads of its own and no process start.
/// The descriptor and the request journal are durable: after a crash the successor serves the same
/// connection, answers what was read but not answered from the journal (and where the kernel can,
/// asks it to resend such requests: FUSE_NOTIFY_RESEND); a clean stop hands both to a `__fuse-serve`
/// supervisor.
// `buffer` is the poller thread's only; the rest is locked or immutable.
final class HostedFuse: HostedMount, @unchecked Sendable {
    enum Phase { case serving, stopped, ended }

    /// The spec with its credentials, for a supervisor taking over.
    let full: ServeSpec
    let negotiated: ServeSpec.Negotiated
    let device: OwnedDescriptor
    /// The requests read and not answered yet (`FUSEJournal`'s memfd): durable with the device.
    let journalFD: OwnedDescriptor
    let authFD: OwnedDescriptor?
    let served: ServedSource
    let session: FUSESession
    /// Writes (or splices) the replies; the server type's answering without its threads.
    let answerer: FUSEServer
    let lane = PoolLane(limit: 8, priority: .demand)
    let log: @Sendable (String) -> Void
    private let phase = Locked(Phase.serving)
    private let token = Locked<ServingPoller.Token?>(nil)
    private let onEnd = Locked<(@Sendable () -> Void)?>(nil)
    private var buffer = FUSELayout.newRequestBuffer()

    var spec: ServeSpec { full.stored }
    var durable: [(kind: Character, fd: Int32)] {
        var list: [(kind: Character, fd: Int32)] = [("f", device.rawValue), ("j", journalFD.rawValue)]
        if let authFD { list.append(("a", authFD.rawValue)) }
        return list
    }

    private init(_ full: ServeSpec, negotiated: ServeSpec.Negotiated, device: Int32, journal: FUSEJournal,
                 authFD: Int32?, served: ServedSource, filesystem: FUSEFilesystem,
                 log: @escaping @Sendable (String) -> Void) {
        (self.full, self.negotiated, self.served) = (full, negotiated, served)
        self.device = OwnedDescriptor(device)
        journalFD = OwnedDescriptor(journal.fd)
        self.authFD = authFD.map { OwnedDescriptor($0) }
        session = FUSESession(filesystem: filesystem)
        session.resume(kernelFlags: FUSEInitFlags(rawValue: negotiated.flags), kernelMinor: negotiated.minor)
        answerer = FUSEServer(session: session, fd: device, journal: journal)
        self.log = { [mp = full.mountpoint] in log("\(mp): \($0)") }
    }

    func serves(_ record: MountRecord) -> Bool { record.isFuseServed && record.mountpoint == full.mountpoint }

    func start(restarted: Bool, ended: @escaping @Sendable () -> Void) {
        onEnd.set(ended)
        setNonBlocking(true)
        if restarted { FuseWorker.takeOver(answerer, log: log) }
        token.set(ServingPoller.shared.add(device.rawValue) { [self] in readable() })
        let last = Locked<Data?>(nil)
        ServingTicker.shared.every(250) { [self] in
            guard phase.get() == .serving else { return false }
            last.set(served.writeStatsIfChanged(to: full.statsPath, since: last.get(), fuse: session.stats))
            return true
        }
    }

    /// On the poller thread: every request queued now goes to the pool.
    private func readable() {
        guard phase.get() == .serving else { return }
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(device.rawValue, $0.baseAddress, $0.count) }
            if n > 0 {
                let request = Array(buffer[0..<n])
                let slot = answerer.journal?.record(request[...])
                lane.submit { [self] in
                    answerer.answer(request[...])
                    if let slot { answerer.journal?.clear(slot) }
                }
                continue
            }
            if n < 0, errno == EAGAIN { return }
            if n < 0, errno == EINTR || errno == ENOENT { continue }
            connectionEnded()  // ENODEV: the superblock is gone (also the last close after a lazy umount)
            return
        }
    }

    private func connectionEnded() {
        guard phase.withLock({ p -> Bool in
            guard p == .serving else { return false }
            p = .ended
            return true
        }) else { return }
        // Not on the poller thread: removing a descriptor waits for its handler.
        ServingPool.shared.submit(.background) { [self] in
            token.withLock { $0 }.map(ServingPoller.shared.remove)
            lane.waitIdle()
            served.close()
            full.servingEnded()
            log("the FUSE connection ended; stopped serving it")
            onEnd.get()?()
        }
    }

    func stop() -> Bool {
        guard phase.withLock({ p -> Bool in
            guard p == .serving else { return false }
            p = .stopped
            return true
        }) else { return false }
        token.withLock { $0 }.map(ServingPoller.shared.remove)
        lane.waitIdle()
        return true
    }

    /// `__fuse-serve` on the same connection, told what INIT negotiated; it opens the source itself
    /// (this process lets go of the cache entry first).
    func spawnSupervisor() throws -> Int32 {
        served.close()
        setNonBlocking(false)
        let args = ["--fuse-fd", String(device.rawValue), "--kernel-flags", String(negotiated.flags),
                    "--kernel-minor", String(negotiated.minor), "--adopted", "--journal-fd", String(journalFD.rawValue)]
            + (negotiated.backing.map { ["--backing-id", String($0)] } ?? [])
        let server = ServedProcess.fuse
        let (pid, line) = try server.start(full, args: args, keeping: [device.rawValue, journalFD.rawValue])
        guard FuseWorker.Ready(line) != nil else {
            server.kill(pid)
            throw BackendFailure(detail: "the FUSE server answered '\(line)'", fallback: false)
        }
        return pid
    }

    func close() {
        served.close()
        device.close()
        journalFD.close()
        authFD?.close()
    }

    /// O_NONBLOCK is the open file's, shared with every copy: on while the poller reads it, off for
    /// a supervisor's blocking readers.
    private func setNonBlocking(_ on: Bool) {
        let fd = device.rawValue
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK)
    }

    /// The source opened and its filesystem made, on the device whose INIT is answered.
    static func open(_ full: ServeSpec, device: Int32, journalFD: Int32, authFD: Int32?, state: StateStore,
                     fetcher: HTTPBlob? = nil, log: @escaping @Sendable (String) -> Void) throws -> HostedFuse {
        guard let negotiated = full.negotiated else { throw RuntimeError.state("the spec has no FUSE INIT outcome") }
        let journal = try FUSEJournal(fd: journalFD)
        let (filesystem, served) = try FuseWorker.openFilesystem(full, backing: negotiated.backing, fetcher: fetcher,
                                                                 runtime: Runtime(state: state))
        return HostedFuse(full, negotiated: negotiated, device: device, journal: journal, authFD: authFD,
                          served: served, filesystem: filesystem, log: log)
    }

    /// After a restart: the mount again from its spec, the stored device (f) and credentials (a).
    static func restore(_ stored: ServeSpec, _ fds: [Character: Int32], state: StateStore,
                        log: @escaping @Sendable (String) -> Void) throws -> HostedFuse {
        guard let device = fds["f"], let journal = fds["j"] else {
            throw RuntimeError.state("the stored descriptors lack /dev/fuse or its journal")
        }
        var full = stored
        if let a = fds["a"] {
            let bytes = try Sys.preadFully(a, count: Int(Sys.fstat(a).st_size), at: 0)
            let secret = try JSONDecoder().decode(StoredSecrets.self, from: Data(bytes))
            secret.apply(to: &full)
        }
        return try open(full, device: device, journalFD: journal, authFD: fds["a"], state: state, log: log)
    }
}

extension InProcessServing {
    /// Serves the FUSE connection on `fuseFD` (its superblock just created) here: answers INIT,
    /// opens what `spec` names, stores the device, serves. Returns this process's pid, and whether
    /// the blob file is passed through to its backing file.
    func hostFuse(_ spec: ServeSpec, fuseFD: Int32, fetcher: HTTPBlob? = nil) throws -> FuseWorker.Ready {
        let whole = spec.openWholeBlobFile()
        defer { whole.map { Sys.close($0.rawValue) } }
        guard let (flags, minor) = FuseWorker.handshake(fuseFD, passthrough: whole != nil) else {
            throw BackendFailure(detail: "the kernel sent no FUSE INIT request", fallback: false)
        }
        let backing = whole.flatMap { FuseWorker.registerBacking(fuseFD, $0, offered: flags, log: log) }
        var full = spec
        full.hostID = Self.newID()
        full.negotiated = ServeSpec.Negotiated(flags: flags.rawValue, minor: minor, backing: backing)
        let device = try Sys.dup(fuseFD)
        var (authFD, journalFD): (Int32?, Int32?) = (nil, nil)
        let mount: HostedFuse
        do {
            let secrets = StoredSecrets(full)
            if !secrets.isEmpty {
                authFD = try Sys.memfd("erofs-compat-auth", holding: [UInt8](JSONEncoder().encode(secrets)))
            }
            let journal = try FUSEJournal.create()
            journalFD = journal
            mount = try HostedFuse.open(full, device: device, journalFD: journal, authFD: authFD, state: state,
                                        fetcher: fetcher, log: log)
        } catch {
            Sys.close(device)
            authFD.map(Sys.close)
            journalFD.map(Sys.close)
            throw error
        }
        try add(mount)
        start(mount, restarted: false)
        return FuseWorker.Ready(pid: getpid(), passthrough: backing != nil)
    }
}

/// What `ServeSpec.stored` leaves out, kept in a memfd in the fd store (never in a file): the
/// blob's credentials, or the user name and password an unresolved source is fetched with.
private struct StoredSecrets: Codable {
    var credentials: [UInt8]?
    var username: String?
    var password: String?

    init(_ spec: ServeSpec) {
        (credentials, username, password) = (spec.credentials, spec.remote?.oci.username, spec.remote?.oci.password)
    }

    var isEmpty: Bool { credentials == nil && username == nil && password == nil }

    func apply(to spec: inout ServeSpec) {
        spec.credentials = credentials
        spec.remote?.oci.username = username
        spec.remote?.oci.password = password
    }
}
