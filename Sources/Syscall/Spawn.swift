import CHeaders
import Dispatch
import Glibc
import SystemPackage

extension Sys {
    /// Starts `path` with `args` in a new session, stdin/stdout on /dev/null, stderr appended to
    /// `logPath`, keeping only `keep` (plus 0–2) open in the child. Returns the child's pid.
    package static func spawnDetached(_ path: String, _ args: [String], keep: [Int32], logPath: String,
                                      environment: [String: String]? = nil) throws -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, logPath, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW, 0o600)
        closeInherited(except: keep)
        // dup2(fd, fd) in the child clears its close-on-exec flag there only: the parent's descriptors
        // stay close-on-exec, so a spawn on another thread can never inherit them.
        for fd in keep { posix_spawn_file_actions_adddup2(&actions, fd, fd) }
        // A descriptor another thread opened without O_CLOEXEC after the scan above (a library's)
        // must not live on in a long-lived child either: it could keep a mount busy for ever.
        _ = ecx_spawn_addclosefrom(&actions, (keep.max() ?? 2) + 1)
        return try spawn(path, args, actions: &actions, environment: environment, newSession: true)
    }

    /// Starts `path` with `args` and `environment` as a child in this session: stdin on /dev/null,
    /// stdout and stderr shared, `keep` (plus 0–2) open in it.
    package static func spawnChild(_ path: String, _ args: [String], keep: [Int32], environment: [String: String]) throws -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        for fd in keep { posix_spawn_file_actions_adddup2(&actions, fd, fd) }
        closeInherited(except: keep)
        _ = ecx_spawn_addclosefrom(&actions, (keep.max() ?? 2) + 1)
        return try spawn(path, args, actions: &actions, environment: environment, newSession: false)
    }

    /// Marks close-on-exec every descriptor above 2 that this process did not open itself that way
    /// (ones it inherited: a caller's pipe or socket, a descriptor handed to it), except `keep`:
    /// a long-lived helper must not hold them open, or whoever waits for their other end waits for ever.
    static func closeInherited(except keep: [Int32]) {
        guard let dir = opendir("/proc/self/fd") else { return }
        defer { closedir(dir) }
        let own = dirfd(dir)
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let fd = Int32(name), fd > 2, fd != own, !keep.contains(fd) else { continue }
            let flags = fcntl(fd, F_GETFD)
            if flags >= 0, flags & FD_CLOEXEC == 0 { _ = fcntl(fd, F_SETFD, flags | FD_CLOEXEC) }
        }
    }

    /// posix_spawn with a clean signal state: callers on thread pools have most signals blocked, which
    /// the child would otherwise inherit (and then ignore SIGTERM); common signals back to default.
    /// `environment` nil: this process's.
    static func spawn(_ path: String, _ args: [String], actions: inout posix_spawn_file_actions_t,
                      environment: [String: String]?, newSession: Bool) throws -> Int32 {
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGQUIT] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, (newSession ? ecx_posix_spawn_setsid : 0) | Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + args).map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?]? = environment.map { $0.map { strdup("\($0.key)=\($0.value)") } + [nil] }
        defer { (argv + (envp ?? [])).forEach { free($0) } }
        var pid: pid_t = 0
        // ETXTBSY: the program was written moments ago and a child that another thread is spawning
        // still holds a copy of the writer's descriptor until its own exec; that lasts microseconds.
        var attempts = 0
        while true {
            let rc = envp.map { e in e.withUnsafeBufferPointer { posix_spawn(&pid, path, &actions, &attr, argv, $0.baseAddress) } }
                ?? posix_spawn(&pid, path, &actions, &attr, argv, environ)
            if rc == ETXTBSY, attempts < 50 { attempts += 1; usleep(2_000); continue }
            guard rc == 0 else { throw Errno(rawValue: rc) }
            return pid
        }
    }

    /// Runs `path` with `args` and `environment`, `input` on its stdin; returns its exit status (nil
    /// when killed, e.g. after `timeoutMs`) and what it wrote to stdout and stderr (each up to 1 MiB).
    package static func run(_ path: String, _ args: [String], input: [UInt8], environment: [String: String],
                            timeoutMs: Int32) throws -> (status: Int32?, stdout: [UInt8], stderr: [UInt8]) {
        // The input is in the pipe before the child exists: a child that does not read it cannot raise
        // SIGPIPE here.
        let inR = try pipe(holding: input)
        let (outR, outW) = try pipe()
        let (errR, errW) = try pipe()
        defer { [outR, errR].forEach { close($0) } }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, inR, 0)
        posix_spawn_file_actions_adddup2(&actions, outW, 1)
        posix_spawn_file_actions_adddup2(&actions, errW, 2)
        let spawned = Result { try spawn(path, args, actions: &actions, environment: environment, newSession: false) }
        [inR, outW, errW].forEach { close($0) }
        let pid = try spawned.get()
        var out: [UInt8] = [], err: [UInt8] = []
        var open: [Int32] = [outR, errR]
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(timeoutMs) * 1_000_000
        var buf = [UInt8](repeating: 0, count: 65536)
        while !open.isEmpty {
            let now = DispatchTime.now().uptimeNanoseconds
            guard now < deadline else { _ = Glibc.kill(pid, SIGKILL); break }
            let left = (deadline - now) / 1_000_000 + 1
            var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let n = Glibc.poll(&fds, nfds_t(fds.count), Int32(clamping: left))
            if n < 0 { if errno == EINTR { continue }; break }
            for p in fds where p.revents != 0 {
                let got = buf.withUnsafeMutableBytes { Glibc.read(p.fd, $0.baseAddress, $0.count) }
                if got <= 0 { open.removeAll { $0 == p.fd }; continue }
                if p.fd == outR { if out.count < 1 << 20 { out += buf[0..<got] } } else if err.count < 1 << 20 { err += buf[0..<got] }
            }
        }
        return (wait(pid).code, out, err)
    }

    /// `name` found in the directories of `path` (a $PATH value), as an executable file.
    package static func which(_ name: String, path: String) -> String? {
        for dir in path.split(separator: ":") where !dir.isEmpty {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0, isRegularFile(candidate) { return candidate }
        }
        return nil
    }

    /// The read end of a pipe that already holds `bytes`, its write end closed: a child reads them
    /// (then EOF) without them appearing in its arguments or environment. They must fit the pipe
    /// buffer, since nobody reads before the child starts.
    package static func pipe(holding bytes: [UInt8]) throws -> Int32 {
        guard bytes.count < 60_000 else { throw Errno.noBufferSpace }
        let (r, w) = try pipe()
        defer { close(w) }
        do { _ = try FileDescriptor(rawValue: w).writeAll(bytes) } catch {
            close(r)
            throw error
        }
        return r
    }

    /// One line from `fd` (without its newline): what a helper reports on its ready pipe; "" on EOF
    /// or when nothing complete arrived within `timeoutMs`.
    package static func readLine(_ fd: Int32, timeoutMs: Int32) -> String {
        var line = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 512)
        while !line.contains(0x0A) {
            guard (try? poll(fd, timeoutMs: timeoutMs)) == true,
                  let n = try? buf.withUnsafeMutableBytes({ try read(fd, into: $0) }), n > 0 else { break }
            line += buf[0..<n]
        }
        return String(decoding: line.prefix { $0 != 0x0A }, as: UTF8.self)
    }

    /// A pipe (both ends close-on-exec).
    package static func pipe() throws -> (read: Int32, write: Int32) {
        var fds: [Int32] = [0, 0]
        _ = try call { ecx_pipe2(&fds, O_CLOEXEC) }
        return (fds[0], fds[1])
    }

    /// Reaps a child without blocking; true when it has exited.
    package static func reap(_ pid: Int32) -> Bool {
        var status: Int32 = 0
        return waitpid(pid, &status, WNOHANG) == pid
    }

    /// Waits for a child: its exit code, or the signal that killed it.
    package static func wait(_ pid: Int32) -> (code: Int32?, signal: Int32?) {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { return (nil, nil) }
        }
        if status & 0x7f == 0 { return ((status >> 8) & 0xff, nil) }
        return (nil, status & 0x7f)
    }

    /// This executable's path.
    package static func executablePath() -> String {
        (try? realpath("/proc/self/exe")) ?? CommandLine.arguments[0]
    }
}
