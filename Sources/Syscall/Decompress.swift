import CHeaders

/// The Debian decompression libraries, as EROFS uses them. Each returns the bytes produced, or nil
/// with a reason when the input is not a valid stream.
package enum Decompress {
    /// LZ4 block, decoding only until `outputSize` bytes are produced (LZ4_decompress_safe_partial).
    package static func lz4(_ input: ArraySlice<UInt8>, outputSize: Int) -> Result<[UInt8], DecompressError> {
        var out = [UInt8](repeating: 0, count: outputSize)
        let n = input.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                src.baseAddress!.withMemoryRebound(to: CChar.self, capacity: src.count) { s in
                    dst.baseAddress!.withMemoryRebound(to: CChar.self, capacity: dst.count) { d in
                        ecx_LZ4_decompress_safe_partial(s, d, Int32(src.count), Int32(outputSize), Int32(outputSize))
                    }
                }
            }
        }
        guard n >= 0 else { return .failure(.init("LZ4 stream is malformed (\(n))")) }
        out.removeSubrange(Int(n)...)
        return .success(out)
    }

    /// MicroLZMA as EROFS writes it (liblzma's lzma_microlzma_decoder).
    package static func microLZMA(_ input: ArraySlice<UInt8>, outputSize: Int, exact: Bool, dictSize: UInt32) -> Result<[UInt8], DecompressError> {
        var out = [UInt8](repeating: 0, count: outputSize)
        var produced = 0
        let rc = input.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                ecx_microlzma_decode(src.baseAddress, src.count, dst.baseAddress, dst.count, dictSize, &produced)
            }
        }
        guard rc == 0 else { return .failure(.init("MicroLZMA stream is malformed (liblzma \(rc))")) }
        out.removeSubrange(produced...)
        return .success(out)
    }

    /// Raw DEFLATE (no zlib header).
    package static func deflate(_ input: ArraySlice<UInt8>, outputSize: Int) -> Result<[UInt8], DecompressError> {
        var out = [UInt8](repeating: 0, count: outputSize)
        let n = input.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in ecx_raw_inflate(src.baseAddress, src.count, dst.baseAddress, dst.count) }
        }
        guard n >= 0 else { return .failure(.init("DEFLATE stream is malformed (zlib \(n))")) }
        out.removeSubrange(n...)
        return .success(out)
    }

    /// A zstd frame; output beyond `outputSize` is discarded (bounded by `limit`).
    package static func zstd(_ input: ArraySlice<UInt8>, outputSize: Int, limit: Int) -> Result<[UInt8], DecompressError> {
        let content = input.withUnsafeBufferPointer { ecx_ZSTD_getFrameContentSize($0.baseAddress, $0.count) }
        var cap = outputSize
        if content != ZSTD_CONTENTSIZE_UNKNOWN, content != ZSTD_CONTENTSIZE_ERROR, content > UInt64(cap) {
            guard content <= UInt64(limit) else { return .failure(.init("zstd frame claims \(content) bytes")) }
            cap = Int(content)
        }
        var out = [UInt8](repeating: 0, count: cap)
        let n = input.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in ecx_ZSTD_decompress(dst.baseAddress, dst.count, src.baseAddress, src.count) }
        }
        guard ecx_ZSTD_isError(n) == 0 else { return .failure(.init("zstd frame is malformed (\(String(cString: ecx_ZSTD_getErrorName(n))))")) }
        out.removeSubrange(min(Int(n), outputSize)...)
        return .success(out)
    }
}

package struct DecompressError: Error, CustomStringConvertible {
    package var description: String
    init(_ d: String) { description = d }
}
