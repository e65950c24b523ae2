#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import EROFS
import Glibc
import NBD
import Remote
import Syscall
import SystemPackage

/// What `nbd serve` exports: a local image read-only, or a remote blob through the same
/// per-source, lock-held, digest-checked cache a lazy mount uses (fetched as clients read it).
public final class ServedSource: @unchecked Sendable {  // immutable after init except `failed` and the readahead state, behind locks
    public let size: UInt64
    public let description: String
    /// The cache granule for remote blobs (64 KiB, or 4 KiB when checked against a tree), the block
    /// size for local images: the export's preferred block size.
    public let granule: UInt32
    let source: ImageSource
    let lazy: LazyBlob?
    let digest: String?
    let entryLock: OwnedDescriptor?
    let readahead: Readahead?
    /// Set when the complete cache failed its digest: every further read is EIO.
    let failed = Locked(false)
    let stopped = Locked(false)
    /// Reads in progress: background prefetching waits while there are any.
    let busy = Locked(0)

    init(local: FileSource, blockSize: Int, description: String) {
        (size, source, lazy, digest, entryLock, readahead) = (local.size, local, nil, nil, nil, nil)
        (self.description, granule) = (description, UInt32(blockSize))
    }

    init(lazy: LazyBlob, digest: String?, entryLock: FileDescriptor, description: String) {
        (size, source, self.lazy, self.digest) = (lazy.size, lazy, lazy, digest)
        self.entryLock = OwnedDescriptor(entryLock)
        (self.description, granule) = (description, UInt32(lazy.granule))
        readahead = Readahead(lazy)
        Threads.detach { [self] in commitLoop() }
    }

    /// Exactly the bytes of [offset, offset+length), or a throw (EIO for the client).
    public func read(offset: UInt64, length: Int) throws -> [UInt8] {
        guard !failed.get() else { throw RemoteError.cache("the blob failed verification") }
        busy.withLock { $0 += 1 }
        defer { busy.withLock { $0 -= 1 } }
        try noteSequential(offset: offset, length: length)
        let data = try source.read(at: offset, count: length)
        guard data.count == length else { throw RemoteError.cache("short read at \(offset)") }
        return data
    }

    /// Where [offset, offset+length) lies in the image or cache file once present (the same checks
    /// and readahead as `read`), for sendfile; nil when it must be read instead.
    public func region(offset: UInt64, length: Int) throws -> FileRegion? {
        guard !failed.get() else { throw RemoteError.cache("the blob failed verification") }
        busy.withLock { $0 += 1 }
        defer { busy.withLock { $0 -= 1 } }
        try noteSequential(offset: offset, length: length)
        return try source.fileRegion(at: offset, count: length)
    }

    /// A sequential reader that outran the readahead fetches the aligned 4 MiB chunk around its
    /// read: concurrent readers of that chunk join one large request instead of each sending a small
    /// one (a registry spends milliseconds on every request).
    func noteSequential(offset: UInt64, length: Int) throws {
        guard let readahead, let lazy, readahead.noteRead(offset: offset, length: UInt64(length)),
              !lazy.isAvailable(offset: offset, length: UInt64(length)) else { return }
        let chunk: UInt64 = 4 << 20
        let start = offset / chunk * chunk
        try lazy.ensure(offset: start, length: min(chunk, lazy.size - start))
    }

    /// `--prefetch` for a served mount: in the background, the profile's ranges first, then (`all`)
    /// everything else in 1 MiB steps, pausing while readers have requests in flight.
    func startPrefetch(_ prefetch: Prefetch) {
        guard let lazy, prefetch != .none else { return }
        Threads.detach { [self] in
            var ranges: [(UInt64, UInt64)] = []
            if case .profile(let path) = prefetch { ranges = (try? PrefetchProfile.load(path)) ?? [] }
            if prefetch == .all {
                var off: UInt64 = 0
                while off < lazy.size { ranges.append((off, min(1 << 20, lazy.size - off))); off += 1 << 20 }
            }
            for (offset, length) in ranges where offset < lazy.size {
                while !stopped.get(), busy.get() > 0 { usleep(20_000) }
                if stopped.get() || failed.get() { return }
                let len = min(length, lazy.size - offset)
                if !lazy.isAvailable(offset: offset, length: len) { try? lazy.ensure(offset: offset, length: len) }
            }
        }
    }

    /// NBD_CMD_CACHE: fetch the range into the cache now.
    public func prefetch(offset: UInt64, length: Int) throws {
        guard let lazy else { return }
        try lazy.ensure(offset: offset, length: UInt64(length))
    }

    /// Makes what was fetched durable every 100 ms; once complete, checks the digest (and links the
    /// entry under it) or, on a mismatch, discards the entry and fails every further read.
    func commitLoop() {
        guard let lazy else { return }
        var finished = false
        while !stopped.get() {
            usleep(100_000)
            try? lazy.commit()
            guard !finished, lazy.record.isComplete else { continue }
            finished = true
            guard let digest else { continue }
            do {
                try lazy.verify(sha256: digest)
                BlobCache.promote(entry: lazy.dataPath, digest: digest)
            } catch {
                failed.set(true)
                BlobCache.discard(entry: lazy.dataPath)
            }
        }
    }

    /// Stops committing (after a last commit) and releases the cache entry.
    public func close() {
        stopped.set(true)
        try? lazy?.commit()
        entryLock?.close()
    }
}

/// Readahead for sequential clients (nbdcopy, a kernel reading a device in order). Up to 8 streams
/// are followed at once (nbdcopy's connections each copy a region of their own): a read continues
/// the stream whose end it is near, else it starts one in place of the least recently used. After
/// a read that continues a stream, the next window (4 MiB doubling to 16 MiB) is fetched in the
/// background in aligned 4 MiB requests, each readable as soon as it is written.
final class Readahead: @unchecked Sendable {  // state behind its lock
    struct Stream { var end: UInt64; var window: UInt64; var ahead: UInt64; var used: UInt64 }
    let lazy: LazyBlob
    private let state = Locked<(streams: [Stream], clock: UInt64, queued: [(UInt64, UInt64)])>(([], 0, []))
    private let ready = DispatchSemaphore(value: 0)

    init(_ lazy: LazyBlob, fetchers: Int = 4) {
        self.lazy = lazy
        for _ in 0..<fetchers { Threads.detach { [self] in loop() } }
    }

    /// Notes a read; true when it continues a stream (within 32 MiB behind or 16 MiB ahead of its
    /// end: many requests in flight arrive slightly out of order).
    @discardableResult
    func noteRead(offset: UInt64, length: UInt64) -> Bool {
        let (sequential, queued): (Bool, Bool) = state.withLock { s in
            s.clock += 1
            let i = s.streams.firstIndex { offset + (32 << 20) >= $0.end && offset <= $0.end + (16 << 20) }
            guard let i else {
                let fresh = Stream(end: offset + length, window: 0, ahead: offset + length, used: s.clock)
                if s.streams.count < 8 { s.streams.append(fresh) } else if let lru = s.streams.indices.min(by: { s.streams[$0].used < s.streams[$1].used }) {
                    s.streams[lru] = fresh
                }
                return (false, false)
            }
            var st = s.streams[i]
            st.used = s.clock
            st.window = min(max(st.window * 2, 4 << 20), 16 << 20)
            st.end = max(st.end, offset + length)
            let start = max(st.end, st.ahead), stop = min(st.end + st.window, lazy.size)
            var queued = false
            if start < stop {
                st.ahead = stop
                s.queued.append((start, stop - start))
                if s.queued.count > 32 { s.queued.removeFirst(s.queued.count - 32) }
                queued = true
            }
            s.streams[i] = st
            return (true, queued)
        }
        if queued { ready.signal() }
        return sequential
    }

    private func loop() {
        while true {
            ready.wait()
            guard let (offset, length) = state.withLock({ $0.queued.isEmpty ? nil : $0.queued.removeFirst() }) else { continue }
            // In aligned 4 MiB chunks, as readers that outran it fetch them.
            let chunk: UInt64 = 4 << 20
            var pos = offset / chunk * chunk
            while pos < offset + length {
                try? lazy.fetchUnclaimed(offset: pos, length: min(chunk, lazy.size - pos))
                pos += chunk
            }
        }
    }
}

extension Runtime {
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
                let served = ServedSource(lazy: lazy, digest: digest, entryLock: lock, description: what)
                served.startPrefetch(req.remote.prefetch)
                return served
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
