/// File types as EROFS encodes them in i_mode (and in dirents).
public enum FileType: String, Sendable, Codable {
    case regular, directory, symlink, characterDevice, blockDevice, fifo, socket

    init?(mode: UInt16) {
        switch mode & 0o170000 {
        case 0o100000: self = .regular
        case 0o040000: self = .directory
        case 0o120000: self = .symlink
        case 0o020000: self = .characterDevice
        case 0o060000: self = .blockDevice
        case 0o010000: self = .fifo
        case 0o140000: self = .socket
        default: return nil
        }
    }

    /// The dirent file_type code (EROFS_FT_*).
    var direntCode: UInt8 {
        switch self {
        case .regular: return 1
        case .directory: return 2
        case .characterDevice: return 3
        case .blockDevice: return 4
        case .fifo: return 5
        case .socket: return 6
        case .symlink: return 7
        }
    }
}

/// How an inode's data is laid out (i_format bits 1–3).
public enum DataLayout: UInt8, Sendable, Codable {
    case flatPlain = 0
    case compressedFull = 1
    case flatInline = 2
    case compressedCompact = 3
    case chunkBased = 4

    public var isCompressed: Bool { self == .compressedFull || self == .compressedCompact }
}

/// An on-disk inode, compact (32 bytes) or extended (64 bytes).
public struct Inode: Sendable, Equatable {
    public var nid: UInt64
    /// Byte position of the inode in the image.
    public var position: UInt64
    public var isExtended: Bool
    public var layout: DataLayout
    public var format: UInt16
    public var xattrCount: UInt16
    public var mode: UInt16
    public var nlink: UInt32
    public var size: UInt64
    /// i_u: raw_blkaddr, compressed_blocks, rdev or the chunk format, depending on the type and layout.
    public var union: UInt32
    /// i_nb's MSB of the start block (48bit images; 0 otherwise).
    public var startHigh: UInt16 = 0
    public var ino: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var mtime: UInt64
    public var mtimeNsec: UInt32
    public var type: FileType

    public var inodeSize: UInt64 { isExtended ? 64 : 32 }
    /// Size of the inline xattr area that follows the inode.
    public var xattrIbodySize: UInt64 { xattrCount == 0 ? 0 : 12 + 4 * (UInt64(xattrCount) - 1) }
    /// Where inline data, chunk indexes or the compression map header start.
    public var bodyEnd: UInt64 { position + inodeSize + xattrIbodySize }
    public var permissions: UInt16 { mode & 0o7777 }
    public var rdev: UInt32 { union }
    /// A flat inode's first data block (48 bits in 48bit images).
    public var startBlock: UInt64 { UInt64(union) | UInt64(startHigh) << 32 }
    /// Directories of newer images may leave out their "." entry (EROFS_I_DOT_OMITTED).
    public var dotOmitted: Bool { type == .directory && format & 0x10 != 0 }

    static let nullAddress: UInt32 = 0xFFFF_FFFF
    /// Bounds that keep arithmetic on corrupt sizes from overflowing or running away.
    static let maxSize: UInt64 = 1 << 52
    static let maxDirectorySize: UInt64 = 256 << 20

    /// Parses the inode at `position` from `raw` (at least 64 bytes unless at the image end).
    init(nid: UInt64, position: UInt64, raw: [UInt8], superblock sb: Superblock) throws {
        let r = LEBytes(raw, origin: position, structure: "inode \(nid)")
        self.nid = nid
        self.position = position
        format = try r.u16(0)
        isExtended = format & 1 == 1
        let layoutBits = UInt8((format >> 1) & 0x7)
        guard let layout = DataLayout(rawValue: layoutBits) else {
            throw EROFSError.corrupt(structure: "inode \(nid)", offset: position, detail: "unknown data layout \(layoutBits)")
        }
        self.layout = layout
        xattrCount = try r.u16(2)
        mode = try r.u16(4)
        guard let type = FileType(mode: mode) else {
            throw EROFSError.corrupt(structure: "inode \(nid)", offset: position, detail: "invalid file type in mode 0o\(String(mode, radix: 8))")
        }
        self.type = type
        let has48 = sb.featureIncompat & Feature.bits48.rawValue != 0
        if isExtended {
            if has48 { startHigh = try r.u16(6) }
            size = try r.u64(8)
            union = try r.u32(16)
            ino = try r.u32(20)
            uid = try r.u32(24)
            gid = try r.u32(28)
            mtime = try r.u64(32)
            mtimeNsec = try r.u32(40)
            nlink = try r.u32(44)
        } else {
            // A non-directory compact inode with EROFS_I_NLINK_1 has one link, and i_nb holds the
            // start block's MSB instead.
            if type != .directory, format & 0x10 != 0 {
                nlink = 1
                if has48 { startHigh = try r.u16(6) }
            } else {
                nlink = UInt32(try r.u16(6))
            }
            size = UInt64(try r.u32(8))
            // Compact inodes store mtime relative to the superblock's build time (0 in older images).
            mtime = sb.buildTime &+ UInt64(try r.u32(12))
            mtimeNsec = sb.buildTimeNsec
            union = try r.u32(16)
            ino = try r.u32(20)
            uid = UInt32(try r.u16(24))
            gid = UInt32(try r.u16(26))
        }
        guard size <= Inode.maxSize else {
            throw EROFSError.corrupt(structure: "inode \(nid)", offset: position, detail: "size \(size) exceeds 2^52")
        }
        if type == .directory, size > Inode.maxDirectorySize {
            throw EROFSError.corrupt(structure: "inode \(nid)", offset: position, detail: "directory of \(size) bytes")
        }
        if type == .symlink, size > 4095 {
            throw EROFSError.corrupt(structure: "inode \(nid)", offset: position, detail: "symlink target of \(size) bytes")
        }
        if type == .characterDevice || type == .blockDevice || type == .fifo || type == .socket {
            guard size == 0 else { throw EROFSError.corrupt(structure: "inode \(nid)", offset: position, detail: "special file with size \(size)") }
        }
    }
}

/// One directory entry.
public struct DirEntry: Sendable, Equatable {
    public var name: String
    public var nameBytes: [UInt8]
    public var nid: UInt64
    public var fileTypeCode: UInt8
}

/// One extended attribute.
public struct Xattr: Sendable, Equatable, Codable {
    public var name: String
    public var value: [UInt8]
}
