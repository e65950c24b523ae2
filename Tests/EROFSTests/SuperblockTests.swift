import Testing
@testable import EROFS

@Suite struct SuperblockTests {
    @Test func tinyImageParsesWithChecksum() throws {
        let img = TinyImage.bytes()
        let sb = try Superblock(parsing: Array(img[1024...]))
        #expect(sb.blockSize == 4096)
        #expect(sb.rootNid == 36)
        #expect(sb.inodeCount == 1)
        #expect(sb.compatFeatureNames == ["sb_chksum", "mtime"])
        #expect(sb.incompatFeatureNames.isEmpty)
    }

    @Test func checksumMismatchIsReported() throws {
        var img = TinyImage.bytes()
        img[1024 + 200] ^= 0xFF
        #expect(throws: EROFSError.self) { try Superblock(parsing: Array(img[1024...])) }
        // Without the checksum feature the same change is accepted.
        var plain = TinyImage.bytes(checksum: false)
        plain[1024 + 200] ^= 0xFF
        _ = try Superblock(parsing: Array(plain[1024...]))
    }

    @Test func wrongMagicAndBlockSize() {
        var img = TinyImage.bytes(checksum: false)
        img[1024] = 0
        #expect(throws: EROFSError.notEROFS(magic: 0xE0F5_E100)) { try Superblock(parsing: Array(img[1024...])) }
        var big = TinyImage.bytes(checksum: false)
        big[1024 + 12] = 20
        #expect(throws: EROFSError.unsupportedBlockSize(bits: 20)) { try Superblock(parsing: Array(big[1024...])) }
        #expect(throws: EROFSError.self) { try Superblock(parsing: [0xE2, 0xE1, 0xF5, 0xE0]) }
    }

    @Test func crc32cKnownVector() {
        // RFC 3720 test vector: 32 bytes of zeros → 0x8A9136AA (with the standard ~0 pre/post inversion).
        #expect(~CRC32C.update(~0, [UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(~CRC32C.update(~0, Array("123456789".utf8)) == 0xE306_9283)
    }

    @Test func featureNames() {
        #expect(Feature.names(of: 0x1 | 0x10 | 0x8000) == ["zero_padding", "ztailpacking", "unknown(0x8000)"])
    }
}
