#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import EROFS
import FUSE
import Glibc
import NBD
import Remote
import Syscall
import SystemPackage

/// What `nbd serve` and the FUSE servers export: a local image read-only, or a remote blob through
/// the same per-source, lock-held, digest-checked cache and `LazyReader` a lazy mount uses (fetched
/// as clients read it).
public final class ServedSource: @unchecked Sendable {  // immutable after init; the reader locks itself
    public let size: UInt64
    public let description: String
    /// The cache granule for remote blobs (64 KiB, or 4 KiB when checked against a tree), the block
    /// size for local images: the export's preferred block size.
    public let granule: UInt32
    let source: ImageSource
    let reader: LazyReader?
    let entryLock: OwnedDescriptor?

    init(local: FileSource, blockSize: Int, description: String) {
        (size, source, reader, entryLock) = (local.size, local, nil, nil)
        (self.description, granule) = (description, UInt32(blockSize))
    }

    init(lazy: LazyBlob, digest: String?, entryLock: FileDescriptor, description: String, prefetch: Prefetch) {
        (size, source) = (lazy.size, lazy)
        self.entryLock = OwnedDescriptor(entryLock)
        (self.description, granule) = (description, UInt32(lazy.granule))
        let reader = LazyReader(lazy: lazy, digest: digest) { line in
            _ = try? FileDescriptor.standardError.writeAll(Array("erofs-compat[\(Sys.processID)]: \(line)\n".utf8))
        }
        reader.prefetch = prefetch
        reader.start()
        self.reader = reader
    }

    /// Exactly the bytes of [offset, offset+length), or a throw (EIO for the client).
    public func read(offset: UInt64, length: Int) throws -> [UInt8] {
        try ensure(offset: offset, length: length)
        let data = try source.read(at: offset, count: length)
        guard data.count == length else { throw RemoteError.cache("short read at \(offset)") }
        return data
    }

    /// Where [offset, offset+length) lies in the image or cache file once present (fetched as for
    /// `read`), for sendfile; nil when it must be read instead.
    public func region(offset: UInt64, length: Int) throws -> FileRegion? {
        try ensure(offset: offset, length: length)
        return try source.fileRegion(at: offset, count: length)
    }

    /// Through the lazy reader, for a remote blob: nothing for a local image.
    func ensure(offset: UInt64, length: Int) throws {
        guard let reader else { return }
        if let why = reader.failed { throw RemoteError.cache(why) }
        reader.noteForProfile(offset, UInt64(length))
        guard !reader.isAvailable(offset: offset, length: UInt64(length)) else { return }
        try reader.ensure(offset: offset, count: UInt64(length))
    }

    /// The reader's figures (nil for a local image).
    public var figures: LazyFigures? { reader?.figures }

    /// Writes the served mount's stats file (`ServedStats`: the reader's figures, and `fuse()`'s
    /// when the server is a FUSE one) within half a second of a change, until `stop`.
    func writeStatsWhileServing(to path: String, until stop: Locked<Bool>, fuse: @escaping () -> FUSEStats? = { nil }) {
        var last: Data?
        while !stop.get() {
            last = writeStatsIfChanged(to: path, since: last, fuse: fuse())
            usleep(500_000)
        }
    }

    /// Writes the stats file when its contents differ from `last`; returns what it holds now.
    func writeStatsIfChanged(to path: String, since last: Data?, fuse: FUSEStats?) -> Data? {
        guard let data = try? ServedStats.encode(lazy: figures, fuse: fuse), data != last else { return last }
        try? Sys.writeFileAtomically(path, [UInt8](data))
        return data
    }

    /// NBD_CMD_CACHE: fetch the range into the cache now.
    public func prefetch(offset: UInt64, length: Int) throws {
        try reader?.lazy.ensure(offset: offset, length: UInt64(length))
    }

    /// Stops the reader's background work (after a last commit) and releases the cache entry.
    public func close() {
        reader?.stop()
        entryLock?.close()
    }
}

extension Runtime {
    /// What a served mount's spec names: the blob the mount resolved, or the source to resolve.
    /// `fetcher`: the mount's own fetcher of that blob (in the daemon), whose probe bytes the cache
    /// entry takes.
    func openServedSource(_ spec: ServeSpec, fetcher: HTTPBlob? = nil) throws -> ServedSource {
        guard let b = spec.blob else {
            return try openServedSource(spec.source, remote: spec.remote ?? RemoteOptions())
        }
        do {
            let lock = try BlobCache.lockForWriting(entry: b.entry)
            do {
                let lazy = try b.lazyBlob(fetcher ?? b.open(auth: spec.registryAuth()))
                return ServedSource(lazy: lazy, digest: b.digest, entryLock: lock, description: spec.source,
                                    prefetch: b.prefetch)
            } catch {
                Sys.close(lock.rawValue)
                throw error
            }
        } catch let e as RemoteError {
            throw RuntimeError.remote(e.description)
        }
    }

    /// Opens SOURCE (a local image, an http(s) URL or an oci:// reference, with the same options
    /// and credential handling as `mount`) for an NBD export.
    public func openServedSource(_ source: String, remote: RemoteOptions) throws -> ServedSource {
        guard source.hasPrefix("http://") || source.hasPrefix("https://") || OCIReference.isOCI(source) else {
            return try openLocalExport(source)
        }
        var req = try validatedRemote(MountRequest(source: source, mountpoint: "", remote: remote))
        req.source = URLUserinfo.strip(req.source)
        let cache = BlobCache(directory: req.remote.cacheDir)
        do { try cache.checkDirectories() } catch { throw RuntimeError.state("\(error)") }
        var notes: [String] = []
        let blob = try openRemoteBlob(&req, notes: &notes)
        defer { blob.setDeadline(seconds: nil) }
        do { try cache.ensureDirectories() } catch { throw RuntimeError.state("\(error)") }
        let digest = req.remote.digest?.lowercased()
        let what = ([req.source] + notes).joined(separator: "; ")
        if let digest, let verified = cache.verifiedEntry(digest: digest, size: blob.size) {
            return try openLocalExport(verified.data, description: what + " (cached, verified)")
        }
        let paths = cache.paths(key: BlobCache.partialKey(source: blob.url, verity: req.remote.verity?.digest))
        do {
            let lock = try BlobCache.lockForWriting(entry: paths.data)
            do {
                _ = try cache.reconcile(paths: paths, with: blob, digest: digest, verity: req.remote.verity?.digest)
                let lazy = try LazyBlob(blob: blob, dataPath: paths.data, recordPath: paths.record,
                                        verifier: req.remote.verity?.verifier(for: blob, cacheFile: paths.data + ".verity"))
                if blob.wholeOnly {
                    try blob.readAll(into: lazy.writerFD)
                    if let verity = req.remote.verity { try Self.checkWhole(lazy, against: verity) }
                    try lazy.markAllPresent()
                }
                return ServedSource(lazy: lazy, digest: digest, entryLock: lock, description: what,
                                    prefetch: req.remote.prefetch)
            } catch {
                Sys.close(lock.rawValue)
                throw error
            }
        } catch let e as RemoteError {
            throw RuntimeError.remote(e.description)
        }
    }

    /// A local EROFS image, checked like `mount` checks it (a regular file with an EROFS superblock).
    func openLocalExport(_ path: String, description: String? = nil) throws -> ServedSource {
        let (canonical, _) = try canonicalSource(path)
        let file: FileSource
        do { file = try FileSource(path: canonical) } catch { throw RuntimeError.sourceMissing(path) }
        let blockSize: Int
        do { blockSize = try EROFSImage.superblock(of: file).blockSize } catch {
            throw RuntimeError.notEROFS(canonical, detail: "\(error)")
        }
        return ServedSource(local: file, blockSize: blockSize, description: description ?? canonical)
    }
}
