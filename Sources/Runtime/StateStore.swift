#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Probe
import Syscall
import SystemPackage

/// One mount made by erofs-compat, as recorded in the state directory.
public struct MountRecord: Codable, Sendable, Equatable {
    public static let currentVersion = 1

    public var version = MountRecord.currentVersion
    public var source: String
    public var sourceKind: String
    public var backend: String
    public var mountpoint: String
    public var options: String
    /// The loop device, for the loop backend.
    public var device: String?
    /// A helper process, for backends that have one.
    public var workerPID: Int32?
    /// Seconds since the epoch.
    public var since: Double
    /// dev:ino of the source file when mounted, to recognise it again.
    public var sourceIdentity: String
    /// The kernel's mount id (statx STATX_MNT_ID) of the mount, to recognise it without mountinfo.
    public var mountID: UInt64?
    /// For remote sources: the cache file that is mounted, and the worker's progress file.
    public var cachePath: String?
    public var statsPath: String?
    /// "daemon" when `workerPID` is `erofs-compat daemon` serving the mount in-process (never
    /// signalled by `umount`; it notices the mount is gone by itself).
    public var servedBy: String?
    /// fuse-blob: where the FUSE filesystem holding the image file is mounted (under the state
    /// directory), unmounted after the EROFS mount on it.
    public var fuseMount: String?

    /// The `servedBy` of a mount served by `erofs-compat daemon`.
    public static let daemon = "daemon"
    public var servedByDaemon: Bool { servedBy == Self.daemon }
    /// Served by a FUSE server process (fuse-blob, fuse-erofs).
    public var isFuseServed: Bool { backend == Backend.fuseBlob.rawValue || backend == Backend.fuseErofs.rawValue }
}

/// The state directory (/run/erofs-compat by default): one JSON record per mount, keyed by the
/// canonical mountpoint, written atomically (temp + fsync + rename, 0600), and a lock file that
/// serialises concurrent mount/umount calls.
public struct StateStore: Sendable {
    public static let defaultRoot = "/run/erofs-compat"

    public let root: String
    public var mountsDir: String { root + "/mounts" }
    /// Host findings reused by the mount planner while nothing relevant changed.
    public var hostCache: String { root + "/host-findings.json" }

    /// An unprivileged user's own state (their fuse-erofs mounts): $XDG_RUNTIME_DIR/erofs-compat, or
    /// /run/user/UID/erofs-compat where the variable is unset.
    static func userRoot(_ env: [String: String]) -> String {
        (env["XDG_RUNTIME_DIR"].flatMap { $0.hasPrefix("/") ? $0 : nil } ?? "/run/user/\(Sys.effectiveUID)") + "/erofs-compat"
    }

    /// `root`, or $EROFS_COMPAT_STATE_DIR, or /run/erofs-compat for root and the user's runtime
    /// directory for anyone else.
    public init(root: String? = nil) {
        let env = ProcessInfo.processInfo.environment
        self.root = root ?? env["EROFS_COMPAT_STATE_DIR"] ?? (Sys.effectiveUID == 0 ? Self.defaultRoot : Self.userRoot(env))
    }

    /// The file name for a mountpoint: '/' becomes '-', bytes outside [A-Za-z0-9._] become _xx.
    public static func key(for mountpoint: String) -> String {
        var out = ""
        for b in mountpoint.utf8.dropFirst(mountpoint.hasPrefix("/") ? 1 : 0) {
            switch b {
            case UInt8(ascii: "/"): out += "-"
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "."):
                out.unicodeScalars.append(UnicodeScalar(b))
            default:
                out += "_" + String(hexByte: b)
            }
        }
        return (out.isEmpty ? "-" : out) + ".json"
    }

    /// A record's sibling file: `name.json` becomes `name` + `ext` (e.g. ".log", ".journal").
    package static func sibling(of path: String, _ ext: String) -> String {
        (path.hasSuffix(".json") ? String(path.dropLast(5)) : path) + ext
    }

    /// Creates the state directories (checked once per process; an operation that later finds them
    /// gone calls this again with `recheck`).
    package func ensureDirectories(recheck: Bool = false) throws {
        if !recheck, Self.ensured.withLock({ $0.contains(root) }) { return }
        if !Sys.isDirectory(mountsDir) {
            for d in [root, mountsDir] where !Sys.isDirectory(d) {
                do { try Sys.mkdir(d, mode: 0o700) } catch let e as Errno where e == .fileExists {}
                catch { throw RuntimeError.state("cannot create \(d): \(error)") }
            }
        }
        // As root, a state directory another user owns or can write would let them plant links
        // that root's record writes follow, or forge records that umount acts on.
        if Sys.effectiveUID == 0 {
            for d in [root, mountsDir] {
                if let why = Sys.unsafeDirectoryReason(d) {
                    throw RuntimeError.state("refusing state directory \(root): \(why); use a directory only root can write")
                }
            }
        }
        _ = Self.ensured.withLock { $0.insert(root) }
    }
    private static let ensured = Locked<Set<String>>([])

    /// Opens (creating, 0600) a file in the state directory, re-creating the directories once if they
    /// were removed since this process checked them.
    func openRecreatingDirectories(_ path: String, _ flags: Int32) throws -> FileDescriptor {
        do { return try Sys.openNoSymlinks(path, flags, mode: 0o600) } catch let e as Errno where e == .noSuchFileOrDirectory {
            try ensureDirectories(recheck: true)
            return try Sys.openNoSymlinks(path, flags, mode: 0o600)
        }
    }

    /// Runs `body` holding the exclusive state lock.
    public func withLock<T>(_ body: () throws -> T) throws -> T {
        try ensureDirectories()
        let fd: FileDescriptor
        do { fd = try openRecreatingDirectories(root + "/lock", O_RDWR | O_CREAT) } catch {
            throw RuntimeError.state("cannot open \(root)/lock: \(error)")
        }
        defer { Sys.close(fd.rawValue) }
        try Sys.flock(fd.rawValue, exclusive: true)
        defer { Sys.unlock(fd.rawValue) }
        return try body()
    }

    public func path(for mountpoint: String) -> String { mountsDir + "/" + Self.key(for: mountpoint) }

    public func load(_ mountpoint: String) -> MountRecord? {
        guard let bytes = try? Sys.readRegularFile(path(for: mountpoint)) else { return nil }
        return MountRecord.decode(bytes)
    }

    public func all() -> [MountRecord] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: mountsDir)) ?? []
        return names.filter { $0.hasSuffix(".json") }.sorted().compactMap { name in
            (try? Sys.readRegularFile(mountsDir + "/" + name)).flatMap(MountRecord.decode)
        }
    }

    /// Writes the record atomically: a temporary file in the same directory, fsync, rename, fsync dir
    /// (the directory fsync is skipped on tmpfs/ramfs, where it does nothing). `durable` false skips
    /// both fsyncs: for a record that only has to outlive a crash of this process, not of the host
    /// (the pending record before a mount exists: a reboot takes the mount with it).
    public func save(_ record: MountRecord, durable: Bool = true) throws {
        let bytes = record.jsonBytes()
        let final = path(for: record.mountpoint)
        let tmp = final + ".tmp.\(Sys.processID)"
        do {
            let fd = try openRecreatingDirectories(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_EXCL)
            defer { Sys.close(fd.rawValue) }
            try bytes.withUnsafeBytes { try Sys.pwriteAll(fd.rawValue, $0, at: 0) }
            if durable { try Sys.fsync(fd.rawValue) }
        } catch {
            try? Sys.unlink(tmp)
            throw RuntimeError.state("cannot write \(tmp): \(error)")
        }
        do {
            try Sys.rename(tmp, final)
            if durable, !Self.isMemoryBacked(mountsDir) {
                let dir = try Sys.open(mountsDir, O_RDONLY | O_DIRECTORY)
                defer { Sys.close(dir.rawValue) }
                try Sys.fsync(dir.rawValue)
            }
        } catch {
            try? Sys.unlink(tmp)
            throw RuntimeError.state("cannot commit \(final): \(error)")
        }
    }

    /// Whether `dir` is on tmpfs/ramfs (looked up once per directory and process).
    static func isMemoryBacked(_ dir: String) -> Bool {
        if let known = memoryBacked.withLock({ $0[dir] }) { return known }
        let v = (try? Sys.filesystemType(dir)).map(FilesystemMagic.isMemoryBacked) ?? false
        memoryBacked.withLock { $0[dir] = v }
        return v
    }
    private static let memoryBacked = Locked<[String: Bool]>([:])

    public func remove(_ mountpoint: String) {
        try? Sys.unlink(path(for: mountpoint))
    }
}
