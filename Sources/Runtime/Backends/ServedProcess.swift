#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Syscall
import SystemPackage

/// The server process of a served mount (`__fuse-serve`, `__nbd-serve`): started detached with its
/// `ServeSpec` on a pipe and the descriptors it serves, it answers one line on a ready pipe; it
/// exits by itself when what it serves is gone.
struct ServedProcess {
    /// The hidden subcommand it runs.
    var command: String
    /// What it is called in messages ("the FUSE server").
    var name: String

    static let fuse = ServedProcess(command: "__fuse-serve", name: "the FUSE server")
    static let nbd = ServedProcess(command: "__nbd-serve", name: "the NBD server")

    /// Spawns the server with `args` (after the command and its spec/ready descriptors) keeping
    /// `fds` open in it; returns its pid and the first line it answered. A server that answers
    /// "error: …" or nothing is killed and the failure thrown.
    func start(_ spec: ServeSpec, args: [String], keeping fds: [Int32]) throws -> (pid: Int32, line: String) {
        let json: Data
        do { json = try JSONEncoder().encode(spec) } catch {
            throw BackendFailure(detail: "encoding the serve spec: \(error)", fallback: false)
        }
        let specFD = try Sys.pipe(holding: Array(json))
        defer { Sys.close(specFD) }
        let (r, w) = try Sys.pipe()
        defer { Sys.close(r) }
        let argv = [command, "--spec-fd", String(specFD), "--ready-fd", String(w)] + args
        let pid: Int32
        do {
            pid = try Sys.spawnDetached(Runtime.workerExecutable, argv, keep: fds + [specFD, w],
                                        logPath: StateStore.sibling(of: spec.statsPath, ".log"))
        } catch {
            Sys.close(w)
            throw BackendFailure(detail: "cannot start \(name): \(error)", fallback: false)
        }
        Sys.close(w)
        let line = Sys.readLine(r, timeoutMs: Int32(min((spec.remote?.prepareTimeout ?? 60) + 30, 3600) * 1000))
        guard !line.isEmpty, !line.hasPrefix("error: ") else {
            kill(pid)
            let why = line.hasPrefix("error: ") ? String(line.dropFirst(7)) : "\(name) exited before it was ready"
            throw BackendFailure(detail: why, fallback: false)
        }
        return (pid, line)
    }

    /// A supervisor's serving child, in this session: the spec on a pipe, `fds` and the pipes kept
    /// open in it, its arguments from `args(specFD, statusFD)`. Returns its pid and the read end of
    /// the status pipe it answers on.
    static func startChild(spec: [UInt8], keeping fds: [Int32],
                           _ args: (_ specFD: Int32, _ statusFD: Int32) -> [String]) throws -> (Int32, Int32) {
        let specFD = try Sys.pipe(holding: spec)
        defer { Sys.close(specFD) }
        let (r, w) = try Sys.pipe()
        defer { Sys.close(w) }
        do {
            return (try Sys.spawnChild(Runtime.workerExecutable, args(specFD, w), keep: fds + [specFD, w],
                                       environment: ProcessInfo.processInfo.environment), r)
        } catch {
            Sys.close(r)
            throw error
        }
    }

    func kill(_ pid: Int32) {
        try? Sys.kill(pid, SIGKILL)
        _ = Sys.reap(pid)
    }

    /// Once what it serves is gone the server exits by itself; wait for that (so that nothing of the
    /// mount is left when `umount` returns), stop it if it lingers, and remove its figures and log.
    func awaitExit(_ record: MountRecord) {
        guard record.servedByDaemon, let stats = record.statsPath else {
            return awaitExit(pid: record.workerPID, statsPath: record.statsPath)
        }
        // The daemon lets go of the mount (its spec, stored descriptors, figures) once the
        // connection ends: wait for that, up to 10 s.
        let spec = StateStore.sibling(of: stats, ".spec")
        for _ in 0..<200 where FileManager.default.fileExists(atPath: spec) { usleep(50_000) }
    }

    func awaitExit(pid: Int32?, statsPath: String?) {
        if let pid, isRunning(pid) {
            for _ in 0..<100 where Sys.processExists(pid) && isRunning(pid) { usleep(20_000) }
            if Sys.processExists(pid), isRunning(pid) {
                try? Sys.kill(pid, SIGTERM)
                for _ in 0..<50 where Sys.processExists(pid) && isRunning(pid) { usleep(20_000) }
            }
        }
        if let pid { _ = Sys.reap(pid) }
        if let stats = statsPath {
            for f in [stats, StateStore.sibling(of: stats, ".log")] { try? Sys.unlink(f) }
        }
    }

    /// Whether `pid` runs this server (a recorded pid may since belong to another process).
    func isRunning(_ pid: Int32) -> Bool {
        guard let raw = try? Sys.readFile("/proc/\(pid)/cmdline") else { return false }
        let argv = raw.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        return argv.count > 1 && argv[1] == command
    }

    /// The figures (and, beside them, the log) of the server of the mount at `mountpoint`.
    static func statsPath(stateRoot: String, mountpoint: String) -> String {
        try? Sys.mkdir(stateRoot + "/workers", mode: 0o700)
        return stateRoot + "/workers/" + StateStore.key(for: mountpoint)
    }
}
