import CHeaders
import Glibc
import SystemPackage

/// File-creation calls used to extract an image.
extension Sys {
    package static func symlink(_ target: String, at path: String) throws { _ = try call { Glibc.symlink(target, path) } }
    package static func link(_ existing: String, _ new: String) throws { _ = try call { Glibc.link(existing, new) } }

    /// mknod(2) for device nodes, FIFOs and sockets.
    package static func mknod(_ path: String, mode: UInt32, device: UInt64) throws {
        _ = try call { Glibc.mknod(path, mode_t(mode), dev_t(device)) }
    }

    package static func lchown(_ path: String, uid: UInt32, gid: UInt32) throws { _ = try call { Glibc.lchown(path, uid, gid) } }
    package static func chmod(_ path: String, _ mode: UInt32) throws { _ = try call { Glibc.chmod(path, mode_t(mode)) } }

    /// Sets atime and mtime without following a final symlink.
    package static func setTimes(_ path: String, seconds: Int64, nanoseconds: Int64) throws {
        var ts = [timespec(tv_sec: Int(seconds), tv_nsec: Int(nanoseconds)), timespec(tv_sec: Int(seconds), tv_nsec: Int(nanoseconds))]
        _ = try call { utimensat(AT_FDCWD, path, &ts, AT_SYMLINK_NOFOLLOW) }
    }

    package static func lsetxattr(_ path: String, _ name: String, _ value: [UInt8]) throws {
        _ = try call { value.withUnsafeBytes { CHeaders.lsetxattr(path, name, $0.baseAddress, $0.count, 0) } }
    }

    /// Every xattr of a path (not following symlinks), for comparisons.
    package static func listXattrs(_ path: String) throws -> [String: [UInt8]] {
        let n = try call { CHeaders.llistxattr(path, nil, 0) }
        guard n > 0 else { return [:] }
        var names = [CChar](repeating: 0, count: n)
        let got = try call { CHeaders.llistxattr(path, &names, names.count) }
        var out: [String: [UInt8]] = [:]
        for raw in names[0..<got].split(separator: 0) {
            let name = String(decoding: raw.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let vlen = try call { CHeaders.lgetxattr(path, name, nil, 0) }
            var v = [UInt8](repeating: 0, count: vlen)
            let vn = try call { v.withUnsafeMutableBytes { CHeaders.lgetxattr(path, name, $0.baseAddress, $0.count) } }
            out[name] = Array(v[0..<vn])
        }
        return out
    }

    package static func makedev(_ major: UInt32, _ minor: UInt32) -> UInt64 { UInt64(gnu_dev_makedev(major, minor)) }
}
