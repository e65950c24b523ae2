#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto
import Dispatch
import EROFS
import Glibc
import Syscall
import SystemPackage

/// A remote blob materialised lazily into a sparse cache file. Ranges are fetched in whole granules,
/// coalesced with neighbours and with fetches already in flight (no duplicate downloads), written
/// through a descriptor opened before any fanotify mark (so the writes raise no events), and marked
/// present in the population record once durable. Also an `ImageSource` for the EROFS reader.
public final class LazyBlob: ImageSource, @unchecked Sendable {  // state behind locks; `readWindow` set before sharing
    public let blob: HTTPBlob
    public let record: PopulationRecord
    public let dataPath: String
    /// Written by this process; opened before the mark, so writes through it raise no events.
    let writer: FileDescriptor
    public var size: UInt64 { blob.size }
    public var granule: UInt64 { record.granule }
    /// Largest single Range request: 16 MiB, 4 MiB when checked against a tree (a checked response
    /// is held in memory until its blocks are hashed).
    public var maxRequest: UInt64
    /// For the `ImageSource` view: a read that misses fetches the aligned window of this size around
    /// it (0: just the granules read). The metadata walk uses it so that one request covers the
    /// neighbouring inodes and directory blocks the next level of the walk reads.
    public var readWindow: UInt64 = 0
    /// Checks every fetched block against an fs-verity tree before it is written (and so before it is
    /// marked present or served); nil: the server's validators and the digest at completion only.
    public let verifier: VerityVerifier?
    /// Blocks that failed their check (each fetched once more; the read fails if it fails again).
    package let verityFailures = Locked<Int>(0)
    /// How much of the blob is present in the cache, in percent.
    public var populationPercent: Double { Double(record.presentCount) / Double(max(record.granules, 1)) * 100 }

    /// Granules in page cache (readers can be allowed) but not yet durable in the record.
    private let state: Locked<(inFlight: GranuleBits, written: GranuleBits)>
    private let cond = DispatchSemaphore(value: 0)
    private var waiters = Locked<Int>(0)

    /// `writerFD`: an inherited descriptor of the cache file opened before the fanotify mark (a
    /// restarted worker gets its supervisor's); nil opens one now.
    public init(blob: HTTPBlob, dataPath: String, recordPath: String, granule: UInt64 = 64 << 10, writerFD: Int32? = nil,
                verifier: VerityVerifier? = nil) throws {
        self.blob = blob
        self.dataPath = dataPath
        self.verifier = verifier
        // Checked blocks are the unit of what may be served: 4 KiB granules then (requests still
        // cover runs of up to `maxRequest`), so a bad block fails only the reads that need it.
        let granule = verifier == nil ? granule : 4096
        maxRequest = verifier == nil ? 16 << 20 : 4 << 20
        writer = try writerFD.map { FileDescriptor(rawValue: $0) } ?? Sys.openNoSymlinks(dataPath, O_RDWR | O_CREAT, mode: 0o600)
        do {
            let st = try Sys.fstat(writer.rawValue)
            if UInt64(st.st_size) != blob.size { try Sys.ftruncate(writer.rawValue, Int64(blob.size)) }
            // Granules fetched without a tree never count as checked against one (and the other way round).
            let source = blob.url + (verifier.map { " verity " + $0.digestHex } ?? "")
            let identity = PopulationRecord.identity(source: source, size: blob.size, etag: blob.etag, lastModified: blob.lastModified)
            record = try PopulationRecord(path: recordPath, size: blob.size, granule: granule, identity: identity)
            state = Locked((GranuleBits(capacity: record.granules), GranuleBits(capacity: record.granules)))
            try takeHead()
        } catch {
            Sys.close(writer.rawValue)
            throw error
        }
    }

    /// The whole granules `blob.open` already transferred (its probe) go into the cache file; they
    /// become present at the next commit, like any fetched data.
    private func takeHead() throws {
        defer { blob.dropHead() }
        // The probe's bytes are not checked against a tree: with a verifier they are fetched again.
        guard verifier == nil else { return }
        let head = blob.head
        let usable = UInt64(head.count) == size ? UInt64(head.count) : UInt64(head.count) / granule * granule
        guard usable > 0, let r = granuleRange(0, usable) else { return }
        for g in record.missing(r) {
            let off = Int(UInt64(g) * granule)
            let end = min(off + Int(granule), Int(usable))
            try head[off..<end].withUnsafeBytes { try Sys.pwriteAll(writer.rawValue, $0, at: Int64(off)) }
            state.withLock { $0.written.insert(g) }
        }
    }

    deinit {
        try? commit()
        Sys.close(writer.rawValue)
    }

    /// The writer descriptor (to hand to a restarted worker).
    public var writerFD: Int32 { writer.rawValue }

    func granuleRange(_ offset: UInt64, _ length: UInt64) -> ClosedRange<Int>? {
        guard length > 0, offset < size else { return nil }
        let end = min(offset + length, size)
        return Int(offset / granule)...Int((end - 1) / granule)
    }

    /// True when every byte of the range is readable from the cache file now.
    public func isAvailable(offset: UInt64, length: UInt64) -> Bool {
        guard let r = granuleRange(offset, length) else { return true }
        let missing = record.missing(r)
        if missing.isEmpty { return true }
        return state.withLock { s in missing.allSatisfy { s.written.contains($0) } }
    }

    /// Makes [offset, offset+length) readable: fetches what is missing (joining fetches in flight).
    public func ensure(offset: UInt64, length: UInt64) throws {
        guard let range = granuleRange(offset, length) else { return }
        while true {
            let (mine, others) = claim(range)
            if mine.isEmpty && others.isEmpty { return }
            if !mine.isEmpty { try fetchClaimed(mine) }
            if !others.isEmpty {
                waiters.withLock { $0 += 1 }
                _ = cond.wait(timeout: .now() + .milliseconds(50))
                waiters.withLock { $0 -= 1 }
            }
        }
    }

    /// Fetches the missing granules of [offset, offset+length) that nobody is fetching yet and returns
    /// without waiting for the others (readahead: a reader that needs them joins whoever fetches them).
    public func fetchUnclaimed(offset: UInt64, length: UInt64) throws {
        guard let range = granuleRange(offset, length) else { return }
        let mine = claim(range).mine
        if !mine.isEmpty { try fetchClaimed(mine) }
    }

    /// Claims the missing granules nobody is fetching; notes those someone else is fetching.
    private func claim(_ range: ClosedRange<Int>) -> (mine: [Int], others: [Int]) {
        state.withLock { s in
            var mine: [Int] = [], others: [Int] = []
            for g in record.missing(range) where !s.written.contains(g) {
                if s.inFlight.contains(g) { others.append(g) } else { mine.append(g); s.inFlight.insert(g) }
            }
            return (mine, others)
        }
    }

    /// Fetches claimed granules run by run; each run becomes readable as soon as it is written (waiters
    /// wake then, not when the whole claim is done); on failure the rest is unclaimed again.
    private func fetchClaimed(_ mine: [Int]) throws {
        let runs = runs(of: mine)
        for (i, run) in runs.enumerated() {
            let bad: Set<Int>
            do {
                bad = try fetchRun(run)
            } catch {
                state.withLock { s in for r in runs[i...] { for g in r { s.inFlight.remove(g) } } }
                wakeWaiters()
                throw error
            }
            // Granules that failed their check stay missing; the others are readable.
            state.withLock { s in for g in run { s.inFlight.remove(g); if !bad.contains(g) { s.written.insert(g) } } }
            wakeWaiters()
            if let g = bad.min() {
                state.withLock { s in for r in runs[(i + 1)...] { for g in r { s.inFlight.remove(g) } } }
                wakeWaiters()
                throw RemoteError.cache("block at \(UInt64(g) * granule) does not match the fs-verity tree (fetched twice)")
            }
        }
    }

    private func wakeWaiters() {
        let n = waiters.get()
        for _ in 0..<n { cond.signal() }
    }

    /// Granules as runs of consecutive granules, each at most `maxRequest` bytes (one Range request).
    func runs(of gs: [Int]) -> [ClosedRange<Int>] {
        var runs: [ClosedRange<Int>] = []
        for g in gs.sorted() {
            if let last = runs.last, last.upperBound + 1 == g, UInt64(g - last.lowerBound + 1) * granule <= maxRequest {
                runs[runs.count - 1] = last.lowerBound...g
            } else {
                runs.append(g...g)
            }
        }
        return runs
    }

    /// The bytes a run of granules covers (the last granule ends at the blob's end).
    func byteRange(_ run: ClosedRange<Int>) -> (offset: UInt64, length: UInt64) {
        let off = UInt64(run.lowerBound) * granule
        return (off, min(UInt64(run.upperBound + 1) * granule, size) - off)
    }

    /// One Range request for a run of granules, written into the cache file; with a verifier only
    /// the granules (4 KiB blocks then) that match the tree are written, and those that do not are
    /// returned (the request is made once more first: a transfer can go wrong).
    @discardableResult
    func fetchRun(_ run: ClosedRange<Int>) throws -> Set<Int> {
        let r = byteRange(run)
        // Unchecked bytes go straight into the cache file; they become readable only once this
        // returns (the caller marks the run written), so a bad response's bytes are never served.
        guard let verifier else {
            try blob.read(offset: r.offset, length: Int(r.length), into: writer.rawValue)
            return []
        }
        var bad = try checkedFetch(r, verifier)
        if !bad.isEmpty {
            verityFailures.withLock { $0 += bad.count }
            bad = try checkedFetch(r, verifier)
            verityFailures.withLock { $0 += bad.count }
        }
        return Set(bad.map { Int(($0 * 4096) / granule) })
    }

    /// One request whose blocks are checked as they arrive, those that match written at once; the
    /// blocks that did not match.
    private func checkedFetch(_ r: (offset: UInt64, length: UInt64), _ verifier: VerityVerifier) throws -> [UInt64] {
        let sink = try CheckedWriter(verifier: verifier, fd: writer.rawValue, offset: r.offset, length: r.length)
        return try sink.finish(try blob.read(offset: r.offset, length: Int(r.length), observer: sink))
    }

    /// Makes written data durable, then records it present (one fdatasync for many ranges).
    public func commit() throws {
        let pending: [Int] = state.withLock { $0.written.members }
        guard !pending.isEmpty else { return }
        _ = fdatasync(writer.rawValue)
        try record.markPresent(pending)
        state.withLock { s in for g in pending { s.written.remove(g) } }
    }

    /// The ImageSource view: fetch on demand, then read the cache file.
    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard count > 0, offset < size else { return [] }
        let n = Int(min(UInt64(count), size - offset))
        try ensureForRead(offset: offset, count: n)
        return try Sys.preadFully(writer.rawValue, count: n, at: Int64(offset))
    }

    /// The range in the cache file once it is present (fetched and checked as for `read`).
    public func fileRegion(at offset: UInt64, count: Int) throws -> FileRegion? {
        guard count > 0, offset + UInt64(count) <= size else { return nil }
        try ensureForRead(offset: offset, count: count)
        return FileRegion(fd: writer.rawValue, offset: offset)
    }

    /// What a read needs present first: its range, widened to the read window when one is set.
    func ensureForRead(offset: UInt64, count n: Int) throws {
        if readWindow > 0, !isAvailable(offset: offset, length: UInt64(n)) {
            let start = offset / readWindow * readWindow
            let end = min((offset + UInt64(n) + readWindow - 1) / readWindow * readWindow, size)
            try ensure(offset: start, length: end - start)
        }
        try ensure(offset: offset, length: UInt64(n))
    }

    /// Fetches what is missing of the ranges, as runs of granules, up to 4 requests at once.
    public func prefetch(_ ranges: [ByteRange]) throws {
        var granules = Set<Int>()
        for r in ranges where !isAvailable(offset: r.offset, length: r.length) {
            if let g = granuleRange(r.offset, r.length) { granules.formUnion(g) }
        }
        let runs = runs(of: Array(granules))
        guard !runs.isEmpty else { return }
        let errors = Locked<[Error]>([])
        let n = min(runs.count, 4)
        Threads.parallel(n) { [self] worker in
            for (i, run) in runs.enumerated() where i % n == worker {
                let r = byteRange(run)
                do { try ensure(offset: r.offset, length: r.length) } catch { errors.withLock { $0.append(error) } }
            }
        }
        if let e = errors.get().first { throw e }
    }

    /// Fetches every metadata range of the image (what a mount reads without raising events) with
    /// `parallel` concurrent requests, walking the tree through this lazy source.
    /// `commit`: make it durable and recorded present now (a process that hands the cache file to
    /// another must); otherwise the next `commit()` does, and until then this object serves it.
    public func fetchMetadata(parallel: Int = 4, window: UInt64 = 256 << 10, commit commitNow: Bool = true) throws -> MetadataRanges {
        readWindow = window
        defer { readWindow = 0 }
        let image = try EROFSImage(source: self)
        let ranges = try image.metadataRanges()
        // The walk fetched what it read; fetch the rest of each range in parallel.
        let errors = Locked<[Error]>([])
        Threads.parallel(max(parallel, 1)) { [self] worker in
            for (i, r) in ranges.ranges.enumerated() where i % max(parallel, 1) == worker {
                do { try ensure(offset: r.offset, length: r.length) } catch { errors.withLock { $0.append(error) } }
            }
        }
        if let e = errors.get().first { throw e }
        if commitNow { try commit() }
        return ranges
    }

    /// Verifies the complete blob against a sha256 digest (hex).
    public func verify(sha256 expected: String) throws {
        var hasher = SHA256()
        var pos: UInt64 = 0
        while pos < size {
            let chunk = try Sys.preadFully(writer.rawValue, count: Int(min(8 << 20, size - pos)), at: Int64(pos))
            guard !chunk.isEmpty else { throw RemoteError.cache("\(dataPath) is shorter than \(size) bytes") }
            hasher.update(data: chunk)
            pos += UInt64(chunk.count)
        }
        let actual = hasher.finalize().map { String(hexByte: $0) }.joined()
        guard actual == expected.lowercased() else { throw RemoteError.digestMismatch(expected: expected, actual: actual) }
    }
}

/// Granule numbers below a fixed count, one bit each. The granules in flight and those written but
/// not yet recorded are looked up for every read, and a checked blob has one per 4 KiB (65536 for
/// 256 MiB): in hashed sets they cost a few percent of a verified mount's CPU.
struct GranuleBits {
    private var words: [UInt64]

    init(capacity: Int) { words = [UInt64](repeating: 0, count: (capacity + 63) / 64) }

    func contains(_ g: Int) -> Bool { words[g >> 6] & (1 << UInt64(g & 63)) != 0 }

    mutating func insert(_ g: Int) { words[g >> 6] |= 1 << UInt64(g & 63) }

    mutating func remove(_ g: Int) { words[g >> 6] &= ~(1 << UInt64(g & 63)) }

    /// The members, ascending.
    var members: [Int] {
        var out: [Int] = []
        for (i, w) in words.enumerated() where w != 0 {
            var bits = w
            while bits != 0 {
                out.append(i << 6 | bits.trailingZeroBitCount)
                bits &= bits - 1
            }
        }
        return out
    }
}
