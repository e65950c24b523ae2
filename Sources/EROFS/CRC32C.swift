/// CRC-32C (Castagnoli), as the EROFS superblock checksum uses it. Slicing-by-8 over raw bytes.
public enum CRC32C {
    private static let tables: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 8 * 256)
        for i in 0..<256 {
            var c = UInt32(i)
            for _ in 0..<8 { c = (c & 1) != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            t[i] = c
        }
        for i in 0..<256 {
            for k in 1..<8 { t[k * 256 + i] = (t[(k - 1) * 256 + i] >> 8) ^ t[Int(t[(k - 1) * 256 + i] & 0xff)] }
        }
        return t
    }()

    /// Updates `crc` with `bytes` (reflected, no pre/post inversion: pass the seed you need).
    public static func update(_ crc: UInt32, _ bytes: some Sequence<UInt8>) -> UInt32 {
        if let r = bytes.withContiguousStorageIfAvailable({ update(crc, UnsafeRawBufferPointer($0)) }) { return r }
        return update(crc, Array(bytes))
    }

    /// Updates `crc` with the bytes of `buf`.
    public static func update(_ crc: UInt32, _ buf: UnsafeRawBufferPointer) -> UInt32 {
        tables.withUnsafeBufferPointer { t in
            var c = crc
            var i = 0
            let n = buf.count
            while i + 8 <= n {
                let lo = c ^ (UInt32(buf[i]) | UInt32(buf[i + 1]) << 8 | UInt32(buf[i + 2]) << 16 | UInt32(buf[i + 3]) << 24)
                c = t[7 * 256 + Int(lo & 0xff)] ^ t[6 * 256 + Int((lo >> 8) & 0xff)]
                    ^ t[5 * 256 + Int((lo >> 16) & 0xff)] ^ t[4 * 256 + Int(lo >> 24)]
                    ^ t[3 * 256 + Int(buf[i + 4])] ^ t[2 * 256 + Int(buf[i + 5])]
                    ^ t[1 * 256 + Int(buf[i + 6])] ^ t[Int(buf[i + 7])]
                i += 8
            }
            while i < n {
                c = t[Int((c ^ UInt32(buf[i])) & 0xff)] ^ (c >> 8)
                i += 1
            }
            return c
        }
    }
}
