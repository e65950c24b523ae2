import CHeaders
import Glibc
import Probe
import Remote
import Syscall
import SystemPackage

/// A checked mountpoint: its canonical path and the directory itself, opened once (O_PATH, no
/// symlink anywhere on the path) when it was validated. Backends attach to the descriptor, so a
/// path component swapped for a symlink after the check (network I/O can take seconds) cannot
/// redirect the mount onto another directory.
final class MountTarget: @unchecked Sendable {  // immutable after init; the descriptor is only read
    let path: String
    let fd: FileDescriptor

    /// Opens `path` (relative or symlinked paths are canonicalised first) and checks it is a directory.
    init(_ path: String) throws {
        guard let (fd, p) = try? Sys.openCanonical(path, ecx_o_path) else { throw RuntimeError.mountpointMissing(path) }
        guard let st = try? Sys.fstat(fd.rawValue), st.st_mode & S_IFMT == S_IFDIR else {
            Sys.close(fd.rawValue)
            throw RuntimeError.mountpointNotDirectory(path)
        }
        (self.path, self.fd) = (p, fd)
    }

    deinit { Sys.close(fd.rawValue) }

    /// Whether something is mounted on the directory now. The path is walked again (no symlinks)
    /// since a mount stacked on the directory is seen only through the path, and what it leads to
    /// must still be this directory: a path that now names another one is refused.
    func isMountRoot() throws -> Bool {
        let now: FileDescriptor
        do { now = try Sys.openNoSymlinks(path, ecx_o_path) } catch {
            throw RuntimeError.mountpointChanged(path, detail: "\(error)")
        }
        defer { Sys.close(now.rawValue) }
        let root = try Sys.mountIdentity(fd: now.rawValue).isRoot ?? (MountInfo.mount(at: path, in: MountInfo.current()) != nil)
        if root { return true }
        let (a, b) = (try Sys.fstat(fd.rawValue), try Sys.fstat(now.rawValue))
        guard a.st_dev == b.st_dev, a.st_ino == b.st_ino else {
            throw RuntimeError.mountpointChanged(path, detail: "it names another directory than when it was checked")
        }
        return false
    }

    /// The mount id now at the directory (after attaching: the new mount's).
    var mountID: UInt64? { try? Sys.mountIdentity(path).id }

    /// The path mount(2) can be given for the descriptor (kernels without the new mount API).
    var procPath: String { "/proc/self/fd/\(fd.rawValue)" }
}

/// A validated request, ready for a backend.
struct PreparedMount {
    var source: String
    var target: MountTarget
    var options: MountOptions
    var blockSize: Int
    /// Where served backends keep their servers' figures and private mounts.
    var stateRoot: String
    /// For remote sources served by a backend of its own (FUSE): the cache and how to fetch.
    var remote: RemoteOptions?
    /// The daemon's served-mount host: a served backend's server runs there, not in a process of its own.
    var host: InProcessServing?
    /// A remote source as the mount resolved it (its cache entry reconciled), with its credentials:
    /// served as it is. Nil: the server resolves `remote` itself.
    var blob: BlobSpec?
    var credentials: [UInt8]?
    /// The mount's own fetcher of `blob`, for a server hosted in this process (the daemon): it holds
    /// the probe's first bytes, which then go into the cache entry instead of being fetched again.
    var fetcher: HTTPBlob?

    /// The spec of the server of this mount.
    func serveSpec(_ frontend: ServeSpec.Frontend, _ filesystem: ServeSpec.Filesystem, statsPath: String) -> ServeSpec {
        var s = ServeSpec(frontend: frontend, filesystem: filesystem, source: source, mountpoint: mountpoint,
                          statsPath: statsPath, blob: blob, remote: blob == nil ? remote : nil)
        s.credentials = credentials
        return s
    }
    var mountpoint: String { target.path }
}

/// What a backend attached.
struct Attachment {
    var device: String?
    var workerPID: Int32?
    var statsPath: String?
    var fuseMount: String?
    /// Served by the daemon (`workerPID` is the daemon's).
    var servedByDaemon = false
}

extension MountRecord {
    /// What the backend attached, for `status` and `umount`.
    mutating func apply(_ a: Attachment) {
        (device, workerPID, statsPath, fuseMount) = (a.device, a.workerPID, a.statsPath, a.fuseMount)
        if a.servedByDaemon { servedBy = Self.daemon }
    }
}

/// A backend failure; `fallback` marks failures the planner could not foresee (ENOTBLK, ENODEV,
/// EOPNOTSUPP) after which `auto` may try the next candidate.
struct BackendFailure: Error {
    var detail: String
    var fallback: Bool
}

/// A way to attach an image at a mountpoint.
protocol MountBackend: Sendable {
    var kind: Backend { get }
    func attach(_ request: PreparedMount) throws -> Attachment
    /// Releases what `attach` set up beyond the mount itself, after the mount is gone.
    func release(_ record: MountRecord)
    /// The same after `umount --lazy`: what still serves open files must stay (it ends by itself).
    func release(_ record: MountRecord, lazy: Bool)
    /// Whether a mountinfo entry at the record's mountpoint is the mount this backend made.
    func recognises(_ m: MountInfoEntry, as r: MountRecord) -> Bool
    /// For backends on a device: whether it is still bound to what the record mounted (nil: no
    /// device, or nothing to tell).
    func deviceBound(_ r: MountRecord) -> Bool?
}

extension MountBackend {
    func release(_ record: MountRecord, lazy: Bool) { release(record) }

    /// Kernel EROFS from the recorded image, device or cache file.
    func recognises(_ m: MountInfoEntry, as r: MountRecord) -> Bool { Backends.isKernelEROFS(m, of: r) }

    func deviceBound(_ r: MountRecord) -> Bool? { nil }
}

enum Backends {
    static let all: [Backend: any MountBackend] = [.file: FileBackend(), .loop: LoopBackend(), .fuseErofs: FuseErofsBackend(),
                                                   .fuseBlob: FuseBlobBackend(), .nbd: NbdBackend(),
                                                   .fanotify: FanotifyBackend()]

    /// The implementation that made the record's mount.
    static func implementation(of r: MountRecord) -> (any MountBackend)? { all[r.attached.kind] }

    /// Whether the mountinfo entry is the record's mount, as its backend recognises it.
    static func recognises(_ m: MountInfoEntry, as r: MountRecord) -> Bool {
        implementation(of: r)?.recognises(m, as: r) ?? isKernelEROFS(m, of: r)
    }

    /// Whether the record's device is still bound to what it mounted (nil: no device).
    static func deviceBound(_ r: MountRecord) -> Bool? { implementation(of: r)?.deviceBound(r) }

    static func isKernelEROFS(_ m: MountInfoEntry, of r: MountRecord) -> Bool {
        m.fsType == "erofs" && (m.source == r.source || m.source == r.device || m.source == r.cachePath)
    }

    /// The kernel EROFS mounts of `file` (an image or cache file mounted file-backed): who reads it.
    static func kernelEROFSMounts(of file: String, in mounts: [MountInfoEntry] = MountInfo.current())
        -> [MountInfoEntry] {
        mounts.filter { $0.fsType == "erofs" && $0.source == file }
    }

    /// Every kernel EROFS mount whose source is a path (a file or a device), for in-use checks.
    static func kernelEROFSMountsOfPaths(in mounts: [MountInfoEntry]) -> [MountInfoEntry] {
        mounts.filter { $0.fsType == "erofs" && $0.source.hasPrefix("/") }
    }
}

/// Builds and attaches an EROFS superblock from `source` with the new mount API, passing the EROFS
/// options; falls back to mount(2) when the kernel has no fsopen.
func attachEROFS(source: String, at target: MountTarget, options: MountOptions, passOffset: Bool) throws {
    let fc: MountAPI.Context
    do {
        fc = try MountAPI.fsopen("erofs")
    } catch let e as Errno where e == .noFunction {
        var data = options.erofs
        if passOffset, options.fsOffset > 0 { data.append("fsoffset=\(options.fsOffset)") }
        do {
            try MountAPI.mount(source: source, target: target.procPath, type: "erofs", flags: options.attributes.msFlags,
                               data: data.isEmpty ? nil : data.joined(separator: ","))
        } catch let e as Errno {
            throw BackendFailure(detail: "mount(2): \(e)", fallback: [.notBlockDevice, .operationNotSupportedByDevice, .notSupported].contains(e))
        }
        return
    } catch let e as Errno {
        throw BackendFailure(detail: "fsopen(erofs): \(e)", fallback: e == .operationNotSupportedByDevice)
    }
    func step(_ what: String, _ body: () throws -> Void) throws {
        do { try body() } catch let e as Errno {
            let log = MountAPI.log(fc).map { $0.hasPrefix("e ") || $0.hasPrefix("w ") ? String($0.dropFirst(2)) : $0 }
            let detail = "\(what): \(e)" + (log.isEmpty ? "" : " (kernel: \(log.joined(separator: "; ")))")
            throw BackendFailure(detail: detail, fallback: [.notBlockDevice, .operationNotSupportedByDevice, .notSupported].contains(e))
        }
    }
    try step("fsconfig(source)") { try MountAPI.setString(fc, "source", source) }
    // A read-only superblock: a block device source is then opened read-only too.
    try step("fsconfig(ro)") { try MountAPI.setFlag(fc, "ro") }
    for opt in options.erofs {
        if let eq = opt.firstIndex(of: "=") {
            try step("fsconfig(\(opt))") { try MountAPI.setString(fc, String(opt[..<eq]), String(opt[opt.index(after: eq)...])) }
        } else {
            try step("fsconfig(\(opt))") { try MountAPI.setFlag(fc, opt) }
        }
    }
    if passOffset, options.fsOffset > 0 {
        try step("fsconfig(fsoffset) (Linux 6.16+)") { try MountAPI.setString(fc, "fsoffset", String(options.fsOffset)) }
    }
    try step("FSCONFIG_CMD_CREATE") { try MountAPI.create(fc) }
    try step("fsmount/move_mount") { try MountAPI.attach(fc, attributes: options.attributes, at: target.fd) }
}
