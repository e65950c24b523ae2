/// The FUSE kernel wire format (include/uapi/linux/fuse.h), encoded and decoded in Swift so that a
/// session can be driven by byte buffers in tests, without /dev/fuse or root. Everything is
/// little-endian host order: the protocol is spoken with the local kernel only.
public enum FUSEOpcode: UInt32, Sendable {
    case lookup = 1, forget = 2, getattr = 3, setattr = 4, readlink = 5, symlink = 6, mknod = 8, mkdir = 9
    case unlink = 10, rmdir = 11, rename = 12, link = 13, open = 14, read = 15, write = 16, statfs = 17
    case release = 18, fsync = 20, setxattr = 21, getxattr = 22, listxattr = 23, removexattr = 24
    case flush = 25, initialize = 26, opendir = 27, readdir = 28, releasedir = 29, fsyncdir = 30
    case getlk = 31, setlk = 32, setlkw = 33, access = 34, create = 35, interrupt = 36, bmap = 37
    case destroy = 38, ioctl = 39, poll = 40, notifyReply = 41, batchForget = 42, fallocate = 43
    case readdirplus = 44, rename2 = 45, lseek = 46, copyFileRange = 47, syncfs = 50, tmpfile = 51, statx = 52
}

/// FUSE_INIT flags (the low 32 bits in `flags`, the high ones in `flags2` with FUSE_INIT_EXT).
public struct FUSEInitFlags: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let asyncRead = Self(rawValue: 1 << 0)
    public static let doReaddirplus = Self(rawValue: 1 << 13)
    public static let asyncDIO = Self(rawValue: 1 << 15)
    /// The kernel opens files without asking when OPEN answers ENOSYS (keeping their page cache).
    public static let noOpenSupport = Self(rawValue: 1 << 17)
    public static let parallelDirops = Self(rawValue: 1 << 18)
    public static let maxPages = Self(rawValue: 1 << 22)
    public static let cacheSymlinks = Self(rawValue: 1 << 23)
    public static let noOpendirSupport = Self(rawValue: 1 << 24)
    public static let initExt = Self(rawValue: 1 << 30)
    public static let passthrough = Self(rawValue: 1 << 37)
    /// The kernel can resend requests a server read but did not answer (FUSE_NOTIFY_RESEND, 6.9+).
    public static let hasResend = Self(rawValue: 1 << 39)
    public static let overIoUring = Self(rawValue: 1 << 41)
}

/// FOPEN_* reply flags.
public struct FUSEOpenFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let keepCache = Self(rawValue: 1 << 1)
    public static let cacheDir = Self(rawValue: 1 << 3)
    public static let noFlush = Self(rawValue: 1 << 5)
    /// Reads of this open file go to the backing file the reply names, not to the server.
    public static let passthrough = Self(rawValue: 1 << 7)
}

/// The fixed sizes of the structures this codec reads and writes.
public enum FUSELayout {
    public static let inHeader = 40
    public static let outHeader = 16
    public static let attr = 88
    public static let entryOut = 40 + attr
    public static let attrOut = 16 + attr
    public static let initOut = 64
    public static let direntHeader = 24
    public static let statfsOut = 80
    /// Request buffers must hold the largest write INIT allows (max_write) plus headers, or the kernel
    /// refuses the read (EINVAL); nothing is ever written, but max_write also bounds the page-cache
    /// folios of a FUSE file (see `FUSESession.maxWrite`).
    public static let requestBuffer = Int(FUSESession.maxWrite) + 4096
    /// A request buffer left uninitialised: its pages become resident only as far as the kernel
    /// writes requests into it (a megabyte a reader would otherwise cost every mount).
    public static func newRequestBuffer() -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: requestBuffer) { _, count in count = requestBuffer }
    }
    public static let rootNode: UInt64 = 1
    public static let protocolMajor: UInt32 = 7
    /// What this server speaks: 7.31 (max_pages, cache_symlinks, readdirplus), and the larger
    /// init reply of 7.36+ when the kernel offers FUSE_INIT_EXT.
    public static let protocolMinor: UInt32 = 40
    /// fuse_notify_code FUSE_NOTIFY_RESEND.
    public static let notifyResend: Int32 = 7
    /// fuse_notify_code FUSE_NOTIFY_STORE.
    public static let notifyStore: Int32 = 4
}

/// A request as read from /dev/fuse: fuse_in_header and the opcode's arguments.
public struct FUSERequest: Sendable {
    public var opcode: UInt32
    public var unique: UInt64
    public var node: UInt64
    public var uid: UInt32
    public var gid: UInt32
    public var pid: UInt32
    public var body: ArraySlice<UInt8>

    /// Parses one request; nil when the buffer is shorter than its header says.
    public init?(_ bytes: ArraySlice<UInt8>) {
        guard bytes.count >= FUSELayout.inHeader else { return nil }
        let r = WireReader(bytes)
        let len = Int(r.u32(0))
        guard len >= FUSELayout.inHeader, len <= bytes.count else { return nil }
        (opcode, unique, node) = (r.u32(4), r.u64(8), r.u64(16))
        (uid, gid, pid) = (r.u32(24), r.u32(28), r.u32(32))
        let start = bytes.startIndex
        body = bytes[(start + FUSELayout.inHeader)..<(start + len)]
    }

    /// The argument structure's fields, read at offsets from the start of the body.
    public var args: WireReader { WireReader(body) }

    /// A NUL-terminated name at `offset` of the body (LOOKUP, GETXATTR), without the NUL.
    public func name(at offset: Int) -> [UInt8] {
        let s = body.dropFirst(offset)
        return Array(s.prefix { $0 != 0 })
    }
}

/// Little-endian fields of a byte slice, zero beyond its end (a short argument struct from an
/// older kernel reads as zeros, as the kernel pads it).
public struct WireReader: Sendable {
    let bytes: ArraySlice<UInt8>
    public init(_ bytes: ArraySlice<UInt8>) { self.bytes = bytes }

    public func u32(_ at: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { acc, i in
            let p = bytes.startIndex + at + i
            return acc | (p < bytes.endIndex ? UInt32(bytes[p]) << (8 * UInt32(i)) : 0)
        }
    }

    public func u64(_ at: Int) -> UInt64 { UInt64(u32(at)) | UInt64(u32(at + 4)) << 32 }
}

/// Appends little-endian fields to a reply.
public struct WireWriter: Sendable {
    public private(set) var bytes: [UInt8] = []
    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    public mutating func u16(_ v: UInt16) { bytes += [UInt8(v & 0xff), UInt8(v >> 8)] }
    public mutating func u32(_ v: UInt32) {
        for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) }
    }
    public mutating func u64(_ v: UInt64) { u32(UInt32(truncatingIfNeeded: v)); u32(UInt32(v >> 32)) }
    public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    public mutating func zeros(_ n: Int) { bytes += repeatElement(0, count: n) }
    public mutating func append(_ b: [UInt8]) { bytes += b }
    /// Zero padding up to the next multiple of 8 (dirents are 8-byte aligned).
    public mutating func align8() { zeros((8 - bytes.count % 8) % 8) }
}

/// struct fuse_attr.
public struct FUSEAttr: Sendable, Equatable {
    public var ino: UInt64
    public var size: UInt64
    public var blocks: UInt64
    public var mtime: UInt64
    public var mtimeNsec: UInt32
    public var mode: UInt32
    public var nlink: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var rdev: UInt32
    public var blockSize: UInt32

    public init(ino: UInt64, size: UInt64, blocks: UInt64, mtime: UInt64, mtimeNsec: UInt32, mode: UInt32,
                nlink: UInt32, uid: UInt32, gid: UInt32, rdev: UInt32, blockSize: UInt32) {
        (self.ino, self.size, self.blocks, self.mtime, self.mtimeNsec) = (ino, size, blocks, mtime, mtimeNsec)
        (self.mode, self.nlink, self.uid, self.gid) = (mode, nlink, uid, gid)
        (self.rdev, self.blockSize) = (rdev, blockSize)
    }

    /// atime and ctime are the mtime: an EROFS image stores one timestamp, and the kernel's own
    /// EROFS driver reports it for all three.
    func encode(into w: inout WireWriter) {
        for v in [ino, size, blocks, mtime, mtime, mtime] { w.u64(v) }
        for v in [mtimeNsec, mtimeNsec, mtimeNsec, mode, nlink, uid, gid, rdev, blockSize, 0] { w.u32(v) }
    }
}

/// A looked-up name: the node it names and its attributes, with cache lifetimes.
public struct FUSEEntry: Sendable, Equatable {
    /// 0 for a negative entry (the name does not exist; the kernel caches that for `validSeconds`).
    public var node: UInt64
    public var attr: FUSEAttr
    public init(node: UInt64, attr: FUSEAttr) { (self.node, self.attr) = (node, attr) }

    /// No node: a name that does not exist (or, in readdirplus, an entry without attributes).
    public static let negative = FUSEEntry(node: 0, attr: FUSEAttr(ino: 0, size: 0, blocks: 0, mtime: 0,
                                                                   mtimeNsec: 0, mode: 0, nlink: 0, uid: 0, gid: 0,
                                                                   rdev: 0, blockSize: 0))

    func encode(into w: inout WireWriter, validSeconds: UInt64) {
        w.u64(node)
        w.u64(0)  // generation: node ids are never reused on an immutable image
        w.u64(validSeconds)
        w.u64(validSeconds)
        w.u32(0)
        w.u32(0)
        attr.encode(into: &w)
    }
}

/// One directory entry as readdir returns it; `cookie` is the offset the kernel passes back to
/// continue after it (stable: entry indexes in an immutable directory).
public struct FUSEDirEntry: Sendable, Equatable {
    public var name: [UInt8]
    public var ino: UInt64
    public var type: UInt32
    public var cookie: UInt64
    /// For READDIRPLUS: the entry's node and attributes (nil for "." and "..", which the kernel
    /// does not instantiate).
    public var entry: FUSEEntry?

    public init(name: [UInt8], ino: UInt64, type: UInt32, cookie: UInt64, entry: FUSEEntry?) {
        (self.name, self.ino, self.type, self.cookie, self.entry) = (name, ino, type, cookie, entry)
    }

    /// Bytes this entry takes in a reply.
    func encodedSize(plus: Bool) -> Int {
        (plus ? FUSELayout.entryOut : 0) + (FUSELayout.direntHeader + name.count + 7) / 8 * 8
    }

    func encode(into w: inout WireWriter, plus: Bool, validSeconds: UInt64) {
        if plus {
            let e = entry ?? FUSEEntry.negative
            e.encode(into: &w, validSeconds: entry == nil ? 0 : validSeconds)
        }
        w.u64(ino)
        w.u64(cookie)
        w.u32(UInt32(name.count))
        w.u32(type)
        w.append(name)
        w.align8()
    }
}

/// struct fuse_kstatfs.
public struct FUSEStatfs: Sendable, Equatable {
    public var blocks: UInt64
    public var files: UInt64
    public var blockSize: UInt32
    public var nameLength: UInt32
    public init(blocks: UInt64, files: UInt64, blockSize: UInt32, nameLength: UInt32 = 255) {
        (self.blocks, self.files, self.blockSize, self.nameLength) = (blocks, files, blockSize, nameLength)
    }

    func encode(into w: inout WireWriter) {
        for v in [blocks, 0, 0, files, 0] { w.u64(v) }
        for v in [blockSize, nameLength, blockSize, 0] { w.u32(v) }
        w.zeros(24)
    }
}

/// Reply framing: fuse_out_header + payload.
public enum FUSEReply {
    public static func ok(_ unique: UInt64, _ payload: [UInt8] = []) -> [UInt8] {
        var w = WireWriter(capacity: FUSELayout.outHeader + payload.count)
        w.u32(UInt32(FUSELayout.outHeader + payload.count))
        w.i32(0)
        w.u64(unique)
        w.append(payload)
        return w.bytes
    }

    /// An error reply: the negated errno, no payload.
    public static func error(_ unique: UInt64, errno: Int32) -> [UInt8] {
        var w = WireWriter(capacity: FUSELayout.outHeader)
        w.u32(UInt32(FUSELayout.outHeader))
        w.i32(-errno)
        w.u64(unique)
        return w.bytes
    }

    /// FUSE_NOTIFY_STORE: `data` into the kernel's page cache of `node` at `offset` (no request
    /// asked for it; the kernel takes it only for an inode it has, else the write fails ENOENT).
    public static func store(node: UInt64, offset: UInt64, _ data: [UInt8]) -> [UInt8] {
        var w = WireWriter(capacity: FUSELayout.outHeader + 24 + data.count)
        w.u32(UInt32(FUSELayout.outHeader + 24 + data.count))
        w.i32(FUSELayout.notifyStore)
        w.u64(0)
        w.u64(node)
        w.u64(offset)
        w.u32(UInt32(data.count))
        w.u32(0)
        w.append(data)
        return w.bytes
    }

    /// A notification (unique 0, the code in the error field) with no payload: FUSE_NOTIFY_RESEND.
    public static func notify(_ code: Int32) -> [UInt8] {
        var w = WireWriter(capacity: FUSELayout.outHeader)
        w.u32(UInt32(FUSELayout.outHeader))
        w.i32(code)
        w.u64(0)
        return w.bytes
    }
}
