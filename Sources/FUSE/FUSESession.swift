import Synchronization

/// A failed operation, answered with this errno.
public struct FUSEError: Error, Sendable, Equatable {
    public var errno: Int32
    public init(_ errno: Int32) { self.errno = errno }
    public static let noEntry = FUSEError(2)  // ENOENT
    public static let io = FUSEError(5)  // EIO
    public static let notDirectory = FUSEError(20)  // ENOTDIR
    public static let invalid = FUSEError(22)  // EINVAL
    public static let readOnly = FUSEError(30)  // EROFS
    public static let range = FUSEError(34)  // ERANGE
    public static let notImplemented = FUSEError(38)  // ENOSYS
    public static let noData = FUSEError(61)  // ENODATA
}

/// A read-only filesystem served over FUSE. Node ids are the filesystem's own (1 is the root);
/// the kernel may call from several threads at once.
public protocol FUSEFilesystem: Sendable {
    func lookup(parent: UInt64, name: [UInt8]) throws(FUSEError) -> FUSEEntry
    func getattr(_ node: UInt64) throws(FUSEError) -> FUSEAttr
    func readlink(_ node: UInt64) throws(FUSEError) -> [UInt8]
    /// Checks the node can be opened for reading; directories are opened with `directory`.
    func open(_ node: UInt64, directory: Bool) throws(FUSEError)
    /// Up to `size` bytes at `offset` (fewer only at the end of the file).
    func read(_ node: UInt64, offset: UInt64, size: Int) throws(FUSEError) -> [UInt8]
    /// Entries after cookie `after` (0: from the start), as many as the caller takes.
    func readdir(_ node: UInt64, after: UInt64, plus: Bool) throws(FUSEError) -> [FUSEDirEntry]
    func getxattr(_ node: UInt64, name: [UInt8]) throws(FUSEError) -> [UInt8]
    func listxattr(_ node: UInt64) throws(FUSEError) -> [[UInt8]]
    func statfs() -> FUSEStatfs
    /// `read` straight into `buffer` (the reply being built): the count written.
    func read(_ node: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(FUSEError) -> Int
    /// Where exactly the bytes `read` would return lie in an open file (once present), so the reply
    /// can be spliced from it; nil when they must be read (compressed, split, or not in a file).
    func readRegion(_ node: UInt64, offset: UInt64, size: Int) throws(FUSEError) -> FUSEFileRegion?
    /// The passthrough backing id (FUSE_DEV_IOC_BACKING_OPEN) whose file holds exactly this node's
    /// bytes, for good: its opens are answered with FOPEN_PASSTHROUGH. nil: the server answers reads.
    func backing(_ node: UInt64) -> Int32?
    /// The regular files a reader walking `node`'s directory in listing order reads next (node and
    /// size), as far as the kernel already knows them (listed by READDIRPLUS); at most `limit`.
    func following(_ node: UInt64, limit: Int) -> [(node: UInt64, size: UInt64)]
}

/// Bytes of an open file: a READ reply's data, spliced to the device without passing through the server.
public struct FUSEFileRegion: Sendable, Equatable {
    public var fd: Int32
    public var offset: UInt64
    public var length: Int
    public init(fd: Int32, offset: UInt64, length: Int) { (self.fd, self.offset, self.length) = (fd, offset, length) }
}

/// What to write to the device for one request: the reply's bytes, or a READ reply's header whose
/// data follows from a file region.
public enum FUSEOutput: Sendable {
    case bytes([UInt8])
    case file(header: [UInt8], region: FUSEFileRegion)
}

extension FUSEFilesystem {
    public func backing(_ node: UInt64) -> Int32? { nil }
    public func following(_ node: UInt64, limit: Int) -> [(node: UInt64, size: UInt64)] { [] }

    /// Through `read(_:offset:size:)` and a copy, for filesystems without a direct path.
    public func read(_ node: UInt64, offset: UInt64,
                     into buffer: UnsafeMutableRawBufferPointer) throws(FUSEError) -> Int {
        let bytes = try read(node, offset: offset, size: buffer.count)
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(buffer.count))) }
        return min(bytes.count, buffer.count)
    }

    public func readRegion(_ node: UInt64, offset: UInt64, size: Int) throws(FUSEError) -> FUSEFileRegion? { nil }
}

/// What a session counts: requests per opcode class, errors, and the time spent answering reads.
public struct FUSEStats: Sendable, Codable, Equatable {
    public var requests: UInt64 = 0
    public var reads: UInt64 = 0
    public var readBytes: UInt64 = 0
    public var errors: UInt64 = 0
    /// Total and worst time answering READ, in microseconds.
    public var readMicros: UInt64 = 0
    public var maxReadMicros: UInt64 = 0
    /// The protocol the kernel offered at INIT.
    public var kernelMinor: UInt32 = 0
    /// Opens answered with FOPEN_PASSTHROUGH (their reads never reach the server); nil from servers
    /// that predate it.
    public var passthroughOpens: UInt64?
    public init() {}
}

/// Turns requests into replies for one FUSE connection: the INIT handshake, then every opcode a
/// read-only filesystem answers. It owns no descriptor (the server loop reads and writes), so tests
/// drive it with byte buffers.
public final class FUSESession: Sendable {
    public let filesystem: any FUSEFilesystem
    /// Entry and attribute lifetime handed to the kernel: an image never changes under a mount.
    public let validSeconds: UInt64
    /// File content stays in the page cache across opens (FOPEN_KEEP_CACHE).
    public let keepCache: Bool
    private let state = Mutex<(initialized: Bool, kernelFlags: FUSEInitFlags, stats: FUSEStats)>(
        (false, [], FUSEStats()))
    /// Files whose bytes were pushed into the page cache (`pushAhead`), not to be pushed again.
    private let pushed = Mutex<Set<UInt64>>([])
    /// Read replies larger than this are split by the kernel; what INIT negotiated (max_pages).
    public static let maxPages: UInt16 = 256
    /// max_write in INIT: the mount is read-only, but the kernel patch "fuse: enable large folios"
    /// (2025) sizes a FUSE file's page-cache folios by min(max_write, max_read, max_pages), and a
    /// 4 KiB max_write would keep them single pages (Linux 6.18.44 makes single pages either way).
    public static let maxWrite = UInt32(maxPages) * 4096
    /// Ask for FUSE_PASSTHROUGH in INIT (when the kernel offers it) with a stacking depth of one:
    /// a backing file lives on a plain filesystem.
    public let passthrough: Bool

    public init(filesystem: any FUSEFilesystem, validSeconds: UInt64 = 86_400, keepCache: Bool = true,
                passthrough: Bool = false) {
        (self.filesystem, self.validSeconds, self.keepCache) = (filesystem, validSeconds, keepCache)
        self.passthrough = passthrough
    }

    /// Continues a connection whose INIT an earlier server answered (a restarted server): the
    /// kernel does not send INIT again.
    public func resume(kernelFlags: FUSEInitFlags, kernelMinor: UInt32) {
        state.withLock { s in
            s.initialized = true
            s.kernelFlags = kernelFlags
            s.stats.kernelMinor = kernelMinor
        }
    }

    /// The kernel's INIT flags (empty before INIT).
    public var kernelFlags: FUSEInitFlags { state.withLock { $0.kernelFlags } }
    public var stats: FUSEStats { state.withLock { $0.stats } }

    /// Like `handle`, but a READ whose data lies in a file region is answered by its header and
    /// that region (for splice); everything else as `handle` answers it.
    public func respond(_ bytes: ArraySlice<UInt8>) -> FUSEOutput? {
        guard let req = FUSERequest(bytes), req.opcode == FUSEOpcode.read.rawValue, state.withLock({ $0.initialized })
        else { return handle(bytes).map(FUSEOutput.bytes) }
        let started = ContinuousClock.now
        let a = req.args
        let size = Int(min(a.u32(16), UInt32(Self.maxPages) * 4096))
        let region: FUSEFileRegion?
        do throws(FUSEError) { region = try filesystem.readRegion(req.node, offset: a.u64(8), size: size) } catch {
            state.withLock { $0.stats.errors += 1; $0.stats.requests += 1 }
            return .bytes(FUSEReply.error(req.unique, errno: error.errno))
        }
        guard let region, region.length > 0 else { return handle(bytes).map(FUSEOutput.bytes) }
        count(read: region.length, since: started)
        var w = WireWriter(capacity: FUSELayout.outHeader)
        w.u32(UInt32(FUSELayout.outHeader + region.length))
        w.i32(0)
        w.u64(req.unique)
        return .file(header: w.bytes, region: region)
    }

    private func count(read bytes: Int, since started: ContinuousClock.Instant) {
        let took = (ContinuousClock.now - started).components
        let micros = UInt64(max(0, took.seconds * 1_000_000 + took.attoseconds / 1_000_000_000_000))
        state.withLock { s in
            s.stats.requests += 1
            s.stats.reads += 1
            s.stats.readBytes += UInt64(bytes)
            s.stats.readMicros += micros
            s.stats.maxReadMicros = max(s.stats.maxReadMicros, micros)
        }
    }

    /// After a READ from the start of a file: the files a reader walking its directory reads next,
    /// as FUSE_NOTIFY_STORE messages of their whole bytes (small files only, at most `budget` bytes),
    /// so that those reads find the page cache filled instead of each waiting for a round trip.
    /// Nothing for any other request, nor for files pushed before. Each message goes to `send` as
    /// soon as it is made: the reader wants the next file first, and it would otherwise wait for
    /// the last of them to be decompressed.
    public func pushAhead(_ bytes: ArraySlice<UInt8>, files: Int = 16, budget: Int = 1 << 20,
                          send: ([UInt8]) -> Void) {
        guard let req = FUSERequest(bytes), req.opcode == FUSEOpcode.read.rawValue, req.args.u64(8) == 0,
              state.withLock({ $0.initialized }) else { return }
        var left = budget
        for (node, size) in filesystem.following(req.node, limit: files) where size > 0 && Int(size) <= left {
            guard pushed.withLock({ p -> Bool in
                if p.count >= 1 << 16 { p.removeAll(keepingCapacity: true) }
                return p.insert(node).inserted
            }) else { continue }
            guard let data = try? filesystem.read(node, offset: 0, size: Int(size)), data.count == Int(size) else {
                continue
            }
            send(FUSEReply.store(node: node, offset: 0, data))
            left -= data.count
        }
    }

    /// The reply to one request, or nil for requests that get none (FORGET, BATCH_FORGET, INTERRUPT).
    public func handle(_ bytes: ArraySlice<UInt8>) -> [UInt8]? {
        guard let req = FUSERequest(bytes) else { return nil }
        let op = FUSEOpcode(rawValue: req.opcode)
        if op == .forget || op == .batchForget || op == .interrupt { return nil }
        if let reply = zeroMessageOpen(op, req) { return reply }
        let started = ContinuousClock.now
        let reply: [UInt8]
        do throws(FUSEError) {
            reply = try dispatch(op, req)
        } catch {
            state.withLock { $0.stats.errors += 1; $0.stats.requests += 1 }
            return FUSEReply.error(req.unique, errno: error.errno)
        }
        if op == .read {
            count(read: reply.count - FUSELayout.outHeader, since: started)
        } else {
            state.withLock { $0.stats.requests += 1 }
        }
        return reply
    }

    private func dispatch(_ op: FUSEOpcode?, _ req: FUSERequest) throws(FUSEError) -> [UInt8] {
        guard let op else { throw .notImplemented }
        if op != .initialize, !state.withLock({ $0.initialized }) { throw .io }
        let a = req.args
        switch op {
        case .initialize: return try initialize(req)
        case .lookup:
            let e = try lookupOrNegative(parent: req.node, name: req.name(at: 0))
            var w = WireWriter(capacity: FUSELayout.entryOut)
            e.encode(into: &w, validSeconds: validSeconds)
            return FUSEReply.ok(req.unique, w.bytes)
        case .getattr:
            let attr = try filesystem.getattr(req.node)
            var w = WireWriter(capacity: FUSELayout.attrOut)
            w.u64(validSeconds)
            w.u32(0)
            w.u32(0)
            attr.encode(into: &w)
            return FUSEReply.ok(req.unique, w.bytes)
        case .readlink: return FUSEReply.ok(req.unique, try filesystem.readlink(req.node))
        case .open, .opendir:
            // O_ACCMODE other than O_RDONLY: the mount is read-only.
            guard a.u32(0) & 3 == 0 else { throw .readOnly }
            try filesystem.open(req.node, directory: op == .opendir)
            var flags: FUSEOpenFlags = op == .opendir ? [.keepCache, .cacheDir] : (keepCache ? [.keepCache] : [])
            flags.insert(.noFlush)
            let backing = op == .open ? filesystem.backing(req.node) : nil
            if backing != nil {
                flags = [.passthrough, .noFlush]
                state.withLock { $0.stats.passthroughOpens = ($0.stats.passthroughOpens ?? 0) + 1 }
            }
            var w = WireWriter(capacity: 16)
            w.u64(0)
            w.u32(flags.rawValue)
            w.i32(backing ?? 0)
            return FUSEReply.ok(req.unique, w.bytes)
        case .read:
            let size = Int(min(a.u32(16), UInt32(Self.maxPages) * 4096))
            return try readReply(req, offset: a.u64(8), size: size)
        case .readdir, .readdirplus:
            let entries = try readdir(req.node, after: a.u64(8), size: Int(a.u32(16)), plus: op == .readdirplus)
            return FUSEReply.ok(req.unique, entries)
        case .getxattr: return try getxattr(req)
        case .listxattr: return try listxattr(req)
        case .statfs:
            var w = WireWriter(capacity: FUSELayout.statfsOut)
            filesystem.statfs().encode(into: &w)
            return FUSEReply.ok(req.unique, w.bytes)
        case .release, .releasedir, .access, .destroy, .fsync, .fsyncdir, .syncfs:
            return FUSEReply.ok(req.unique)
        case .flush:
            // ENOSYS once: the kernel stops sending FLUSH on every close (nothing is ever written).
            throw .notImplemented
        case .setattr, .symlink, .mknod, .mkdir, .unlink, .rmdir, .rename, .rename2, .link, .write, .create,
             .setxattr, .removexattr, .fallocate, .tmpfile, .copyFileRange:
            throw .readOnly
        default: throw .notImplemented
        }
    }

    /// Where the kernel supports it, OPEN and OPENDIR answer ENOSYS once: the kernel then opens
    /// files and directories by itself, with FOPEN_KEEP_CACHE (and CACHE_DIR), and sends neither
    /// OPEN nor RELEASE again — two round trips less per file (an image never changes under a mount).
    private func zeroMessageOpen(_ op: FUSEOpcode?, _ req: FUSERequest) -> [UInt8]? {
        guard op == .open || op == .opendir, req.args.u32(0) & 3 == 0 else { return nil }
        // A passthrough file needs its OPEN answered: the reply names the backing file.
        guard op == .opendir || filesystem.backing(req.node) == nil else { return nil }
        let flags = kernelFlags
        guard op == .open ? flags.contains(.noOpenSupport) : flags.contains(.noOpendirSupport) else { return nil }
        state.withLock { $0.stats.requests += 1 }
        return FUSEReply.error(req.unique, errno: FUSEError.notImplemented.errno)
    }

    /// The READ reply in one allocation: the header, then the data read straight after it.
    private func readReply(_ req: FUSERequest, offset: UInt64, size: Int) throws(FUSEError) -> [UInt8] {
        var failure: FUSEError?
        let reply = [UInt8](unsafeUninitializedCapacity: FUSELayout.outHeader + size) { buf, count in
            let all = UnsafeMutableRawBufferPointer(buf)
            let body = UnsafeMutableRawBufferPointer(rebasing: all[FUSELayout.outHeader...])
            let n: Int
            do throws(FUSEError) { n = try filesystem.read(req.node, offset: offset, into: body) } catch {
                failure = error
                count = 0
                return
            }
            var w = WireWriter(capacity: FUSELayout.outHeader)
            w.u32(UInt32(FUSELayout.outHeader + n))
            w.i32(0)
            w.u64(req.unique)
            for (i, b) in w.bytes.enumerated() { buf[i] = b }
            count = FUSELayout.outHeader + n
        }
        if let failure { throw failure }
        return reply
    }

    /// A missing name becomes a negative entry the kernel caches (node 0), not ENOENT: the image
    /// never gains it.
    private func lookupOrNegative(parent: UInt64, name: [UInt8]) throws(FUSEError) -> FUSEEntry {
        do throws(FUSEError) {
            return try filesystem.lookup(parent: parent, name: name)
        } catch where error == .noEntry {
            return .negative
        }
    }

    private func initialize(_ req: FUSERequest) throws(FUSEError) -> [UInt8] {
        let a = req.args
        let (major, minor) = (a.u32(0), a.u32(4))
        guard major == FUSELayout.protocolMajor, minor >= 23 else {
            // Older protocols: answer with our major only, as the kernel expects for a mismatch.
            throw .invalid
        }
        var offered = FUSEInitFlags(rawValue: UInt64(a.u32(12)))
        if offered.contains(.initExt) { offered.formUnion(FUSEInitFlags(rawValue: UInt64(a.u32(16)) << 32)) }
        var wanted: FUSEInitFlags = [.asyncRead, .doReaddirplus, .parallelDirops, .maxPages, .cacheSymlinks, .asyncDIO,
                                     .initExt]
        if passthrough { wanted.insert(.passthrough) }
        let flags = offered.intersection(wanted)
        state.withLock { s in
            s.initialized = true
            s.kernelFlags = offered
            s.stats.kernelMinor = minor
        }
        var w = WireWriter(capacity: FUSELayout.initOut)
        w.u32(FUSELayout.protocolMajor)
        w.u32(min(minor, FUSELayout.protocolMinor))
        w.u32(a.u32(8))  // max_readahead: what the kernel proposed
        w.u32(UInt32(truncatingIfNeeded: flags.rawValue))
        w.u16(64)  // max_background
        w.u16(48)  // congestion_threshold
        w.u32(Self.maxWrite)
        w.u32(1)  // time_gran: nanoseconds
        w.u16(Self.maxPages)
        w.u16(0)
        w.u32(UInt32(flags.rawValue >> 32))
        w.u32(flags.contains(.passthrough) ? 1 : 0)  // max_stack_depth
        w.zeros(FUSELayout.initOut - w.bytes.count)
        return FUSEReply.ok(req.unique, w.bytes)
    }

    private func readdir(_ node: UInt64, after: UInt64, size: Int, plus: Bool) throws(FUSEError) -> [UInt8] {
        var w = WireWriter(capacity: min(size, 1 << 16))
        for e in try filesystem.readdir(node, after: after, plus: plus) {
            guard w.bytes.count + e.encodedSize(plus: plus) <= size else { break }
            e.encode(into: &w, plus: plus, validSeconds: validSeconds)
        }
        return w.bytes
    }

    /// size 0 asks for the value's length; a buffer too small is ERANGE.
    private func getxattr(_ req: FUSERequest) throws(FUSEError) -> [UInt8] {
        let size = Int(req.args.u32(0))
        let value = try filesystem.getxattr(req.node, name: req.name(at: 8))
        return try sized(req.unique, value, size)
    }

    private func listxattr(_ req: FUSERequest) throws(FUSEError) -> [UInt8] {
        let names: [UInt8] = try filesystem.listxattr(req.node).flatMap { $0 + [UInt8(0)] }
        return try sized(req.unique, names, Int(req.args.u32(0)))
    }

    private func sized(_ unique: UInt64, _ value: [UInt8], _ size: Int) throws(FUSEError) -> [UInt8] {
        if size == 0 {
            var w = WireWriter(capacity: 8)
            w.u32(UInt32(value.count))
            w.u32(0)
            return FUSEReply.ok(unique, w.bytes)
        }
        guard value.count <= size else { throw .range }
        return FUSEReply.ok(unique, value)
    }
}
