/// Everything `mount`, `umount` and `status` can refuse or fail with: a one-line message that names
/// the thing and what to do, and the documented exit code.
public enum RuntimeError: Error, Equatable, CustomStringConvertible {
    /// Exit codes (documented in the README and in `--help`).
    public enum ExitCode: Int32, Sendable {
        case mountFailed = 1
        case usage = 2
        case badSource = 3
        case badMountpoint = 4
        case notPermitted = 5
        case notOurs = 6
    }

    case sourceMissing(String)
    case sourceNotFile(String)
    case sourceUnreadable(String, detail: String)
    case notEROFS(String, detail: String)
    case imageTruncated(String, detail: String)
    case unsupportedFeatures(String, features: String)
    case mountpointMissing(String)
    case mountpointNotDirectory(String)
    case mountpointBusy(String, by: String)
    case mountpointChanged(String, detail: String)
    case alreadyMounted(String, source: String)
    case notPrivileged(String)
    case unknownOption(String)
    case badOptionValue(String, detail: String)
    case backendUnavailable(String, reasons: String)
    case noBackend(String)
    case mountFailed(backend: String, detail: String)
    case notMounted(String)
    case notOurs(String, owner: String)
    case state(String)
    case remote(String)
    /// A registry refused or could not be reached while pushing.
    case pushFailed(String)

    public var exitCode: ExitCode {
        switch self {
        case .sourceMissing, .sourceNotFile, .sourceUnreadable, .notEROFS, .imageTruncated, .unsupportedFeatures: return .badSource
        case .mountpointMissing, .mountpointNotDirectory, .mountpointBusy, .mountpointChanged, .alreadyMounted: return .badMountpoint
        case .notPrivileged: return .notPermitted
        case .unknownOption, .badOptionValue: return .usage
        case .backendUnavailable, .noBackend, .mountFailed, .state, .pushFailed: return .mountFailed
        case .remote: return .badSource
        case .notMounted, .notOurs: return .notOurs
        }
    }

    public var description: String {
        switch self {
        case .sourceMissing(let p): return "source '\(p)' does not exist; pass the path of an EROFS image"
        case .sourceNotFile(let p): return "source '\(p)' is not a regular file; pass an EROFS image file"
        case .sourceUnreadable(let p, let d): return "source '\(p)' cannot be read (\(d)); check its permissions or mount it as a user who can read it"
        case .notEROFS(let p, let d):
            let why = d.hasPrefix("not an EROFS image (") ? String(d.dropFirst("not an EROFS image (".count).dropLast()) : d
            return "source '\(p)' is not an EROFS image (\(why)); check the path or build it with mkfs.erofs"
        case .imageTruncated(let p, let d): return "image '\(p)' is \(d); download or build it again"
        case .unsupportedFeatures(let p, let f): return "image '\(p)' uses features this kernel lacks: \(f); use a newer kernel or rebuild the image without them"
        case .mountpointMissing(let p): return "mountpoint '\(p)' does not exist; create it with mkdir first"
        case .mountpointNotDirectory(let p): return "mountpoint '\(p)' is not a directory; pass a directory"
        case .mountpointBusy(let p, let by): return "mountpoint '\(p)' is already a mount point (\(by)); unmount it or choose another directory"
        case .mountpointChanged(let p, let d):
            return "mountpoint '\(p)' changed while the mount was prepared (\(d)); nothing was mounted, check who can write its parents"
        case .alreadyMounted(let p, let s): return "'\(s)' is already mounted on '\(p)' by erofs-compat; run 'erofs-compat umount \(p)' first"
        case .notPrivileged(let what): return "\(what) needs root (CAP_SYS_ADMIN); run it with sudo"
        case .unknownOption(let o): return "unknown mount option '\(o)'; known: \(MountOptions.known.joined(separator: ", "))"
        case .badOptionValue(let o, let d): return "bad value for mount option '\(o)': \(d)"
        case .backendUnavailable(let b, let r): return "backend '\(b)' cannot mount here: \(r); run 'erofs-compat probe' for details or use --backend auto"
        case .noBackend(let r): return "no backend can mount this image here: \(r); run 'erofs-compat probe' for details"
        case .mountFailed(let b, let d): return "\(b) mount failed: \(d)"
        case .notMounted(let p): return "nothing is mounted on '\(p)'; 'erofs-compat status' lists the mounts this tool made"
        case .notOurs(let p, let owner): return "'\(p)' was not mounted by erofs-compat (it is \(owner)); use umount(8) for it"
        case .state(let d): return "state directory problem: \(d)"
        case .remote(let d): return d
        case .pushFailed(let d): return "push failed: \(d)"
        }
    }
}
