import ArgumentParser
import Glibc
import Runtime

/// `erofs-compat daemon`: the resident mount service.
struct DaemonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "daemon",
        abstract: "Serve remote mounts from a resident process (what the systemd unit runs).",
        discussion: """
            While it runs, 'erofs-compat mount' of an http(s) or oci:// source is performed by the daemon \
            (the command connects to its socket, default /run/erofs-compat/daemon.sock, root only): no process \
            start per mount, and every backend's serving (fanotify, fuse-blob, fuse-erofs, nbd; an nbd device \
            set up through ioctls keeps a supervisor of its own) runs in the daemon's shared threads. What \
            each mount needs to outlive a crash (a fanotify group, cache writer and lock; /dev/fuse and its \
            request journal; an nbd socket; credentials) is kept in the service \
            manager's file-descriptor store, so a crash never lets a reader see unfetched bytes; the restarted \
            daemon serves every mount again. Under systemd (Type=notify, FileDescriptorStoreMax=, socket \
            activation with FileDescriptorName=control) systemd is that manager; started by hand, a small \
            keeper process is. On SIGTERM every mount is handed to a per-mount supervisor process and keeps \
            working.

            Exit codes: 0 stopped cleanly, 1 could not start (socket) or could not hand a mount over, 5 not root.
            """
    )

    @Option(help: ArgumentHelp("The socket to listen on (default: daemon.sock in the state directory).", valueName: "PATH"))
    var socket: String?

    @Option(help: .hidden)
    var storedFds: String?

    func run() throws {
        let state = StateStore()
        if storedFds != nil || getenv("NOTIFY_SOCKET") != nil {
            var stored: [(name: String, fd: Int32)]?
            if let list = storedFds {
                stored = list.split(separator: ",").compactMap { item in
                    guard let eq = item.lastIndex(of: "="), let fd = Int32(item[item.index(after: eq)...]) else { return nil }
                    return (String(item[..<eq]), fd)
                }
            }
            throw ExitCode(Daemon(state: state, socketPath: socket).run(stored: stored))
        }
        guard getuid() == 0 else { throw CLIFailure(message: "daemon: must run as root (it mounts)", code: 5) }
        try? state.ensureDirectories()
        var args = ["daemon"]
        if let socket { args += ["--socket", socket] }
        throw ExitCode(DaemonKeeper.run(executable: Runtime.workerExecutable, arguments: args, notifyPath: state.root + "/daemon.notify.\(getpid())",
                                        socketPath: socket ?? DaemonClient.socketPath(state)))
    }
}
