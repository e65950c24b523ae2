import Syscall

/// The EROFS superblock (128 bytes at offset 1024, plus `sb_extslots` × 16).
public struct Superblock: Sendable, Equatable {
    public static let offset: UInt64 = 1024
    public static let magic: UInt32 = 0xE0F5_E1E2

    public var checksum: UInt32
    public var featureCompat: UInt32
    public var blockSizeBits: UInt8
    public var extSlots: UInt8
    public var rootNid: UInt64
    public var inodeCount: UInt64
    public var buildTime: UInt64
    public var buildTimeNsec: UInt32
    public var blocks: UInt64
    public var metaBlockAddress: UInt32
    public var xattrBlockAddress: UInt32
    public var uuid: [UInt8]
    public var volumeName: String
    public var featureIncompat: UInt32
    /// `available_compr_algs` when COMPR_CFGS is set, else `lz4_max_distance`.
    public var u1: UInt16
    public var extraDevices: UInt16
    public var deviceTableSlotOffset: UInt16
    public var dirBlockBits: UInt8
    public var xattrPrefixCount: UInt8
    public var xattrPrefixStart: UInt32
    public var packedNid: UInt64
    public var xattrFilterReserved: UInt8
    public var metaboxNid: UInt64

    public var blockSize: Int { 1 << Int(blockSizeBits) }
    public var size: Int { 128 + Int(extSlots) * 16 }
    public var uuidString: String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(36)
        for (i, b) in uuid.enumerated() {
            if i == 4 || i == 6 || i == 8 || i == 10 { out.append(UInt8(ascii: "-")) }
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xf)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Parses a superblock from the bytes starting at image offset 1024 (at least 128 bytes; when
    /// the checksum is to be verified, the rest of the first block, or one block for blocks of
    /// 1024 bytes and less).
    public init(parsing raw: [UInt8], verifyChecksum: Bool = true) throws {
        let r = LEBytes(raw, origin: Self.offset, structure: "superblock")
        let magic = try r.u32(0)
        guard magic == Self.magic else { throw EROFSError.notEROFS(magic: magic) }
        checksum = try r.u32(4)
        featureCompat = try r.u32(8)
        blockSizeBits = try r.u8(12)
        guard (9...16).contains(blockSizeBits) else { throw EROFSError.unsupportedBlockSize(bits: blockSizeBits) }
        extSlots = try r.u8(13)
        let rootNid16 = try r.u16(14)
        inodeCount = try r.u64(16)
        buildTime = try r.u64(24)
        buildTimeNsec = try r.u32(32)
        let blocksLo = try r.u32(36)
        metaBlockAddress = try r.u32(40)
        xattrBlockAddress = try r.u32(44)
        uuid = try r.slice(48, 16)
        volumeName = String(decoding: try r.slice(64, 16).prefix(while: { $0 != 0 }), as: UTF8.self)
        featureIncompat = try r.u32(80)
        u1 = try r.u16(84)
        extraDevices = try r.u16(86)
        deviceTableSlotOffset = try r.u16(88)
        dirBlockBits = try r.u8(90)
        xattrPrefixCount = try r.u8(91)
        xattrPrefixStart = try r.u32(92)
        packedNid = try r.u64(96)
        xattrFilterReserved = try r.u8(104)
        if featureIncompat & Feature.bits48.rawValue != 0, try r.u64(112) != 0 {
            // 48-bit layout with an 8-byte root nid at 112: the 2-byte root nid's place then holds
            // the block count's MSB (as the kernel reads it; a zero rootnid_8b keeps the 2-byte one).
            rootNid = try r.u64(112)
            blocks = UInt64(blocksLo) | UInt64(rootNid16) << 32
        } else {
            rootNid = UInt64(rootNid16)
            blocks = UInt64(blocksLo)
        }
        metaboxNid = featureIncompat & Feature.metabox.rawValue != 0 ? try r.u64(128) : 0
        if verifyChecksum, featureCompat & CompatFeature.sbChecksum.rawValue != 0 {
            // The checksum covers the rest of the first block after offset 1024, or, for blocks of
            // 1024 bytes and less (the superblock then has a block of its own), one whole block.
            let covered = blockSize > Int(Self.offset) ? blockSize - Int(Self.offset) : blockSize
            guard raw.count >= covered else { throw EROFSError.truncated(structure: "superblock checksum area", offset: Self.offset) }
            let end = covered
            var area = Array(raw[0..<end])
            area.putLE(UInt32(0), at: 4)
            let computed = CRC32C.update(~0, area)
            guard computed == checksum else { throw EROFSError.badChecksum(expected: checksum, computed: computed) }
        }
    }

    /// Names of the incompatible features the image uses, as /sys/fs/erofs/features spells them.
    public var incompatFeatureNames: [String] { Feature.names(of: featureIncompat) }
    public var compatFeatureNames: [String] { CompatFeature.names(of: featureCompat) }
}

/// feature_compat bits.
public struct CompatFeature: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let sbChecksum = CompatFeature(rawValue: 0x1)
    public static let mtime = CompatFeature(rawValue: 0x2)
    public static let xattrFilter = CompatFeature(rawValue: 0x4)
    public static let sharedXattrInMetabox = CompatFeature(rawValue: 0x8)
    public static let plainXattrPrefix = CompatFeature(rawValue: 0x10)

    static let table: [(UInt32, String)] = [(0x1, "sb_chksum"), (0x2, "mtime"), (0x4, "xattr_filter"),
                                             (0x8, "shared_ea_in_metabox"), (0x10, "plain_xattr_pfx")]
    public static func names(of bits: UInt32) -> [String] {
        table.filter { bits & $0.0 != 0 }.map(\.1)
    }
}

/// feature_incompat bits: an image with a bit the kernel does not know must not be mounted.
public struct Feature: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let zeroPadding = Feature(rawValue: 0x1)
    public static let comprCfgs = Feature(rawValue: 0x2)          // also big_pcluster
    public static let chunkedFile = Feature(rawValue: 0x4)
    public static let deviceTable = Feature(rawValue: 0x8)        // also compr_head2
    public static let ztailpacking = Feature(rawValue: 0x10)
    public static let fragments = Feature(rawValue: 0x20)         // also dedupe
    public static let xattrPrefixes = Feature(rawValue: 0x40)
    public static let bits48 = Feature(rawValue: 0x80)
    public static let metabox = Feature(rawValue: 0x100)

    /// Each bit with the /sys/fs/erofs/features names that declare kernel support for it.
    /// `xattr_prefixes` has no sysfs entry; kernels ≥ 6.4 understand it.
    public static let table: [(bit: UInt32, name: String, sysfs: [String])] = [
        (0x1, "zero_padding", ["zero_padding"]),
        (0x2, "compr_cfgs", ["compr_cfgs", "big_pcluster"]),
        (0x4, "chunked_file", ["chunked_file"]),
        (0x8, "device_table", ["device_table", "compr_head2"]),
        (0x10, "ztailpacking", ["ztailpacking"]),
        (0x20, "fragments", ["fragments", "dedupe"]),
        (0x40, "xattr_prefixes", []),
        (0x80, "48bit", ["48bit"]),
        (0x100, "metabox", ["metabox"]),
    ]

    public static func names(of bits: UInt32) -> [String] {
        var out = table.filter { bits & $0.bit != 0 }.map(\.name)
        let known = table.reduce(UInt32(0)) { $0 | $1.bit }
        var unknown = bits & ~known
        while unknown != 0 {
            let b = unknown & (~unknown &+ 1)
            out.append("unknown(0x\(String(b, radix: 16)))")
            unknown &= ~b
        }
        return out
    }
}
