import CHeaders
import Glibc
import SystemPackage

/// The new mount API (fsopen/fsconfig/fsmount/move_mount, Linux 5.2) and mount(2)/umount2(2).
package enum MountAPI {
    /// A filesystem context; closing it without `mount` leaves nothing anywhere.
    package final class Context {
        package let fd: FileDescriptor
        init(fd: FileDescriptor) { self.fd = fd }
        deinit { Sys.close(fd.rawValue) }
    }

    package static func fsopen(_ fsType: String) throws -> Context {
        Context(fd: FileDescriptor(rawValue: try Sys.call { ecx_fsopen(fsType, ecx_fsopen_cloexec) }))
    }

    package static func setString(_ ctx: Context, _ key: String, _ value: String) throws {
        _ = try Sys.call { ecx_fsconfig(ctx.fd.rawValue, ecx_fsconfig_set_string, key, value, 0) }
    }

    package static func setFlag(_ ctx: Context, _ key: String) throws {
        _ = try Sys.call { ecx_fsconfig(ctx.fd.rawValue, ecx_fsconfig_set_flag, key, nil, 0) }
    }

    /// FSCONFIG_CMD_CREATE: builds the superblock (reads and checks the image) without attaching it.
    package static func create(_ ctx: Context) throws {
        _ = try Sys.call { ecx_fsconfig(ctx.fd.rawValue, ecx_fsconfig_cmd_create, nil, nil, 0) }
    }

    /// Messages the kernel left in the context's log ("e erofs: …"), for error reports.
    package static func log(_ ctx: Context) -> [String] {
        var out: [String] = []
        var buf = [UInt8](repeating: 0, count: 1024)
        while out.count < 16 {
            let n = buf.withUnsafeMutableBytes { b in Glibc.read(ctx.fd.rawValue, b.baseAddress, b.count) }
            if n <= 0 { break }
            out.append(String(decoding: buf[0..<n], as: UTF8.self))
        }
        return out
    }

    /// Mount attribute flags for fsmount.
    package struct Attributes: OptionSet, Sendable {
        package let rawValue: UInt32
        package init(rawValue: UInt32) { self.rawValue = rawValue }
        package static let readOnly = Attributes(rawValue: ecx_mount_attr_rdonly)
        package static let noSuid = Attributes(rawValue: ecx_mount_attr_nosuid)
        package static let noDev = Attributes(rawValue: ecx_mount_attr_nodev)
        package static let noExec = Attributes(rawValue: ecx_mount_attr_noexec)
        package static let noAtime = Attributes(rawValue: ecx_mount_attr_noatime)

        /// The equivalent mount(2) flags.
        package var msFlags: UInt {
            var f: UInt = 0
            if contains(.readOnly) { f |= ecx_ms_rdonly }
            if contains(.noSuid) { f |= ecx_ms_nosuid }
            if contains(.noDev) { f |= ecx_ms_nodev }
            if contains(.noExec) { f |= ecx_ms_noexec }
            if contains(.noAtime) { f |= ecx_ms_noatime }
            return f
        }
    }

    /// fsmount + move_mount onto the directory `target` names (an O_PATH descriptor opened when the
    /// mountpoint was checked: the mount lands on that directory even if its path has changed since).
    package static func attach(_ ctx: Context, attributes: Attributes, at target: FileDescriptor) throws {
        let mfd = try Sys.call { ecx_fsmount(ctx.fd.rawValue, ecx_fsmount_cloexec, attributes.rawValue) }
        defer { Sys.close(mfd) }
        _ = try Sys.call {
            ecx_move_mount(mfd, "", target.rawValue, "", ecx_move_mount_f_empty_path | ecx_move_mount_t_empty_path)
        }
    }

    /// fsmount alone: a detached mount, attached later with `move(_:to:)` (a FUSE mount whose server
    /// must answer first); closing it unattached leaves nothing behind.
    package static func fsmount(_ ctx: Context, attributes: Attributes) throws -> FileDescriptor {
        FileDescriptor(rawValue: try Sys.call { ecx_fsmount(ctx.fd.rawValue, ecx_fsmount_cloexec, attributes.rawValue) })
    }

    /// move_mount of a detached mount onto the directory `target` names.
    package static func move(_ mount: FileDescriptor, to target: FileDescriptor) throws {
        _ = try Sys.call {
            ecx_move_mount(mount.rawValue, "", target.rawValue, "", ecx_move_mount_f_empty_path | ecx_move_mount_t_empty_path)
        }
    }

    /// fsmount + move_mount onto a path resolved now (tests, and the bench's raw baseline; the
    /// runtime attaches to the descriptor it checked).
    package static func attach(_ ctx: Context, attributes: Attributes, at target: String) throws {
        let mfd = try Sys.call { ecx_fsmount(ctx.fd.rawValue, ecx_fsmount_cloexec, attributes.rawValue) }
        defer { Sys.close(mfd) }
        _ = try Sys.call { ecx_move_mount(mfd, "", AT_FDCWD, target, ecx_move_mount_f_empty_path) }
    }

    /// mount(2), for kernels without the new API.
    package static func mount(source: String, target: String, type: String, flags: UInt, data: String?) throws {
        _ = try Sys.call {
            if let data { return Glibc.mount(source, target, type, flags, data) }
            return Glibc.mount(source, target, type, flags, nil)
        }
    }

    /// umount2; a symlink as the last component is not followed.
    package static func umount(_ target: String, detach: Bool = false) throws {
        _ = try Sys.call { Glibc.umount2(target, (detach ? ecx_mnt_detach : 0) | ecx_umount_nofollow) }
    }
}
