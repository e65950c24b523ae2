/// The NBD wire protocol (fixed newstyle negotiation, simple and structured replies), as the
/// NetworkBlockDevice project's doc/proto.md specifies it. Everything is big-endian on the wire.
public enum NBD {
    static let magic: UInt64 = 0x4e42_444d_4147_4943            // "NBDMAGIC"
    static let optionMagic: UInt64 = 0x4948_4156_454f_5054      // "IHAVEOPT"
    static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let structuredReplyMagic: UInt32 = 0x668e_33ef

    /// Handshake flags (server) and client flags.
    static let flagFixedNewstyle: UInt16 = 1
    static let flagNoZeroes: UInt16 = 2

    /// Options.
    enum Option: UInt32 {
        case exportName = 1, abort = 2, list = 3, startTLS = 5, info = 6, go = 7, structuredReply = 8
        case listMetaContext = 9, setMetaContext = 10, extendedHeaders = 11
    }

    /// Option reply types.
    static let repAck: UInt32 = 1
    static let repServer: UInt32 = 2
    static let repInfo: UInt32 = 3
    static let repErrUnsupported: UInt32 = 0x8000_0001
    static let repErrPolicy: UInt32 = 0x8000_0002
    static let repErrInvalid: UInt32 = 0x8000_0003
    static let repErrUnknown: UInt32 = 0x8000_0006
    static let repErrTooBig: UInt32 = 0x8000_0009

    /// NBD_INFO_* in INFO/GO replies.
    static let infoExport: UInt16 = 0
    static let infoName: UInt16 = 1
    static let infoDescription: UInt16 = 2
    static let infoBlockSize: UInt16 = 3

    /// Transmission flags.
    static let hasFlags: UInt16 = 1 << 0
    static let readOnly: UInt16 = 1 << 1
    static let sendFlush: UInt16 = 1 << 2
    static let canMultiConn: UInt16 = 1 << 8
    static let sendCache: UInt16 = 1 << 10

    /// Commands.
    enum Command: UInt16 {
        case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, cache = 5, writeZeroes = 6, blockStatus = 7, resize = 8
    }

    /// Structured reply chunk types and flags.
    static let replyFlagDone: UInt16 = 1
    static let replyTypeNone: UInt16 = 0
    static let replyTypeOffsetData: UInt16 = 1
    static let replyTypeError: UInt16 = 0x8001

    /// Error values (as the protocol numbers them: the Linux errno values).
    public enum Error: UInt32, Swift.Error, Sendable {
        case permission = 1, io = 5, noMemory = 12, invalid = 22, noSpace = 28, overflow = 75, notSupported = 95, shutdown = 108
    }
}

/// What a server exports: a read-only byte range with its block-size constraints.
public struct NBDExport: Sendable {
    public var name: String
    public var description: String
    public var size: UInt64
    /// Any byte range can be read; the preferred size is the cache granule; requests above
    /// `maximumBlock` are refused (EOVERFLOW), which bounds the memory one request can take.
    public var minimumBlock: UInt32 = 1
    public var preferredBlock: UInt32
    public var maximumBlock: UInt32

    public init(name: String, description: String = "", size: UInt64, preferredBlock: UInt32 = 64 << 10,
                maximumBlock: UInt32 = 32 << 20) {
        self.name = name
        self.description = description
        self.size = size
        self.preferredBlock = preferredBlock
        self.maximumBlock = maximumBlock
    }

    /// Read-only, flush accepted (nothing to flush), CACHE (prefetch), several connections see one image.
    var transmissionFlags: UInt16 { NBD.hasFlags | NBD.readOnly | NBD.sendFlush | NBD.sendCache | NBD.canMultiConn }
}

/// Big-endian encoding into a byte array.
struct WireWriter {
    var bytes: [UInt8] = []

    mutating func u16(_ v: UInt16) { for s in stride(from: 8, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt16(s))) } }
    mutating func u32(_ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) } }
    mutating func u64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(s))) } }
    mutating func append(_ b: [UInt8]) { bytes += b }
}

/// Big-endian decoding from a byte slice (callers check the length first).
extension ArraySlice where Element == UInt8 {
    func be16(_ at: Int) -> UInt16 { UInt16(self[startIndex + at]) << 8 | UInt16(self[startIndex + at + 1]) }
    func be32(_ at: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(self[startIndex + at + $1]) } }
    func be64(_ at: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(self[startIndex + at + $1]) } }
}
