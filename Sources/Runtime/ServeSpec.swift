#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Remote
import Syscall
import SystemPackage

/// The one description of a served mount, for every backend: what `mount` hands a server process
/// (as JSON over a pipe, never argv) and what the daemon keeps beside a mount it hosts. What a
/// process is told besides it — its role, the numbers of the descriptors it inherits — is the
/// process's, not the mount's.
public struct ServeSpec: Codable, Sendable {
    public enum Filesystem: String, Codable, Sendable {
        /// The image's files, read by the user-space EROFS reader (fuse-erofs).
        case erofs
        /// The image as one file or device for kernel EROFS to mount (fanotify, fuse-blob, nbd).
        case blob
    }

    /// How the kernel reaches the server.
    public enum Frontend: String, Codable, Sendable {
        /// Pre-content events of a mark on the cache file, which kernel EROFS mounts.
        case fanotify
        /// A FUSE connection (/dev/fuse).
        case fuse
        /// An NBD device's socket.
        case nbd
    }

    /// What INIT negotiated on a FUSE connection, for a server that takes it over.
    public struct Negotiated: Codable, Sendable, Equatable {
        public var flags: UInt64
        public var minor: UInt32
        /// The passthrough backing id of the blob file, registered on the connection (kept by the
        /// kernel for the connection's life): every open of the file must name it.
        public var backing: Int32?

        public init(flags: UInt64, minor: UInt32, backing: Int32? = nil) {
            (self.flags, self.minor, self.backing) = (flags, minor, backing)
        }
    }

    public var frontend: Frontend
    public var filesystem: Filesystem
    /// A local image's canonical path, or an http(s) URL / oci:// reference (without credentials).
    public var source: String
    public var mountpoint: String
    /// A remote source as the mount resolved it: the server fetches into that cache entry and asks
    /// the registry nothing more (no manifest, no size probe).
    public var blob: BlobSpec?
    /// A remote source the server resolves itself (`nbd serve`, a blob without Range support).
    public var remote: RemoteOptions?
    /// Where the server writes its figures (`status`), next to its log.
    public var statsPath: String
    public var threads: Int = 4
    /// For an nbd mount: how its kernel device is set up.
    public var device: NBDDeviceSpec?
    /// FUSE: what INIT negotiated, once a server answered it.
    public var negotiated: Negotiated?
    /// The daemon's id of a mount it hosts (its stored descriptors are named after it).
    public var hostID: String?
    /// The registry credentials of `blob` (`RegistryAuth.secret`): on a pipe to a server only;
    /// never in a spec the daemon writes down (`stored`).
    public var credentials: [UInt8]?

    public init(frontend: Frontend, filesystem: Filesystem, source: String, mountpoint: String, statsPath: String,
                blob: BlobSpec? = nil, remote: RemoteOptions? = nil) {
        (self.frontend, self.filesystem, self.source, self.mountpoint) = (frontend, filesystem, source, mountpoint)
        (self.statsPath, self.blob, self.remote) = (statsPath, blob, remote)
    }

    var specPath: String { StateStore.sibling(of: statsPath, ".spec") }
    var journalPath: String { StateStore.sibling(of: statsPath, ".journal") }

    /// The credentials as the fetcher uses them.
    func registryAuth() throws -> RegistryAuth? { try credentials.map { try RegistryAuth(secret: $0) } }

    /// Without any secret: what the daemon writes down.
    var stored: ServeSpec {
        var s = self
        s.credentials = nil
        s.remote?.oci.username = nil
        s.remote?.oci.password = nil
        return s
    }

    /// Once serving is over (no writer of the cache file left): the complete entry verified against
    /// the digest goes to the kernel's fs-verity if its blocks were checked against a tree; the
    /// figures and the log go with the mount.
    func servingEnded() {
        let verified = blob.flatMap { b in b.digest.map { (b.cacheDir, $0) } }
            ?? remote.flatMap { r in r.digest.map { (r.cacheDir, $0) } }
        if let (dir, digest) = verified {
            let entry = BlobCache(directory: dir).paths(key: digest.lowercased()).data
            if let note = BlobCache.handToKernel(entry: entry) { FuseWorker.log(note) }
        }
        for f in [statsPath, StateStore.sibling(of: statsPath, ".log")] { try? Sys.unlink(f) }
    }

    /// A file holding every byte the fuse-blob file shows, for as long as the mount lasts: the local
    /// image, or a complete cache entry whose digest (where it has one) matched. It can back the FUSE
    /// file by passthrough: reads then reach it without the server. A complete entry is never written
    /// again (a changed blob gets a new file: `reconcile` unlinks the old one), so its bytes stay the
    /// checked ones without the entry's lock. nil when there is none.
    func openWholeBlobFile() -> FileDescriptor? {
        guard frontend == .fuse, filesystem == .blob else { return nil }
        guard let b = blob else { return remote == nil ? try? Sys.openNoSymlinks(source, O_RDONLY) : nil }
        guard let fd = try? Sys.openNoSymlinks(b.entry, O_RDONLY) else { return nil }
        let info = BlobCache.readInfo(b.entry + ".json")
        // Checked after the open, against the opened inode: an entry replaced meanwhile is not taken.
        guard PopulationRecord.presentFraction(path: b.entry + ".pop") == 1,
              b.digest == nil || (info?.verified == true && info?.digest?.lowercased() == b.digest?.lowercased()),
              let st = try? Sys.fstat(fd.rawValue), UInt64(st.st_size) == b.size,
              let now = try? Sys.lstat(b.entry), now.st_ino == st.st_ino, now.st_dev == st.st_dev else {
            Sys.close(fd.rawValue)
            return nil
        }
        return fd
    }

    /// A spec the daemon wrote beside a hosted mount's figures, if the file holds one (also one an
    /// earlier version wrote for a fanotify mount).
    static func readHosted(_ path: String) -> ServeSpec? {
        guard let bytes = try? Sys.readFile(path) else { return nil }
        if let spec = try? JSONDecoder().decode(ServeSpec.self, from: Data(bytes)) { return spec }
        return (try? JSONDecoder().decode(LegacyLazySpec.self, from: Data(bytes)))?.spec
    }
}

/// A remote blob as the mount resolved it, with its cache entry (already reconciled with what the
/// server said of the blob).
public struct BlobSpec: Codable, Sendable {
    public var url: String
    public var size: UInt64
    public var etag: String?
    public var lastModified: String?
    public var cacheDir: String
    /// The cache entry's data file; its population record, info and lock sit beside it.
    public var entry: String
    /// The blob's sha256 (hex), checked once the entry is complete.
    public var digest: String?
    /// Every fetched block checked against this fs-verity tree.
    public var verity: VeritySource?
    public var prefetch: Prefetch = .none
    public var recordProfile: String?
}

extension BlobSpec {
    init(_ blob: HTTPBlob, entry: String, remote: RemoteOptions) {
        (url, size, etag, lastModified) = (blob.url, blob.size, blob.etag, blob.lastModified)
        (cacheDir, self.entry) = (remote.cacheDir, entry)
        (digest, verity) = (remote.digest?.lowercased(), remote.verity)
        (prefetch, recordProfile) = (remote.prefetch, remote.recordProfile)
    }

    var recordPath: String { entry + ".pop" }

    /// The blob, with what the mount learned of it (no request to the server).
    func open(auth: RegistryAuth?) throws -> HTTPBlob {
        let blob = try HTTPBlob(url: url, auth: auth)
        blob.adopt(size: size, etag: etag, lastModified: lastModified)
        return blob
    }

    /// The entry's cache over `blob`, through a verifier when `verity` names one.
    func lazyBlob(_ blob: HTTPBlob, writerFD: Int32? = nil) throws -> LazyBlob {
        try LazyBlob(blob: blob, dataPath: entry, recordPath: recordPath, writerFD: writerFD,
                     verifier: verity?.verifier(for: blob, cacheFile: entry + ".verity"))
    }
}

/// The spec file of a fanotify mount the daemon of an earlier version hosted: read once, after an
/// upgrade in place, so that its successor serves the mount again.
private struct LegacyLazySpec: Decodable {
    var id: String
    var url: String
    var dataPath: String
    var mountpoint: String
    var statsPath: String
    var digest: String?
    var prefetch: String
    var recordProfile: String?
    var size: UInt64
    var etag: String?
    var lastModified: String?
    var verity: VeritySource?

    var spec: ServeSpec {
        // The entry sits in CACHE/blobs/sha256/.
        let dir = URL(fileURLWithPath: dataPath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path
        var blob = BlobSpec(url: url, size: size, etag: etag, lastModified: lastModified, cacheDir: dir,
                            entry: dataPath, digest: digest, verity: verity)
        (blob.prefetch, blob.recordProfile) = (Prefetch(argument: prefetch), recordProfile)
        var s = ServeSpec(frontend: .fanotify, filesystem: .blob, source: url, mountpoint: mountpoint,
                          statsPath: statsPath, blob: blob)
        s.hostID = id
        return s
    }
}
