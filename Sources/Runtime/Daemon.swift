#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Glibc
import Probe
import Remote
import Syscall
import SystemPackage

/// A remote `mount` as sent to the daemon: every path already absolute (the daemon does not share
/// the caller's working directory), credentials and their lookup environment included.
public struct DaemonRequest: Codable, Sendable {
    public var source: String
    public var mountpoint: String
    public var backend: String?
    public var options: MountOptions
    public var remote: RemoteOptions

    /// `req` with its relative paths resolved against this process's working directory, and the
    /// variables credential lookups use taken from `environment`.
    public init(_ req: MountRequest, environment: [String: String]) {
        let absolute = Runtime.canonicalExisting
        source = req.source
        mountpoint = absolute(req.mountpoint)
        backend = req.backend?.rawValue
        options = req.options
        remote = req.remote
        remote.cacheDir = absolute(remote.cacheDir)
        if case .profile(let p) = remote.prefetch { remote.prefetch = .profile(absolute(p)) }
        remote.recordProfile = remote.recordProfile.map(absolute)
        remote.oci.authFile = remote.oci.authFile.map(absolute)
        let wanted = ["HOME", "PATH", "DOCKER_CONFIG", "REGISTRY_AUTH_FILE"]
        remote.oci.environment = environment.filter { wanted.contains($0.key) }
    }

    var mountRequest: MountRequest {
        MountRequest(source: source, mountpoint: mountpoint, backend: backend.flatMap(Backend.init(rawValue:)),
                     options: options, dryRun: false, remote: remote)
    }
}

/// The daemon's answer: the record of the new mount, or one line and the exit code `mount` uses.
public struct DaemonReply: Codable, Sendable {
    public var record: MountRecord?
    public var notes: [String] = []
    public var message: String?
    public var exitCode: Int32?
}

/// How `erofs-compat mount` reaches a running daemon.
public enum DaemonClient {
    /// The daemon's socket for a state directory.
    public static func socketPath(_ state: StateStore) -> String { state.root + "/daemon.sock" }

    /// Sends `request`; nil when no daemon listens there (the caller mounts by itself).
    public static func mount(_ request: DaemonRequest, socket: String) throws -> DaemonReply? {
        guard let fd = try? Sys.unixConnect(socket) else { return nil }
        defer { Sys.close(fd) }
        // The request can carry credentials: only a daemon running as this user (root) gets them,
        // whoever managed to bind a socket at that path.
        let peer = try? Sys.peerUID(fd)
        guard peer == Sys.effectiveUID else {
            throw RuntimeError.state("the socket \(socket) is served by uid \(peer.map(String.init) ?? "unknown"), not \(Sys.effectiveUID); "
                                     + "remove it or pass --no-daemon")
        }
        var line = try JSONEncoder().encode(request)
        line.append(0x0A)
        try FileDescriptor(rawValue: fd).writeAll(line)
        let answer = try Daemon.readLine(fd)
        guard !answer.isEmpty else {
            throw RuntimeError.state("the daemon at \(socket) closed the connection without an answer (see its log)")
        }
        return try JSONDecoder().decode(DaemonReply.self, from: Data(answer))
    }
}

/// `erofs-compat daemon`: a resident process that performs remote mounts and serves their lazy
/// fetching in-process, so a mount costs no process start, and a cold one no dynamic loading of
/// libcurl and its dependencies. Requests come over a unix socket (root only); the fanotify groups
/// live in the service manager's fd store (see `InProcessServing`).
public final class Daemon: @unchecked Sendable {  // immutable references; counters behind locks
    let runtime: Runtime
    let serving: InProcessServing
    let socketPath: String
    let inflight = Locked(0)
    let stopping = Locked(false)

    public init(state: StateStore, socketPath: String? = nil) {
        serving = InProcessServing(state: state, log: Daemon.log)
        runtime = Runtime(state: state, serving: serving)
        self.socketPath = socketPath ?? DaemonClient.socketPath(state)
    }

    @Sendable public static func log(_ s: String) {
        let line = "erofs-compat daemon[\(Sys.processID)]: \(s)\n"
        _ = try? FileDescriptor.standardError.writeAll(Array(line.utf8))
    }

    /// Serves until SIGTERM or SIGINT, then hands every lazy mount to its own supervisor. `stored`:
    /// the descriptors a keeper passed (nil: those of $LISTEN_FDS). Returns the exit status: 1 when a
    /// mount could not be handed over (its descriptors stay stored; the manager restarts us).
    public func run(stored: [(name: String, fd: Int32)]? = nil) -> Int32 {
        var signals = sigset_t()
        sigemptyset(&signals)
        for s in [SIGTERM, SIGINT] { sigaddset(&signals, s) }
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        signal(SIGPIPE, SIG_IGN)
        let passed = stored ?? ServiceManager.listenedFDs()
        try? runtime.state.ensureDirectories()
        try? Sys.mkdir(runtime.state.root + "/workers", mode: 0o700)
        let listener: Int32
        var ownSocket = false
        if let activated = passed.first(where: { $0.name == "control" }) {
            listener = activated.fd
        } else {
            if Self.alreadyListening(socketPath) { return 1 }
            do {
                listener = try Sys.unixListen(socketPath)
                ownSocket = true
            } catch {
                Self.log("cannot listen on \(socketPath): \(error)")
                return 1
            }
        }
        if ServiceManager.notifySocket == nil {
            Self.log("warning: no service manager ($NOTIFY_SOCKET unset): lazy mounts are served by per-mount supervisors")
        }
        serving.restore(passed.filter { ServeSpec.parseFDName($0.name) != nil })
        startupProbe()
        _ = try? ServiceManager.notify("READY=1\nSTATUS=serving on \(socketPath)")
        Self.log("ready on \(socketPath)\(serving.count > 0 ? ", serving \(serving.count) mounts again" : "")")
        Threads.detach { [self] in
            while !stopping.get() {
                guard (try? Sys.poll(listener, timeoutMs: 200)) == true, let conn = try? Sys.accept(listener) else { continue }
                Threads.detach { [self] in handle(conn) }
            }
        }
        var sig: Int32 = 0
        sigwait(&signals, &sig)
        Self.log("signal \(sig): stopping")
        _ = try? ServiceManager.notify("STOPPING=1")
        stopping.set(true)
        if ownSocket { try? Sys.unlink(socketPath) }
        for _ in 0..<600 where inflight.get() > 0 { usleep(50_000) }
        serving.handOver()
        Sys.close(listener)
        return serving.count > 0 ? 1 : 0
    }

    /// What this host offers remote mounts, said once at start (rather than discovered by the first
    /// mount that fails); it also loads libcurl and the planner while starting, not during that mount.
    func startupProbe() {
        if let reason = HTTPHandle.preload() { Self.log("warning: libcurl cannot be loaded (\(reason)): remote mounts will fail") }
        let cache = BlobCache(directory: BlobCache.defaultDirectory)
        let plan = MountPlanning.planRemote(cacheDir: cache.blobsDir, implemented: Runtime.implemented,
                                           cacheFile: Sys.hasCapSysAdmin() ? runtime.state.hostCache : nil).plan
        let first = plan.candidates.first { $0.verdict == .viable }
        Self.log("remote images in \(cache.blobsDir) would use: \(first.map { "\($0.backend.rawValue) (\($0.reasons.joined(separator: "; ")))" } ?? "no viable backend")")
    }

    func handle(_ conn: Int32) {
        defer { Sys.close(conn) }
        var reply = DaemonReply()
        if (try? Sys.peerUID(conn)) != 0 {
            reply.message = "the daemon accepts requests from root only"
            reply.exitCode = RuntimeError.ExitCode.notPermitted.rawValue
        } else if stopping.get() {
            reply.message = "the daemon is stopping; run the command again"
            reply.exitCode = RuntimeError.ExitCode.mountFailed.rawValue
        } else {
            inflight.withLock { $0 += 1 }
            defer { inflight.withLock { $0 -= 1 } }
            do {
                let line = try Self.readLine(conn)
                let request = try JSONDecoder().decode(DaemonRequest.self, from: Data(line))
                var notes: [String] = []
                let outcome = try runtime.mount(request.mountRequest) { notes.append($0) }
                reply.record = outcome.record
                reply.notes = notes + outcome.notes
                Self.log("mounted \(request.source) on \(request.mountpoint)")
            } catch let e as RuntimeError {
                reply.message = e.description
                reply.exitCode = e.exitCode.rawValue
            } catch {
                reply.message = "bad request: \(error)"
                reply.exitCode = RuntimeError.ExitCode.usage.rawValue
            }
        }
        if var data = try? JSONEncoder().encode(reply) {
            data.append(0x0A)
            _ = try? FileDescriptor(rawValue: conn).writeAll(data)
        }
    }

    /// True (and said) when a daemon answers on `socketPath` already.
    static func alreadyListening(_ socketPath: String) -> Bool {
        guard let other = try? Sys.unixConnect(socketPath) else { return false }
        Sys.close(other)
        log("another daemon already listens on \(socketPath); stop it first")
        return true
    }

    /// Bytes up to a newline (at most 1 MiB).
    static func readLine(_ fd: Int32) throws -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 16 << 10)
        while out.count < 1 << 20 {
            let n = try buf.withUnsafeMutableBytes { try Sys.read(fd, into: $0) }
            if n == 0 { break }
            if let nl = buf[0..<n].firstIndex(of: 0x0A) {
                out += buf[0..<nl]
                break
            }
            out += buf[0..<n]
        }
        return out
    }
}

/// `erofs-compat daemon` started by hand (no service manager): a small keeper process that runs the
/// daemon as its child and speaks systemd's protocol to it — it holds the descriptors the daemon
/// stores (FDSTORE=1), and when the daemon dies it starts it again with them, so a crash never
/// closes a fanotify group.
public enum DaemonKeeper {
    public static func run(executable: String, arguments: [String], notifyPath: String, socketPath: String) -> Int32 {
        if Daemon.alreadyListening(socketPath) { return 1 }
        var signals = sigset_t()
        sigemptyset(&signals)
        for s in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&signals, s) }
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        let sock: Int32
        do {
            sock = try Sys.unixDatagram(bindTo: notifyPath)
        } catch {
            Daemon.log("keeper: cannot bind \(notifyPath): \(error)")
            return 1
        }
        defer {
            Sys.close(sock)
            try? Sys.unlink(notifyPath)
        }
        let store = Locked<[(name: String, fd: Int32)]>([])
        let child = Locked<Int32>(0)
        let stopping = Locked(false)
        let ready = Locked(false)
        Threads.detach {
            while true {
                guard let (bytes, fds) = try? Sys.receive(sock) else { continue }
                let m = ServiceManager.Message(bytes: bytes, fds: fds)
                if m.fields["FDSTORE"] == "1" {
                    let name = m.fields["FDNAME"] ?? "stored"
                    store.withLock { s in for fd in m.fds { s.append((name, fd)) } }
                } else {
                    m.fds.forEach(Sys.close)
                }
                if m.fields["FDSTOREREMOVE"] == "1", let name = m.fields["FDNAME"] {
                    store.withLock { s in
                        for e in s where e.name == name { Sys.close(e.fd) }
                        s.removeAll { $0.name == name }
                    }
                }
                if m.fields["READY"] == "1" {
                    ready.set(true)
                    if stopping.get() { _ = Glibc.kill(child.get(), SIGTERM) }
                }
            }
        }
        Threads.detach {
            var sig: Int32 = 0
            while true {
                sigwait(&signals, &sig)
                stopping.set(true)
                // Before the daemon is ready it may not have blocked the signal yet: forwarded on READY.
                if ready.get() { _ = Glibc.kill(child.get(), SIGTERM) }
            }
        }
        var restarts = 0
        var environment = ProcessInfo.processInfo.environment
        environment["NOTIFY_SOCKET"] = notifyPath
        while true {
            let held = store.get()
            let list = held.map { "\($0.name)=\($0.fd)" }.joined(separator: ",")
            ready.set(false)
            let pid: Int32
            do {
                pid = try Sys.spawnChild(executable, arguments + (list.isEmpty ? [] : ["--stored-fds", list]),
                                         keep: held.map(\.fd), environment: environment)
            } catch {
                Daemon.log("keeper: cannot start the daemon: \(error)")
                if held.isEmpty { return 1 }
                sleep(1)
                continue
            }
            child.set(pid)
            let started = DispatchTime.now().uptimeNanoseconds
            let (code, signal) = Sys.wait(pid)
            if code == 0 { break }
            // A daemon that never got ready (bad socket path, …) is not restarted while nothing is stored.
            if !ready.get() && store.get().isEmpty {
                Daemon.log("keeper: the daemon exited before it was ready (\(signal.map { "signal \($0)" } ?? "exit \(code ?? -1)"))")
                return 1
            }
            if DispatchTime.now().uptimeNanoseconds - started > 60_000_000_000 { restarts = 0 }
            restarts += 1
            Daemon.log("keeper: the daemon \(pid) died (\(signal.map { "signal \($0)" } ?? "exit \(code ?? -1)")); restart \(restarts) with \(store.get().count) stored descriptors")
            if store.get().isEmpty && (stopping.get() || restarts > 5) { return 1 }
            usleep(UInt32(min(restarts, 10)) * 100_000)
        }
        store.withLock { s in s.forEach { Sys.close($0.fd) } }
        return 0
    }
}
