import ArgumentParser
import Probe
import Runtime
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The backends `--backend` accepts: auto plus what this build implements.
enum BackendChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, fanotify, file, loop, fuse
    case fuseBlob = "fuse-blob", fuseErofs = "fuse-erofs"
    case nbd

    /// One backend, or nil for a choice among several (auto, fuse).
    var backend: Backend? { self == .auto || self == .fuse ? nil : Backend(rawValue: rawValue) }
    /// `fuse`: the first viable FUSE backend (fuse-blob for remote sources where the kernel has
    /// EROFS, else fuse-erofs).
    var allowed: Set<Backend>? { self == .fuse ? [.fuseBlob, .fuseErofs] : nil }
}

/// `erofs-compat mount SOURCE MOUNTPOINT`.
struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount a local, http(s) or OCI registry EROFS image with the best backend this host supports.",
        discussion: """
            SOURCE is a local EROFS image file, an http(s) URL, or oci://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST] \
            (an OCI registry: an image index is resolved for --platform, default this host; the image's only \
            layer, its only EROFS layer or --layer N is mounted, or --blob directly; the blob is verified \
            against its digest). Registry credentials: --username with --password-stdin, else --auth-file, \
            $REGISTRY_AUTH_FILE, $DOCKER_CONFIG/config.json, ~/.docker/config.json (credHelpers and \
            credsStore run docker-credential-NAME from PATH); Bearer tokens are \
            obtained from the registry's challenge. TLS is always verified; plain http only for \
            127.0.0.0/8 or with --insecure; a redirect never goes from https to http; a Bearer token realm \
            gets the credentials only over https or on this host. user:password in an http(s) URL is taken \
            out of it and sent like other credentials. Credentials never appear in arguments, logs or \
            state. A partly fetched image is cached per source (URL, or registry and repository): bytes one \
            server sent are never served for another; only a complete blob that matched its digest is \
            shared under the digest. The backend is chosen by the same planner \
            'probe' uses. Local: file (kernel EROFS straight from the file, Linux 6.12+) before loop (a \
            read-only, auto-clearing loop device) before fuse-erofs (erofs-compat's own EROFS reader over \
            FUSE: for kernels without EROFS or without the image's features or compression, and for users \
            without CAP_SYS_ADMIN through the setuid fusermount3, state under $XDG_RUNTIME_DIR). Remote: \
            fanotify (the image is fetched lazily into a sparse cache file as it is read, Linux 6.14+ with \
            the cache on ext4/xfs/btrfs; metadata is fetched before mounting; an unfetchable range fails the \
            read with EIO) before fuse-blob (the image as one FUSE file served lazily from the same cache, \
            kernel EROFS on it) before fuse-erofs (lazy too) before file or loop after a whole download. \
            FUSE servers are restarted if they crash; the kernel resends what the dead one had read. \
            --backend nbd: kernel EROFS on /dev/nbdN attached over netlink (or the device's ioctls where \
            this network namespace has no nbd family) to a server of the same cache (kernels with the nbd \
            driver); a crashed server is replaced and the device reconnected to it; umount disconnects it. With --backend auto, a failure the planner could not foresee \
            (ENOTBLK, ENODEV, EOPNOTSUPP) moves on to the next candidate and says so; a backend you name \
            is never replaced.

            Options for -o: ro (always), nosuid, nodev, noexec, noatime, directio, \
            cache_strategy=disabled|readahead|readaround, fsoffset=BYTES, user_xattr, nouser_xattr, acl, noacl; \
            remote images are mounted nosuid,nodev unless -o suid,dev is given.

            With 'erofs-compat daemon' running, a remote mount is performed and served by it (no process start \
            per mount); --no-daemon mounts from this command, --explain and --dry-run always do.

            State: one record per mount in /run/erofs-compat/mounts, for other users \
            $XDG_RUNTIME_DIR/erofs-compat/mounts ($EROFS_COMPAT_STATE_DIR overrides).

            Exit codes: 0 mounted (or planned, with --dry-run), 1 the mount failed, 2 usage error or bad -o \
            option, 3 bad source (missing, not EROFS, features this kernel lacks, unreachable URL, a server \
            without Range support, digest mismatch, bad OCI reference, registry or authentication errors, a \
            truncated image), 4 bad mountpoint (missing, not a directory, already a mount point, changed while \
            the mount was prepared), 5 not root (and no fuse-erofs mount through fusermount3 possible).
            """
    )

    @Option(help: "Backend: auto, fanotify (remote sources), file, loop, fuse-blob (remote sources), fuse-erofs, fuse (the first viable of the two), or nbd (kernel EROFS on /dev/nbdN).")
    var backend: BackendChoice = .auto

    @OptionGroup(title: "Remote sources")
    var remote: RemoteSourceOptions

    @Option(help: ArgumentHelp("Remote, lazy: fetch in the background at low priority: none, all, or the ranges of a profile file recorded with --record-profile.", valueName: "none|all|PROFILE"))
    var prefetch: String = "none"

    @Option(help: ArgumentHelp("Remote, lazy: record the ranges readers ask for into FILE (a profile for a later --prefetch).", valueName: "FILE"))
    var recordProfile: String?

    @Option(name: .customShort("o"), help: ArgumentHelp("Comma-separated mount options (repeatable).", valueName: "OPTIONS"))
    var options: [String] = []

    @Flag(help: "Print the planner's candidates with the reason each was taken or rejected.")
    var explain = false

    @Flag(help: "Validate and plan, but do not mount (implies --explain).")
    var dryRun = false

    @Flag(help: "Remote sources: mount from this process even when 'erofs-compat daemon' is running.")
    var noDaemon = false

    @Argument(help: "The EROFS image: a file, an http(s) URL or an oci:// reference.")
    var source: String

    @Argument(help: "An existing directory that is not already a mount point (its contents are hidden while mounted).")
    var mountpoint: String

    func validate() throws {
        try remote.validate(source: source)
        if prefetch != "none" || recordProfile != nil, !isRemote {
            throw ValidationError("--prefetch and --record-profile apply to remote (http(s) or oci://) sources only")
        }
    }

    var isRemote: Bool { ["oci://", "http://", "https://"].contains { source.hasPrefix($0) } }

    func printMounted(_ r: MountRecord) {
        print("mounted \(r.source) on \(r.mountpoint) (backend \(r.backend)\(r.device.map { ", \($0)" } ?? "")\(r.servedByDaemon ? ", served by the daemon" : ""))")
    }

    func run() throws {
        let runtime = Runtime()
        let remote = try self.remote.make(prefetch: Prefetch(argument: prefetch), recordProfile: recordProfile)
        var request = MountRequest(source: source, mountpoint: mountpoint, backend: backend.backend,
                                   options: try runtimeCall { try MountOptions(parsing: options) }, dryRun: dryRun, remote: remote)
        request.allowed = backend.allowed
        // A running daemon performs remote mounts (unless asked to only plan or explain).
        if isRemote, !dryRun, !explain, !noDaemon,
           let reply = try runtimeCall({ try DaemonClient.mount(DaemonRequest(request, environment: ProcessInfo.processInfo.environment),
                                                                socket: DaemonClient.socketPath(runtime.state)) }) {
            reply.notes.forEach { printError($0) }
            guard let r = reply.record else {
                throw CLIFailure(message: reply.message ?? "the daemon did not mount it", code: reply.exitCode ?? 1)
            }
            printMounted(r)
            return
        }
        let outcome = try runtimeCall { try runtime.mount(request) { printError($0) } }
        if source.hasPrefix("oci://") { outcome.notes.forEach { printError($0) } }
        if explain || dryRun {
            print(PlanText.render(outcome.plan, chosen: outcome.record.flatMap { Backend(rawValue: $0.backend) }))
        }
        outcome.record.map(printMounted)
    }
}

/// Maps Runtime errors to one line on stderr and their documented exit code.
func runtimeCall<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let e as RuntimeError {
        throw CLIFailure(message: e.description, code: e.exitCode.rawValue)
    }
}

/// The planner's candidates as lines of text.
enum PlanText {
    static func render(_ plan: Plan, chosen: Backend?) -> String {
        var lines = ["candidates for a \(plan.source.rawValue) image (best first):"]
        for c in plan.candidates {
            let mark = c.backend == chosen ? "used" : c.verdict.rawValue
            lines.append("  \(c.backend.rawValue.padding(9)) \(mark.padding(10)) \(c.reasons.joined(separator: "; "))")
        }
        return lines.joined(separator: "\n")
    }
}

extension String {
    func padding(_ n: Int) -> String { count >= n ? self : self + String(repeating: " ", count: n - count) }
}
