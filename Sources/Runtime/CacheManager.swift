#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto
import Glibc
import Remote
import Syscall
import SystemPackage

/// What is known about a cached blob (written beside it when it is first mounted).
public struct CacheInfo: Codable, Sendable {
    public var url: String
    public var size: UInt64
    public var etag: String?
    public var lastModified: String?
    /// sha256 hex when the blob was mounted with --digest or from an OCI registry.
    public var digest: String?
    /// True once the complete blob matched `digest` (then it is also linked under the digest and
    /// shared by every source of it); false or absent: its bytes are checked only against the
    /// server's validators.
    public var verified: Bool?
    /// The fs-verity digest its blocks are checked against as they are fetched, if any.
    public var verity: String?
    /// True once the complete file was handed to the kernel's fs-verity and measured equal to
    /// `verity`: the kernel checks every page read from disk and refuses writes.
    public var kernelVerity: Bool?
}

extension BlobCache {
    /// The entry's info file, if readable (never through a symlink).
    static func readInfo(_ path: String) -> CacheInfo? {
        guard let fd = try? Sys.openNoSymlinks(path, O_RDONLY) else { return nil }
        defer { Sys.close(fd.rawValue) }
        return (try? Sys.readAll(fd.rawValue)).flatMap { try? JSONDecoder().decode(CacheInfo.self, from: Data($0)) }
    }

    static func writeInfo(_ info: CacheInfo, to path: String) {
        if let data = try? JSONEncoder().encode(info) { try? Sys.writeFileAtomically(path, [UInt8](data), mode: 0o600) }
    }

    /// Hands a complete entry, verified against its digest and filled with every block checked
    /// against an fs-verity tree, to the kernel's fs-verity (FS_IOC_ENABLE_VERITY: the kernel builds
    /// the same tree) and checks that it measures the digest the blocks were checked against (the
    /// entry's own record of it, never a caller's). A note when it did; nil when there is nothing to
    /// do or it cannot be done now (a writer still open: ETXTBSY) or here (no fs-verity on this
    /// filesystem or kernel). A file the kernel measures otherwise is discarded.
    static func handToKernel(entry dataPath: String) -> String? {
        guard var info = readInfo(dataPath + ".json"), let verity = info.verity, info.verified == true,
              info.kernelVerity != true,
              PopulationRecord.presentFraction(path: dataPath + ".pop") == 1,
              let fd = try? Sys.openNoSymlinks(dataPath, O_RDONLY) else { return nil }
        defer { Sys.close(fd.rawValue) }
        do { try Sys.enableVerity(fd.rawValue) } catch let e as Errno where e == .fileExists {} catch { return nil }
        guard let measured = try? Sys.measureVerity(fd.rawValue) else { return nil }
        let hex = measured.map { String(hexByte: $0) }.joined()
        guard hex == verity.lowercased() else {
            BlobCache.discard(entry: dataPath)
            return "the kernel measured the complete cache file as fs-verity sha256:\(hex), not sha256:\(verity); "
                + "the entry was discarded"
        }
        info.kernelVerity = true
        writeInfo(info, to: dataPath + ".json")
        return "the complete cache file is now checked by the kernel's fs-verity (sha256:\(hex))"
    }

    /// The complete entry verified against `digest`, when there is one of this size.
    func verifiedEntry(digest: String, size: UInt64) -> (data: String, record: String, info: String, lock: String)? {
        let p = paths(key: digest)
        guard let info = Self.readInfo(p.info), info.verified == true, info.digest == digest, info.size == size,
              let st = try? Sys.lstat(p.data), st.st_mode & S_IFMT == S_IFREG, UInt64(st.st_size) == size,
              PopulationRecord.presentFraction(path: p.record) == 1 else { return nil }
        return p
    }

    /// Compares what the server says of the blob now with what the entry was filled from. A
    /// changed blob discards the partial entry (a note says so), or is refused while a live mount
    /// still serves the old version. Then records what the entry now holds.
    func reconcile(paths p: (data: String, record: String, info: String, lock: String), with blob: HTTPBlob,
                   digest: String?, verity: String? = nil) throws -> String? {
        var note: String?
        if let old = Self.readInfo(p.info), old.url == blob.url,
           old.size != blob.size || old.etag != blob.etag || old.lastModified != blob.lastModified {
            var what: [String] = []
            if old.size != blob.size { what.append("size \(old.size) → \(blob.size)") }
            if old.etag != blob.etag { what.append("ETag \(old.etag ?? "none") → \(blob.etag ?? "none")") }
            if old.lastModified != blob.lastModified {
                what.append("Last-Modified \(old.lastModified ?? "none") → \(blob.lastModified ?? "none")")
            }
            let detail = what.joined(separator: ", ")
            // A worker still exiting (its mount just went) releases the entry within moments.
            guard let writer = try? Self.lockForWriting(entry: p.data) else {
                throw RuntimeError.remote(RemoteError.blobChanged(url: blob.url, detail: detail + "; a mount still serves the old version")
                    .description)
            }
            try? Sys.unlink(p.data)
            try? Sys.unlink(p.record)
            try? Sys.unlink(p.data + ".verity")
            Sys.close(writer.rawValue)
            note = "the blob at \(blob.url) changed since it was cached (\(detail)); its partial cache entry was discarded"
        }
        var info = CacheInfo(url: blob.url, size: blob.size, etag: blob.etag, lastModified: blob.lastModified, digest: digest,
                             verified: Self.readInfo(p.info).flatMap { note == nil ? $0.verified : nil })
        info.verity = verity
        Self.writeInfo(info, to: p.info)
        return note
    }

    /// Once the entry at `dataPath` is complete and matched `digest`: links it (data and record)
    /// under the digest, where every source of that digest may use it, and marks both verified.
    static func promote(entry dataPath: String, digest: String) {
        let dir = dataPath.lastIndex(of: "/").map { String(dataPath[..<$0]) } ?? "."
        let shared = dir + "/" + digest
        var info = readInfo(dataPath + ".json")
        info?.verified = true
        info?.digest = digest
        if let info { writeInfo(info, to: dataPath + ".json") }
        guard shared != dataPath, readInfo(shared + ".json")?.verified != true, !isLocked(entry: shared) else { return }
        // Whatever sits under the digest is not verified (an older version's partial entry): replace it.
        for suffix in ["", ".pop", ".json"] { try? Sys.unlink(shared + suffix) }
        do {
            try Sys.link(dataPath, shared)
            try Sys.link(dataPath + ".pop", shared + ".pop")
        } catch {
            for suffix in ["", ".pop"] { try? Sys.unlink(shared + suffix) }
            return
        }
        if let info { writeInfo(info, to: shared + ".json") }
    }

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
    /// Another key naming the same file (a verified blob is linked under its digest as well as its
    /// source's key); its allocation is counted once.
    public var sameFileAs: String?
}

/// `cache ls|verify|prune`.
public struct CacheManager: Sendable {
    public let cache: BlobCache
    public let runtime: Runtime

    /// `directory` is canonicalised: an entry in use is recognised however the cache dir was spelled.
    public init(directory: String, runtime: Runtime = Runtime()) {
        cache = BlobCache(directory: BlobCache.canonicalDirectory(directory))
        self.runtime = runtime
    }

    public func entries() -> [CacheEntry] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: cache.blobsDir)) ?? [])
            .filter { $0.count == 64 && $0.allSatisfy(\.isHexDigit) }.sorted()
        let mounts = MountInfo.current()
        let records = runtime.state.all()
        // In use is decided by the file itself (device and inode), not by how its path was spelled.
        func identity(_ path: String) -> String? { (try? Sys.stat(path)).map { "\($0.st_dev):\($0.st_ino)" } }
        var users: [String: Set<String>] = [:]
        for r in records {
            guard let c = r.cachePath, runtime.isOurMount(r, mounts) || r.workerPID.map(Sys.processExists) == true,
                  let id = identity(c) else { continue }
            users[id, default: []].insert(r.mountpoint)
        }
        let recorded = Set(records.map(\.mountpoint))
        for m in Backends.kernelEROFSMountsOfPaths(in: mounts) where !recorded.contains(m.mountPoint) {
            if let id = identity(m.source) { users[id, default: []].insert(m.mountPoint) }
        }
        var firstKeyOfFile: [String: String] = [:]
        return names.map { key in
            let p = cache.paths(key: key)
            let st = try? Sys.lstat(p.data)
            let info = BlobCache.readInfo(p.info)
            let size = UInt64(st?.st_size ?? 0)
            let present = (PopulationRecord.presentFraction(path: p.record) ?? 0) * 100
            var used = st.flatMap { users["\($0.st_dev):\($0.st_ino)"] }.map { Array($0) } ?? []
            if used.isEmpty, BlobCache.isLocked(entry: p.data) { used = ["(being filled by another erofs-compat process)"] }
            let atime = st.map { Double($0.st_atim.tv_sec) } ?? 0
            let mtime = st.map { Double($0.st_mtim.tv_sec) } ?? 0
            let fileID = st.map { "\($0.st_dev):\($0.st_ino)" }
            let same = fileID.flatMap { firstKeyOfFile[$0] }
            if let fileID, same == nil { firstKeyOfFile[fileID] = key }
            return CacheEntry(key: key, path: p.data, info: info, size: size, allocated: same == nil ? UInt64(st?.st_blocks ?? 0) * 512 : 0,
                              presentPercent: present, usedBy: used.sorted(), lastUse: max(atime, mtime), sameFileAs: same)
        }
    }

    /// `ok`: complete and matches its digest; `mismatch`: complete and does not; `unverified`: its
    /// bytes were checked only against the server's validators (incomplete, or no digest known).
    public enum Verdict: String, Codable, Sendable {
        case ok, mismatch
        case incomplete = "unverified (incomplete)"
        case noDigest = "unverified (no digest)"
    }

    /// Hashes complete entries whose digest is known; the others are reported unverified.
    public func verify(_ only: String? = nil) throws -> [(CacheEntry, Verdict)] {
        try entries().filter { only == nil || $0.key.hasPrefix(only!) }.map { e in
            guard let digest = e.info?.digest else { return (e, .noDigest) }
            guard e.presentPercent >= 100 else { return (e, .incomplete) }
            let fd = try Sys.openNoSymlinks(e.path, O_RDONLY)
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
                for f in [p.data, p.record, p.info, p.lock, p.data + ".setup"] { try? Sys.unlink(f) }
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
