#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Syscall
import SystemPackage

/// Options of one probe run.
public struct ProbeOptions: Sendable {
    /// Where the lazy cache would live; pre-content marks are tried on its filesystem.
    public var cacheDir: String
    public var allowModuleLoad: Bool
    public var image: String?
    public var host: Host

    public static let defaultCacheDir = "/var/cache/erofs-compat"

    public init(cacheDir: String = ProbeOptions.defaultCacheDir, allowModuleLoad: Bool = false, image: String? = nil, host: Host = Host()) {
        self.cacheDir = cacheDir
        self.allowModuleLoad = allowModuleLoad
        self.image = image
        self.host = host
    }
}

/// Shared facts every check needs.
struct ProbeContext {
    let options: ProbeOptions
    var host: Host { options.host }
    let release: String
    let config: KernelConfig?
    let privileged: Bool
    /// /proc/filesystems, read on first use.
    var filesystems: Set<String> {
        filesystemsBox.withLock { cached in
            if let cached { return cached }
            let v = options.host.read("/proc/filesystems").map(ProcFilesystems.parse) ?? []
            cached = v
            return v
        }
    }
    private let filesystemsBox = Locked<Set<String>?>(nil)
    /// The nearest existing directory at or above the cache dir: temporary files for trials go there.
    let trialDir: String
    let trialFSType: String
    let trialFSMemoryBacked: Bool

    /// `lightweight` skips reading the kernel config (the mount path decides from sysfs and trials).
    /// `privileged` and `trialFilesystem` (a statfs f_type of the cache dir's filesystem) are passed
    /// by a caller that knows them already.
    init(options: ProbeOptions, lightweight: Bool = false, privileged: Bool? = nil, trialFilesystem: UInt64? = nil) {
        self.options = options
        let host = options.host
        release = host.isLive ? Self.liveRelease : (host.read("/proc/sys/kernel/osrelease")?.trimmed ?? "unknown")
        config = lightweight ? nil : Self.loadConfig(host: host, release: release)
        if host.isLive {
            self.privileged = privileged ?? Sys.hasCapSysAdmin()
        } else {
            let caps = host.read("/proc/self/status").flatMap(ProcStatus.effectiveCapabilities)
            self.privileged = caps.map { $0 & (1 << UInt64(ProcStatus.capSysAdmin)) != 0 } ?? false
        }
        if host.isLive, let known = trialFilesystem {
            trialDir = options.cacheDir
            (trialFSType, trialFSMemoryBacked) = (FilesystemMagic.name(known), FilesystemMagic.isMemoryBacked(known))
            return
        }
        var dir = options.cacheDir
        while !host.isDirectory(dir), dir != "/", !dir.isEmpty {
            dir = dir.parentPath
        }
        trialDir = dir.isEmpty ? "/" : dir
        if host.isLive, let st = try? Sys.statfs(trialDir) {
            let t = UInt64(bitPattern: Int64(st.f_type))
            trialFSType = FilesystemMagic.name(t)
            trialFSMemoryBacked = FilesystemMagic.isMemoryBacked(t)
        } else {
            trialFSType = "unknown"
            trialFSMemoryBacked = false
        }
    }

    static let liveRelease = Sys.uname().release

    /// /proc/config.gz first, then /boot/config-RELEASE.
    static func loadConfig(host: Host, release: String) -> KernelConfig? {
        if let gz = host.readBytes("/proc/config.gz"), let raw = Libraries.gunzip(gz) {
            return KernelConfig(parsing: raw, source: "/proc/config.gz")
        }
        if let text = host.read("/boot/config-\(release)") {
            return KernelConfig(parsing: Array(text.utf8), source: "/boot/config-\(release)")
        }
        return nil
    }

    func configEvidence(_ key: String) -> Finding.Evidence? {
        guard let config else { return nil }
        return .init(config.source, "\(key)=\(config.value(key))")
    }

    /// A privilege-related failure turns into "unknown" with the reason.
    func unknownWithoutPrivilege(_ id: String, _ title: String, _ what: String) -> Finding {
        Finding(id, title, .unknown, evidence: [.init(what, privileged ? "not attempted" : "needs CAP_SYS_ADMIN; run as root to decide")])
    }

    /// An unnamed temporary file in the trial directory (O_TMPFILE: nothing is left behind).
    func temporaryFile() throws -> FileDescriptor {
        try Sys.openTemporary(in: trialDir)
    }
}

/// errno as a stable name for evidence text ("ENOENT").
func errnoName(_ e: Errno) -> String {
    let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", EINTR: "EINTR", EIO: "EIO", EBADF: "EBADF", EAGAIN: "EAGAIN",
        ENOMEM: "ENOMEM", EACCES: "EACCES", EBUSY: "EBUSY", EEXIST: "EEXIST", ENODEV: "ENODEV",
        ENOTDIR: "ENOTDIR", EINVAL: "EINVAL", ENOSPC: "ENOSPC", EROFS: "EROFS", ENOSYS: "ENOSYS",
        ENOTTY: "ENOTTY", ENOTBLK: "ENOTBLK", EOPNOTSUPP: "EOPNOTSUPP", ENXIO: "ENXIO", ETIMEDOUT: "ETIMEDOUT",
        EUCLEAN: "EUCLEAN", ENODATA: "ENODATA", EXDEV: "EXDEV", EMFILE: "EMFILE",
    ]
    return names[e.rawValue] ?? "errno \(e.rawValue)"
}
