import ArgumentParser
import Glibc
import NBD
import Runtime
import Syscall

/// `erofs-compat nbd …`: EROFS images as NBD exports.
struct NBDCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nbd",
        abstract: "Serve an EROFS image as a read-only NBD export (lazily, for remote images).",
        subcommands: [NBDServeCommand.self]
    )
}

/// `erofs-compat nbd serve SOURCE (--socket PATH | --fd N) [--export-name NAME]`.
struct NBDServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve SOURCE (a local image, an http(s) URL or an oci:// reference) as a read-only NBD export.",
        discussion: """
            Fixed newstyle negotiation (EXPORT_NAME, INFO, GO, LIST, ABORT, STRUCTURED_REPLY); READ, CACHE \
            (fetch into the cache now), FLUSH and DISC; writes and trims are refused (EPERM), ranges past the \
            end are EINVAL, requests above the maximum block size (32 MiB) EOVERFLOW. Block sizes: any range \
            may be read, the preferred size is the cache granule. Several connections and many requests at \
            once; a reply leaves only when its data is in hand, and a range that cannot be fetched is an EIO \
            error reply, never zeros. A remote SOURCE is fetched as clients read it into the same per-source \
            cache a lazy mount uses (checked against its digest when complete; a mismatch fails every further \
            read), with the same credential and TLS rules as 'mount'.

            --socket PATH listens on a unix socket (mode 0600; removed at exit) until SIGTERM or SIGINT; \
            --fd N serves one already connected stream socket (e.g. one end of a socketpair) until it closes.

            Exit codes: 0 served until stopped or the connection ended, 1 could not listen, 2 usage error, 3 bad \
            source (as for mount), 5 not root (remote sources: the cache is root's).
            """
    )

    @Option(help: ArgumentHelp("Listen on this unix socket.", valueName: "PATH"))
    var socket: String?

    @Option(help: ArgumentHelp("Serve one connected stream socket inherited as this descriptor.", valueName: "N"))
    var fd: Int32?

    @Option(help: ArgumentHelp("The export's name (default: the source's file name; \"\" always names it too).", valueName: "NAME"))
    var exportName: String?

    @OptionGroup(title: "Remote sources")
    var remote: RemoteSourceOptions

    @Argument(help: "The EROFS image: a file, an http(s) URL or an oci:// reference.")
    var source: String

    func validate() throws {
        guard (socket == nil) != (fd == nil) else { throw ValidationError("pass exactly one of --socket PATH and --fd N") }
        if let fd, fd < 3 { throw ValidationError("--fd must name an inherited socket (3 or more)") }
        try remote.validate(source: source)
    }

    func run() throws {
        let isRemote = ["oci://", "http://", "https://"].contains { source.hasPrefix($0) }
        if isRemote, geteuid() != 0 { throw CLIFailure(message: "nbd serve of a remote source needs root (the cache is root's); run it with sudo", code: 5) }
        if let path = socket, let reason = NBDListener.refusal(path) { throw CLIFailure(message: reason, code: 1) }
        // Before any thread starts: every thread inherits the mask, so only sigwait sees them.
        if socket != nil { NBDListener.blockStopSignals() }
        let options = try remote.make()
        let served = try runtimeCall { try Runtime().openServedSource(source, remote: options) }
        defer { served.close() }
        let name = exportName ?? String(source.split(separator: "/").last ?? "image")
        let export = NBDExport(name: name, description: served.description, size: served.size, preferredBlock: served.granule)
        let server = NBDServer(exports: [export], read: { try served.read(offset: $0, length: $1) },
                               region: { try served.region(offset: $0, length: $1).map { ($0.fd, $0.offset) } },
                               prefetch: { try served.prefetch(offset: $0, length: $1) }, log: { printError($0) })
        if let fd {
            server.serve(connection: fd)
            return
        }
        try NBDListener.serve(server, at: socket!, name: name)
    }
}

/// The listening side of `nbd serve --socket`: refuses to replace anything but a stale socket,
/// serves until SIGTERM or SIGINT, removes the socket.
enum NBDListener {
    /// Why `path` cannot be listened on, if it cannot.
    static func refusal(_ path: String) -> String? {
        guard let st = try? Sys.lstat(path) else { return nil }
        guard st.st_mode & S_IFMT == S_IFSOCK else { return "--socket \(path) exists and is not a socket; remove it or pick another path" }
        if let other = try? Sys.unixConnect(path) {
            Sys.close(other)
            return "--socket \(path): something already listens there; stop it or pick another path"
        }
        return nil
    }

    static var stopSignals: sigset_t {
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGINT)
        return signals
    }

    static func blockStopSignals() {
        var signals = stopSignals
        pthread_sigmask(SIG_BLOCK, &signals, nil)
    }

    static func serve(_ server: NBDServer, at path: String, name: String) throws {
        let listener: Int32
        do { listener = try Sys.unixListen(path) } catch {
            throw CLIFailure(message: "cannot listen on \(path): \(error)", code: 1)
        }
        defer {
            Sys.close(listener)
            _ = unlink(path)
        }
        let stop = Locked(false)
        var signals = stopSignals
        Threads.detach {
            var sig: Int32 = 0
            sigwait(&signals, &sig)
            stop.set(true)
        }
        printError("serving export '\(name)' on \(path)")
        server.serve(listening: listener, until: stop)
    }
}
