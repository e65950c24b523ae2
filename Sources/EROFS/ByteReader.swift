/// Little-endian field access over a byte array, with bounds checks that throw instead of trapping.
struct LEBytes {
    let bytes: [UInt8]
    let origin: UInt64
    let structure: String

    init(_ bytes: [UInt8], origin: UInt64, structure: String) {
        self.bytes = bytes
        self.origin = origin
        self.structure = structure
    }

    func check(_ off: Int, _ n: Int) throws {
        guard off >= 0, n >= 0, off + n <= bytes.count else {
            throw EROFSError.truncated(structure: structure, offset: origin + UInt64(max(off, 0)))
        }
    }

    func u8(_ off: Int) throws -> UInt8 { try check(off, 1); return bytes[off] }
    func u16(_ off: Int) throws -> UInt16 {
        try check(off, 2)
        return UInt16(bytes[off]) | UInt16(bytes[off + 1]) << 8
    }
    func u32(_ off: Int) throws -> UInt32 {
        try check(off, 4)
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(bytes[off + i]) << (8 * i) }
        return v
    }
    func u64(_ off: Int) throws -> UInt64 {
        try check(off, 8)
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(bytes[off + i]) << (8 * i) }
        return v
    }
    func slice(_ off: Int, _ n: Int) throws -> [UInt8] {
        try check(off, n)
        return Array(bytes[off..<(off + n)])
    }
}

extension Array where Element == UInt8 {
    mutating func putLE<T: FixedWidthInteger>(_ value: T, at off: Int) {
        var v = value.littleEndian
        Swift.withUnsafeBytes(of: &v) { raw in
            for (i, b) in raw.enumerated() { self[off + i] = b }
        }
    }
}
