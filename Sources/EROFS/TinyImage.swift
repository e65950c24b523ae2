/// Builds the smallest valid EROFS image: one 4 KiB block holding the superblock and an empty root
/// directory. The probe writes it to prove file-backed mounts without any outside tool.
public enum TinyImage {
    public static func bytes(checksum: Bool = true) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 4096)
        let sb = Int(Superblock.offset)
        let rootNid: UInt16 = 36                 // inode right after the superblock: 1152 / 32
        b.putLE(Superblock.magic, at: sb)
        b.putLE(UInt32(checksum ? 0x3 : 0x2), at: sb + 8)   // sb_chksum + mtime
        b[sb + 12] = 12                           // 4 KiB blocks
        b.putLE(rootNid, at: sb + 14)
        b.putLE(UInt64(1), at: sb + 16)           // one inode
        b.putLE(UInt32(1), at: sb + 36)           // one block
        // Compact inode, FLAT_INLINE (layout 2 << 1), directory 0755, nlink 2.
        let ino = Int(rootNid) * 32
        b.putLE(UInt16(2 << 1), at: ino)
        b.putLE(UInt16(0o040755), at: ino + 4)
        b.putLE(UInt16(2), at: ino + 6)
        b.putLE(UInt32(27), at: ino + 8)          // two dirents (24 bytes) + ".", ".."
        b.putLE(UInt32.max, at: ino + 16)         // no data block: everything is inline
        let d = ino + 32
        for (i, nameoff) in [UInt16(24), 25].enumerated() {
            b.putLE(UInt64(rootNid), at: d + i * 12)
            b.putLE(nameoff, at: d + i * 12 + 8)
            b[d + i * 12 + 10] = 2                // EROFS_FT_DIR
        }
        b[d + 24] = 0x2E; b[d + 25] = 0x2E; b[d + 26] = 0x2E   // "." + ".."
        if checksum {
            var area = Array(b[sb..<4096])
            area.putLE(UInt32(0), at: 4)
            b.putLE(CRC32C.update(~0, area), at: sb + 4)
        }
        return b
    }
}
