/// statfs(2) f_type values of the filesystems erofs-compat cares about.
package enum FilesystemMagic {
    package static let names: [UInt64: String] = [
        0xEF53: "ext4", 0x5846_5342: "xfs", 0x9123_683E: "btrfs", 0x0102_1994: "tmpfs",
        0x8584_58F6: "ramfs", 0xE0F5_E1E2: "erofs", 0x6573_5546: "fuse", 0x9FA0: "proc",
        0x6265_6572: "sysfs", 0x794C_7630: "overlayfs", 0x2FC1_2FC1: "zfs",
        0x6969: "nfs", 0xFF53_4D42: "cifs", 0x0102_1997: "v9fs", 0x7363_6673: "securityfs",
        0x1373: "devtmpfs", 0xF2F5_2010: "f2fs", 0x4D44: "vfat", 0x6E73_6673: "nsfs",
    ]

    /// A name for a statfs f_type ("0x…" when unknown).
    package static func name(_ type: UInt64) -> String {
        names[type] ?? "0x" + String(type, radix: 16)
    }

    /// tmpfs/ramfs-like filesystems: no pre-content marks, and tmpfs files give ENOTBLK to EROFS.
    package static func isMemoryBacked(_ type: UInt64) -> Bool {
        type == 0x0102_1994 || type == 0x8584_58F6
    }
}
