#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Probe
import Syscall
import SystemPackage

/// One mount made by erofs-compat, as recorded in the state directory. What the backend attached
/// and what serves the mount is `attached`, typed per backend; the file keeps the flat object every
/// version wrote (`backend`, `device`, `workerPID`, `cachePath`, `statsPath`, `servedBy`,
/// `fuseMount`), so records of earlier versions are read as they are and theirs can read these.
public struct MountRecord: Codable, Sendable, Equatable {
    public static let currentVersion = 1

    public var version = MountRecord.currentVersion
    public var source: String
    public var sourceKind: String
    public var mountpoint: String
    public var options: String
    /// Seconds since the epoch.
    public var since: Double
    /// dev:ino of the source file when mounted, to recognise it again.
    public var sourceIdentity: String
    /// The kernel's mount id (statx STATX_MNT_ID) of the mount, to recognise it without mountinfo.
    public var mountID: UInt64?
    public var attached: AttachedBackend

    /// The `servedBy` of a mount served by `erofs-compat daemon`.
    public static let daemon = "daemon"

    public init(source: String, sourceKind: String, backend: String, mountpoint: String, options: String,
                device: String?, workerPID: Int32?, since: Double, sourceIdentity: String, mountID: UInt64?,
                cachePath: String? = nil, statsPath: String? = nil, servedBy: String? = nil, fuseMount: String? = nil) {
        (self.source, self.sourceKind, self.mountpoint, self.options) = (source, sourceKind, mountpoint, options)
        (self.since, self.sourceIdentity, self.mountID) = (since, sourceIdentity, mountID)
        let kind = Backend(rawValue: backend)
        assert(kind != nil, "no backend \(backend)")
        let server = AttachedBackend.Server(pid: workerPID, stats: statsPath, daemon: servedBy == Self.daemon)
        attached = AttachedBackend(kind ?? .file, device: device, cache: cachePath, server: server,
                                   fuseMount: fuseMount)
    }

    /// The backend's name ("file", "loop", "fanotify", "fuse-blob", "fuse-erofs", "nbd").
    public var backend: String { attached.kind.rawValue }
    /// The block device the mount is on (loop, nbd; fuse-blob through a loop device).
    public var device: String? {
        get { attached.device }
        set { attached.device = newValue }
    }
    /// The serving process, for backends that have one.
    public var workerPID: Int32? {
        get { attached.server?.pid }
        set { attached.server?.pid = newValue }
    }
    /// For remote sources: the cache file that is mounted (fanotify, or a whole download).
    public var cachePath: String? {
        get { attached.cache }
        set { attached.cache = newValue }
    }
    /// The serving process's figures.
    public var statsPath: String? {
        get { attached.server?.stats }
        set { attached.server?.stats = newValue }
    }
    /// "daemon" when `workerPID` is `erofs-compat daemon` serving the mount in-process (never
    /// signalled by `umount`; it notices the mount is gone by itself).
    public var servedBy: String? {
        get { attached.server?.daemon == true ? Self.daemon : nil }
        set { attached.server?.daemon = newValue == Self.daemon }
    }
    /// fuse-blob: where the FUSE filesystem holding the image file is mounted (under the state
    /// directory), unmounted after the EROFS mount on it.
    public var fuseMount: String? {
        get { if case .fuseBlob(_, let m, _) = attached { return m } else { return nil } }
        set {
            guard case .fuseBlob(let s, _, let d) = attached else { return }
            attached = .fuseBlob(server: s, fuseMount: newValue, device: d)
        }
    }
    public var servedByDaemon: Bool { attached.server?.daemon == true }
    /// Served by a FUSE server process (fuse-blob, fuse-erofs).
    public var isFuseServed: Bool { attached.kind == .fuseBlob || attached.kind == .fuseErofs }

    enum CodingKeys: String, CodingKey {
        case version, source, sourceKind, backend, mountpoint, options, device, workerPID, since, sourceIdentity
        case mountID, cachePath, statsPath, servedBy, fuseMount
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let name = try c.decode(String.self, forKey: .backend)
        guard Backend(rawValue: name) != nil else {
            throw DecodingError.dataCorruptedError(forKey: .backend, in: c, debugDescription: "no backend \(name)")
        }
        func string(_ k: CodingKeys) throws -> String { try c.decode(String.self, forKey: k) }
        func optional(_ k: CodingKeys) throws -> String? { try c.decodeIfPresent(String.self, forKey: k) }
        self.init(source: try string(.source), sourceKind: try string(.sourceKind), backend: name,
                  mountpoint: try string(.mountpoint), options: try string(.options), device: try optional(.device),
                  workerPID: try c.decodeIfPresent(Int32.self, forKey: .workerPID),
                  since: try c.decode(Double.self, forKey: .since), sourceIdentity: try string(.sourceIdentity),
                  mountID: try c.decodeIfPresent(UInt64.self, forKey: .mountID),
                  cachePath: try optional(.cachePath), statsPath: try optional(.statsPath),
                  servedBy: try optional(.servedBy), fuseMount: try optional(.fuseMount))
        version = try c.decode(Int.self, forKey: .version)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(version, forKey: .version)
        try c.encode(source, forKey: .source)
        try c.encode(sourceKind, forKey: .sourceKind)
        try c.encode(backend, forKey: .backend)
        try c.encode(mountpoint, forKey: .mountpoint)
        try c.encode(options, forKey: .options)
        try c.encode(since, forKey: .since)
        try c.encode(sourceIdentity, forKey: .sourceIdentity)
        try c.encodeIfPresent(mountID, forKey: .mountID)
        try c.encodeIfPresent(device, forKey: .device)
        try c.encodeIfPresent(workerPID, forKey: .workerPID)
        try c.encodeIfPresent(cachePath, forKey: .cachePath)
        try c.encodeIfPresent(statsPath, forKey: .statsPath)
        try c.encodeIfPresent(servedBy, forKey: .servedBy)
        try c.encodeIfPresent(fuseMount, forKey: .fuseMount)
    }
}

/// What a backend attached and what serves the mount: each backend's own fields and no others.
public enum AttachedBackend: Codable, Sendable, Equatable {
    /// Kernel EROFS on the image file; `cache`: the cache file of a remote image downloaded whole.
    case file(cache: String?)
    /// Kernel EROFS on an auto-clearing loop device over the image (or the cache file).
    case loop(device: String?, cache: String?)
    /// Kernel EROFS on the lazy cache file, its reads answered through fanotify by `server`.
    case fanotify(cache: String?, server: Server)
    /// The image as one file of a private FUSE mount, kernel EROFS on it (through `device` where
    /// the kernel has no file-backed mounts).
    case fuseBlob(server: Server, fuseMount: String?, device: String?)
    /// The user-space EROFS reader served through FUSE.
    case fuseErofs(server: Server)
    /// Kernel EROFS on /dev/nbdN, served by `server`.
    case nbd(server: Server, device: String?)

    /// The process serving a mount and its figures.
    public struct Server: Codable, Sendable, Equatable {
        public var pid: Int32?
        public var stats: String?
        /// Served inside `erofs-compat daemon` (never signalled by `umount`).
        public var daemon: Bool
    }

    init(_ kind: Backend, device: String?, cache: String?, server: Server, fuseMount: String?) {
        switch kind {
        case .file: self = .file(cache: cache)
        case .loop: self = .loop(device: device, cache: cache)
        case .fanotify: self = .fanotify(cache: cache, server: server)
        case .fuseBlob: self = .fuseBlob(server: server, fuseMount: fuseMount, device: device)
        case .fuseErofs: self = .fuseErofs(server: server)
        case .nbd: self = .nbd(server: server, device: device)
        }
    }

    public var kind: Backend {
        switch self {
        case .file: return .file
        case .loop: return .loop
        case .fanotify: return .fanotify
        case .fuseBlob: return .fuseBlob
        case .fuseErofs: return .fuseErofs
        case .nbd: return .nbd
        }
    }

    /// The backend's block device; setting it on a backend without one does nothing.
    public var device: String? {
        get {
            switch self {
            case .loop(let d, _), .fuseBlob(_, _, let d), .nbd(_, let d): return d
            default: return nil
            }
        }
        set {
            switch self {
            case .loop(_, let c): self = .loop(device: newValue, cache: c)
            case .fuseBlob(let s, let m, _): self = .fuseBlob(server: s, fuseMount: m, device: newValue)
            case .nbd(let s, _): self = .nbd(server: s, device: newValue)
            default: break
            }
        }
    }

    /// The cache file mounted; setting it on a backend that mounts none does nothing.
    public var cache: String? {
        get {
            switch self {
            case .file(let c), .loop(_, let c), .fanotify(let c, _): return c
            default: return nil
            }
        }
        set {
            switch self {
            case .file: self = .file(cache: newValue)
            case .loop(let d, _): self = .loop(device: d, cache: newValue)
            case .fanotify(_, let s): self = .fanotify(cache: newValue, server: s)
            default: break
            }
        }
    }

    /// What serves the mount (nil for file and loop, which need nothing once attached).
    public var server: Server? {
        get {
            switch self {
            case .fanotify(_, let s), .fuseBlob(let s, _, _), .fuseErofs(let s), .nbd(let s, _): return s
            case .file, .loop: return nil
            }
        }
        set {
            guard let s = newValue else { return }
            switch self {
            case .fanotify(let c, _): self = .fanotify(cache: c, server: s)
            case .fuseBlob(_, let m, let d): self = .fuseBlob(server: s, fuseMount: m, device: d)
            case .fuseErofs: self = .fuseErofs(server: s)
            case .nbd(_, let d): self = .nbd(server: s, device: d)
            case .file, .loop: break
            }
        }
    }
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
