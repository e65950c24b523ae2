import ArgumentParser
import Probe
import Runtime

/// The backends `--backend` accepts: auto plus what this build implements.
enum BackendChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, fanotify, file, loop

    var backend: Backend? { self == .auto ? nil : Backend(rawValue: rawValue) }
}

/// `erofs-compat mount SOURCE MOUNTPOINT`.
struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount a local or http(s) EROFS image with the best backend this host supports.",
        discussion: """
            SOURCE is a local EROFS image file or an http(s) URL. The backend is chosen by the same planner
            'probe' uses. Local: file (kernel EROFS straight from the file, Linux 6.12+) before loop (a
            read-only, auto-clearing loop device). Remote: fanotify (the image is fetched lazily into a
            sparse cache file as it is read, Linux 6.14+ with the cache on ext4/xfs/btrfs; metadata is
            fetched before mounting; an unfetchable range fails the read with EIO) before file or loop
            after a whole download. With --backend auto, a failure the planner could not foresee
            (ENOTBLK, ENODEV, EOPNOTSUPP) moves on to the next candidate and says so; a backend you name
            is never replaced.

            Options for -o: ro (always), nosuid, nodev, noexec, noatime, directio,
            cache_strategy=disabled|readahead|readaround, fsoffset=BYTES, user_xattr, nouser_xattr, acl, noacl.

            State: one record per mount in /run/erofs-compat/mounts ($EROFS_COMPAT_STATE_DIR overrides).

            Exit codes: 0 mounted (or planned, with --dry-run), 1 the mount failed, 2 usage error or bad -o
            option, 3 bad source (missing, not EROFS, features this kernel lacks, unreachable URL, a server
            without Range support, digest mismatch), 4 bad mountpoint (missing, not a directory, already a
            mount point), 5 not root.
            """
    )

    @Option(help: "Backend: auto, fanotify (remote sources), file or loop.")
    var backend: BackendChoice = .auto

    @Option(help: ArgumentHelp("Cache directory for remote images (ext4, xfs or btrfs for lazy mounts).", valueName: "DIR"))
    var cacheDir: String = "/var/cache/erofs-compat"

    @Flag(help: "Accept a server that ignores Range requests by downloading the whole image first.")
    var allowFullDownload = false

    @Option(help: ArgumentHelp("Expected sha256 of the remote image, checked when the cache is complete.", valueName: "sha256:HEX"))
    var digest: String?

    @Option(name: .customShort("o"), help: ArgumentHelp("Comma-separated mount options (repeatable).", valueName: "OPTIONS"))
    var options: [String] = []

    @Flag(help: "Print the planner's candidates with the reason each was taken or rejected.")
    var explain = false

    @Flag(help: "Validate and plan, but do not mount (implies --explain).")
    var dryRun = false

    @Argument(help: "The EROFS image file.")
    var source: String

    @Argument(help: "An existing empty directory.")
    var mountpoint: String

    func run() throws {
        let runtime = Runtime()
        let remote = RemoteOptions(cacheDir: cacheDir, allowFullDownload: allowFullDownload,
                                   digest: digest.map { $0.hasPrefix("sha256:") ? String($0.dropFirst(7)) : $0 })
        let request = MountRequest(source: source, mountpoint: mountpoint, backend: backend.backend,
                                   options: try runtimeCall { try MountOptions(parsing: options) }, dryRun: dryRun, remote: remote)
        let outcome = try runtimeCall { try runtime.mount(request) { printError($0) } }
        if explain || dryRun {
            print(PlanText.render(outcome.plan, chosen: outcome.record.flatMap { Backend(rawValue: $0.backend) }))
        }
        if let r = outcome.record {
            print("mounted \(r.source) on \(r.mountpoint) (backend \(r.backend)\(r.device.map { ", \($0)" } ?? ""))")
        }
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
