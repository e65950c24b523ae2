import CHeaders
import Glibc
import SystemPackage

/// Thin wrappers over the Debian C libraries that CHeaders brings in.
package enum Libraries {
    /// libkmod's view of one module.
    package struct KmodAnswer: Sendable, Equatable {
        /// kmod_load_resources result (0, or a negative errno such as -ENOENT without /lib/modules).
        package var loadResources: Int32
        /// "builtin", "live", "coming", "going", or nil when libkmod reported an error.
        package var initState: String?
        package var initStateError: Int32?
        /// Path of the .ko when the module is loadable.
        package var path: String?
        package var libraryVersion: String

        package init(loadResources: Int32, initState: String?, initStateError: Int32?, path: String?, libraryVersion: String) {
            self.loadResources = loadResources
            self.initState = initState
            self.initStateError = initStateError
            self.path = path
            self.libraryVersion = libraryVersion
        }
    }

    package static func kmod(module name: String) -> KmodAnswer? {
        guard let ctx = ecx_kmod_new(nil, nil) else { return nil }
        defer { ecx_kmod_unref(ctx) }
        let load = ecx_kmod_load_resources(ctx)
        var mod: OpaquePointer?
        let version = "libkmod"
        guard ecx_kmod_module_new_from_name(ctx, name, &mod) == 0, let mod else {
            return KmodAnswer(loadResources: load, initState: nil, initStateError: -ENOENT, path: nil, libraryVersion: version)
        }
        defer { ecx_kmod_module_unref(mod) }
        let st = ecx_kmod_module_get_initstate(mod)
        var state: String?
        switch st {
        case ecx_kmod_builtin: state = "builtin"
        case ecx_kmod_live: state = "live"
        case ecx_kmod_coming: state = "coming"
        case ecx_kmod_going: state = "going"
        default: state = nil
        }
        let path = ecx_kmod_module_get_path(mod).map { String(cString: $0) }
        return KmodAnswer(loadResources: load, initState: state, initStateError: st < 0 ? st : nil, path: path, libraryVersion: version)
    }

    /// libblkid's superblock probe of an open file from `offset` to its end: the values named in `keys`.
    /// `onlyTypes` restricts the probe to those filesystem types (one confirmation instead of trying
    /// every known signature).
    package static func blkid(fd: Int32, offset: UInt64 = 0, onlyTypes: [String] = [],
                              keys: [String] = ["TYPE", "UUID", "LABEL", "BLOCK_SIZE"]) -> (result: Int32, values: [String: String]) {
        guard let pr = ecx_blkid_new_probe() else { return (-1, [:]) }
        defer { ecx_blkid_free_probe(pr) }
        // Size 0: libblkid takes the rest of the file after `offset` (and fails when there is none).
        guard ecx_blkid_probe_set_device(pr, fd, blkid_loff_t(offset), 0) == 0 else { return (-1, [:]) }
        ecx_blkid_probe_enable_superblocks(pr, 1)
        ecx_blkid_probe_set_superblocks_flags(pr, ecx_blkid_sublks_flags)
        if !onlyTypes.isEmpty {
            var cstrs = onlyTypes.map { strdup($0) } + [nil]
            defer { cstrs.forEach { free($0) } }
            guard ecx_blkid_probe_filter_superblocks_type(pr, ecx_blkid_fltr_onlyin, &cstrs) == 0 else { return (-1, [:]) }
        }
        let rc = ecx_blkid_do_safeprobe(pr)
        var values: [String: String] = [:]
        if rc == 0 {
            for key in keys {
                var data: UnsafePointer<CChar>?
                var len: Int = 0
                if ecx_blkid_probe_lookup_value(pr, key, &data, &len) == 0, let data { values[key] = String(cString: data) }
            }
        }
        return (rc, values)
    }

    /// libblkid's own version string.
    package static let blkidVersion: String = {
        var ver: UnsafePointer<CChar>?
        var date: UnsafePointer<CChar>?
        _ = ecx_blkid_get_library_version(&ver, &date)
        return ver.map { String(cString: $0) } ?? "?"
    }()

    /// The libfuse3 the binary runs against: fuse_version() (e.g. 314) and fuse_pkgversion().
    package static var libfuse: (api: Int32, package: String) {
        (ecx_libfuse_version(), String(cString: ecx_libfuse_pkgversion()))
    }

    package static var curlVersion: String { String(cString: ecx_curl_version_string()) }

    /// gunzip (for /proc/config.gz); nil when the data is not valid gzip.
    package static func gunzip(_ data: [UInt8]) -> [UInt8]? {
        var s = z_stream()
        guard ecx_inflateInit2_(&s, 15 + 32, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
        defer { ecx_inflateEnd(&s) }
        var out = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        var input = data
        let ok: Bool = input.withUnsafeMutableBufferPointer { inBuf in
            s.next_in = inBuf.baseAddress
            s.avail_in = uInt(inBuf.count)
            while true {
                let r: Int32 = chunk.withUnsafeMutableBufferPointer { cb in
                    s.next_out = cb.baseAddress
                    s.avail_out = uInt(cb.count)
                    return ecx_inflate(&s, Z_NO_FLUSH)
                }
                out.append(contentsOf: chunk[0..<(chunk.count - Int(s.avail_out))])
                if r == Z_STREAM_END { return true }
                if r != Z_OK { return false }
            }
        }
        return ok ? out : nil
    }
}
