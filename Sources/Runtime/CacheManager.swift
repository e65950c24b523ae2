#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto
import Glibc
import Remote
import Syscall

/// What is known about a cached blob (written beside it when it is first mounted).
public struct CacheInfo: Codable, Sendable {
    public var url: String
    public var size: UInt64
    public var etag: String?
    public var lastModified: String?
    /// sha256 hex when the blob was mounted with --digest (then it is also the key).
    public var digest: String?
}

/// One entry of the blob cache.
public struct CacheEntry: Codable, Sendable {
    public var key: String
    public var path: String
    public var info: CacheInfo?
    public var size: UInt64
    /// Bytes actually allocated (the file is sparse).
    public var allocated: UInt64
    public var presentPercent: Double
    /// Mountpoints using it now; a blob in use is never pruned.
    public var usedBy: [String]
    public var lastUse: Double
}

/// `cache ls|verify|prune`.
public struct CacheManager: Sendable {
    public let cache: BlobCache
    public let runtime: Runtime

    public init(directory: String, runtime: Runtime = Runtime()) {
        cache = BlobCache(directory: directory)
        self.runtime = runtime
    }

    public func entries() -> [CacheEntry] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: cache.blobsDir)) ?? [])
            .filter { $0.count == 64 && $0.allSatisfy(\.isHexDigit) }.sorted()
        let mounts = MountInfo.current()
        let records = runtime.state.all()
        return names.map { key in
            let p = cache.paths(key: key)
            let st = try? Sys.stat(p.data)
            let info = FileManager.default.contents(atPath: p.info).flatMap { try? JSONDecoder().decode(CacheInfo.self, from: $0) }
            let size = UInt64(st?.st_size ?? 0)
            let present = (PopulationRecord.presentFraction(path: p.record) ?? 0) * 100
            var users = records.filter { $0.cachePath == p.data && (runtime.isOurMount($0, mounts) || $0.workerPID.map(Sys.processExists) == true) }
                .map(\.mountpoint)
                + mounts.filter { $0.source == p.data && !records.map(\.mountpoint).contains($0.mountPoint) }.map(\.mountPoint)
            if users.isEmpty, BlobCache.isLocked(entry: p.data) { users = ["(being filled by another erofs-compat process)"] }
            let atime = st.map { Double($0.st_atim.tv_sec) } ?? 0
            let mtime = st.map { Double($0.st_mtim.tv_sec) } ?? 0
            return CacheEntry(key: key, path: p.data, info: info, size: size, allocated: UInt64(st?.st_blocks ?? 0) * 512,
                              presentPercent: present, usedBy: Array(Set(users)).sorted(), lastUse: max(atime, mtime))
        }
    }

    public enum Verdict: String, Codable, Sendable { case ok, mismatch, incomplete, noDigest = "no-digest" }

    /// Hashes complete entries whose digest is known.
    public func verify(_ only: String? = nil) throws -> [(CacheEntry, Verdict)] {
        try entries().filter { only == nil || $0.key.hasPrefix(only!) }.map { e in
            guard let digest = e.info?.digest else { return (e, .noDigest) }
            guard e.presentPercent >= 100 else { return (e, .incomplete) }
            let fd = try Sys.open(e.path, O_RDONLY)
            defer { Sys.close(fd.rawValue) }
            var h = SHA256()
            var pos: UInt64 = 0
            while pos < e.size {
                let chunk = try Sys.preadFully(fd.rawValue, count: Int(min(8 << 20, e.size - pos)), at: Int64(pos))
                if chunk.isEmpty { break }
                h.update(data: chunk)
                pos += UInt64(chunk.count)
            }
            let actual = h.finalize().map { String(hexByte: $0) }.joined()
            return (e, actual == digest ? .ok : .mismatch)
        }
    }

    /// Removes entries not in use: all of them, or (with `maxSize`) the least recently used until the
    /// allocated total fits. Holds the state lock so no mount starts using an entry meanwhile.
    public func prune(maxSize: UInt64?) throws -> [CacheEntry] {
        guard Sys.hasCapSysAdmin() || geteuid() == 0 else { throw RuntimeError.notPrivileged("pruning the cache") }
        return try runtime.state.withLock {
            let all = entries()
            var total = all.reduce(0) { $0 + $1.allocated }
            var removed: [CacheEntry] = []
            for e in all.filter({ $0.usedBy.isEmpty }).sorted(by: { $0.lastUse < $1.lastUse }) {
                if let maxSize, total <= maxSize { break }
                let p = cache.paths(key: e.key)
                for f in [p.data, p.record, p.info, p.lock] { try? Sys.unlink(f) }
                total -= e.allocated
                removed.append(e)
            }
            return removed
        }
    }

    /// Parses "10G", "512M", "2048K", "123" (bytes).
    public static func parseSize(_ s: String) -> UInt64? {
        let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        guard let last = s.uppercased().last else { return nil }
        if let u = units[last] { return UInt64(s.dropLast()).map { $0 * u } }
        return UInt64(s)
    }
}
