#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Glibc
import Crypto
import Syscall
import SystemPackage

/// Which granules of a cached blob are present, kept crash-consistent beside the data: a bit is set
/// only after the data it covers is durable (fdatasync of the cache file first), and several
/// granules are committed at once (no fsync per range).
///
/// The header names the blob the bits belong to (`identity`: its source, size and validators): a
/// record of another source or of a changed blob starts empty instead of vouching for bytes that
/// came from elsewhere.
public final class PopulationRecord: @unchecked Sendable {  // `bits` is behind its lock; the rest is immutable
    static let magic = Array("ECXPOP2\0".utf8)
    static let headerSize = 56

    public let size: UInt64
    public let granule: UInt64
    public let path: String
    public var granules: Int { Int((size + granule - 1) / granule) }
    private let fd: FileDescriptor
    private let bits: Locked<[UInt8]>

    /// Opens or creates the record at `path` for a blob of `size` bytes whose identity digest
    /// (32 bytes, `identity(...)`) is `identity`.
    public init(path: String, size: UInt64, granule: UInt64, identity: [UInt8]) throws {
        precondition(identity.count == 32, "a sha256 identity")
        self.size = size
        self.granule = granule
        self.path = path
        fd = try Sys.openNoSymlinks(path, O_RDWR | O_CREAT, mode: 0o600)
        let count = (Int((size + granule - 1) / granule) + 7) / 8
        let existing = try Sys.preadFully(fd.rawValue, count: Self.headerSize + count, at: 0)
        var header = Self.magic + [UInt8](repeating: 0, count: 16) + identity
        header.putLE64(size, at: 8)
        header.putLE64(granule, at: 16)
        if existing.count == Self.headerSize + count, Array(existing[0..<Self.headerSize]) == header {
            bits = Locked(Array(existing[Self.headerSize...]))
        } else {
            // New, or from another blob, source, version or granule: start empty.
            bits = Locked([UInt8](repeating: 0, count: count))
            let fresh = header + [UInt8](repeating: 0, count: count)
            try Sys.ftruncate(fd.rawValue, 0)
            // No fsync: a record lost or torn by a crash fails the header check above and starts empty
            // again; the first markPresent's fsync makes this write durable with it.
            try fresh.withUnsafeBytes { try Sys.pwriteAll(fd.rawValue, $0, at: 0) }
        }
    }

    deinit { Sys.close(fd.rawValue) }

    /// The fraction of granules present, read without opening the record for writing (for listings
    /// while a worker owns it); nil when the file is not a record.
    public static func presentFraction(path: String) -> Double? {
        guard let fd = try? Sys.open(path, O_RDONLY | O_NOFOLLOW) else { return nil }
        defer { Sys.close(fd.rawValue) }
        guard let head = try? Sys.preadFully(fd.rawValue, count: headerSize, at: 0), head.count == headerSize,
              Array(head[0..<8]) == magic else { return nil }
        let size = (8..<16).reduce(UInt64(0)) { $0 | UInt64(head[$1]) << (8 * UInt64($1 - 8)) }
        let granule = (16..<24).reduce(UInt64(0)) { $0 | UInt64(head[$1]) << (8 * UInt64($1 - 16)) }
        guard granule > 0 else { return nil }
        let granules = Int((size + granule - 1) / granule)
        guard let bits = try? Sys.preadFully(fd.rawValue, count: (granules + 7) / 8, at: Int64(headerSize)) else { return nil }
        return Double(bits.reduce(0) { $0 + $1.nonzeroBitCount }) / Double(max(granules, 1))
    }

    public func isPresent(granule g: Int) -> Bool {
        bits.withLock { $0[g / 8] & (1 << UInt8(g % 8)) != 0 }
    }

    /// True when every granule overlapping [offset, offset+length) is present.
    public func isPresent(offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return true }
        let first = Int(offset / granule), last = Int(min(offset + length - 1, size - 1) / granule)
        return bits.withLock { b in (first...last).allSatisfy { b[$0 / 8] & (1 << UInt8($0 % 8)) != 0 } }
    }

    /// The granules in [first, last] that are missing.
    public func missing(_ range: ClosedRange<Int>) -> [Int] {
        bits.withLock { b in range.filter { b[$0 / 8] & (1 << UInt8($0 % 8)) == 0 } }
    }

    public var presentCount: Int { bits.withLock { $0.reduce(0) { $0 + $1.nonzeroBitCount } } }
    public var isComplete: Bool { presentCount == granules }

    /// Marks granules present and persists the record. Call only after the covered data is durable.
    /// What a record's header names: the blob's source (URL without credentials), size and
    /// validators, hashed.
    public static func identity(source: String, size: UInt64, etag: String?, lastModified: String?) -> [UInt8] {
        let text = [source, String(size), etag ?? "", lastModified ?? ""].joined(separator: "\n")
        return Array(SHA256.hash(data: Array(text.utf8)))
    }

    public func markPresent(_ gs: [Int]) throws {
        let snapshot: [UInt8] = bits.withLock { b in
            for g in gs { b[g / 8] |= 1 << UInt8(g % 8) }
            return b
        }
        try snapshot.withUnsafeBytes { try Sys.pwriteAll(fd.rawValue, $0, at: Int64(Self.headerSize)) }
        try Sys.fsync(fd.rawValue)
    }
}

/// The on-disk cache: `<dir>/blobs/sha256/<key>` (sparse data), `<key>.pop` (population record),
/// `<key>.json` (what the blob is: URL, size, validators, digest). A blob being filled is keyed by
/// its source (`partialKey`): bytes that one server sent are never served for another. Once complete
/// and verified against its digest it is linked under the digest itself, which any source of that
/// digest then uses.
public struct BlobCache: Sendable {
    public static let defaultDirectory = "/var/cache/erofs-compat"
    public let directory: String
    public var blobsDir: String { directory + "/blobs/sha256" }

    public init(directory: String = BlobCache.defaultDirectory) {
        self.directory = directory
    }

    /// The key of a blob being filled from `source` (its URL without credentials; an OCI blob URL
    /// names registry, repository and digest) — checked block by block against `verity` or not: the
    /// two never share an entry, nor the worker serving one.
    public static func partialKey(source: String, verity: String? = nil) -> String {
        let name = "partial\n" + source + (verity.map { "\nverity " + $0 } ?? "")
        return SHA256.hash(data: Array(name.utf8)).map { String(hexByte: $0) }.joined()
    }

    /// Where a blob lives under `key`.
    public func paths(key: String) -> (data: String, record: String, info: String, lock: String) {
        let base = blobsDir + "/" + key
        return (base, base + ".pop", base + ".json", base + ".lock")
    }

    /// Takes the entry's writer lock (flock on `<hex>.lock`), held for as long as the returned
    /// descriptor (or a child's inherited copy) stays open: one process tree fills a cache entry at a
    /// time. Waits up to `waitSeconds` (a previous worker may be exiting), then fails naming the entry.
    public static func lockForWriting(entry dataPath: String, waitSeconds: Double = 5) throws -> FileDescriptor {
        let path = dataPath + ".lock"
        let key = dataPath.split(separator: "/").last.map(String.init) ?? dataPath
        if let fd = try lockWaiting(path, seconds: waitSeconds) { return fd }
        throw RemoteError.cache("cache entry \(key.prefix(12)) is being filled by another erofs-compat process (\(path) is locked); mount with the same state directory to share it, or use another --cache-dir")
    }

    /// True while some process holds the entry's writer lock.
    public static func isLocked(entry dataPath: String) -> Bool {
        guard let fd = try? Sys.open(dataPath + ".lock", O_RDONLY | O_NOFOLLOW) else { return false }
        defer { Sys.close(fd.rawValue) }
        do {
            try Sys.flock(fd.rawValue, exclusive: false, nonBlocking: true)
            return false
        } catch {
            return true
        }
    }

    /// Creates the directories; as root, refuses a cache whose directories another user owns or can
    /// write (they could plant links or swap entries under root's writes).
    public func ensureDirectories() throws {
        var path = ""
        for comp in blobsDir.split(separator: "/") {
            path += "/" + comp
            if !Sys.isDirectory(path) {
                do { try Sys.mkdir(path, mode: 0o700) } catch let e as Errno where e == .fileExists {} catch {
                    throw RemoteError.cache("cannot create \(path): \(error)")
                }
            }
        }
        try checkDirectories()
    }

    /// As root, refuses cache directories (those that exist) another user owns or can write.
    public func checkDirectories() throws {
        guard Sys.effectiveUID == 0 else { return }
        for d in [directory, directory + "/blobs", blobsDir] where (try? Sys.lstat(d)) != nil {
            if let why = Sys.unsafeDirectoryReason(d) {
                throw RemoteError.cache("refusing cache directory \(directory): \(why); use a directory only root can write")
            }
        }
    }

    /// The cache directory as given, made absolute — and canonical when it exists — so every command
    /// names an entry by one path (a missing one is created later by `ensureDirectories`).
    public static func canonicalDirectory(_ dir: String) -> String {
        if let p = try? Sys.realpath(dir) { return p }
        let abs = dir.hasPrefix("/") ? dir : ((try? Sys.realpath(".")) ?? "") + "/" + dir
        return abs
    }
}

extension Array where Element == UInt8 {
    mutating func putLE64(_ v: UInt64, at off: Int) {
        for i in 0..<8 { self[off + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
    }
}

extension BlobCache {
    /// Removes an entry's data, record, info and kept tree blocks (not its locks, which others may hold).
    public static func discard(entry dataPath: String) {
        for suffix in ["", ".pop", ".json", ".verity"] { try? Sys.unlink(dataPath + suffix) }
    }

    /// Serialises the mounts that set up one cache entry (held from the entry's choice until its
    /// mount is recorded): a second mount of the same blob waits, then shares what the first set up.
    /// Other entries, and the global state lock, are not held meanwhile.
    public static func lockForSetup(entry dataPath: String, waitSeconds: Double = 600) throws -> FileDescriptor {
        let path = dataPath + ".setup"
        if let fd = try lockWaiting(path, seconds: waitSeconds) { return fd }
        throw RemoteError.cache("another mount is still setting up \(dataPath) (\(path) is locked)")
    }

    /// An exclusive flock on `path` (created, never through a symlink), waiting up to `seconds` for
    /// its holder; nil when it is still held then.
    static func lockWaiting(_ path: String, seconds: Double) throws -> FileDescriptor? {
        let fd: FileDescriptor
        do { fd = try Sys.openNoSymlinks(path, O_RDWR | O_CREAT, mode: 0o600) } catch {
            throw RemoteError.cache("cannot open \(path): \(error)")
        }
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(seconds * 1e9)
        while true {
            do {
                try Sys.flock(fd.rawValue, exclusive: true, nonBlocking: true)
                return fd
            } catch let e as Errno where e == .wouldBlock && DispatchTime.now().uptimeNanoseconds < deadline {
                usleep(20_000)
            } catch {
                Sys.close(fd.rawValue)
                return nil
            }
        }
    }
}

extension LazyBlob {
    /// After a whole download: everything is written; make it durable and record it present.
    public func markAllPresent() throws {
        _ = fdatasync(writerFD)
        try record.markPresent(Array(0..<record.granules))
    }
}
