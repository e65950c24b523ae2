import CHeaders
import Glibc
import SystemPackage

/// Loop block devices: LOOP_CTL_GET_FREE and LOOP_CONFIGURE (Linux 5.8).
package enum Loop {
    package static let controlPath = "/dev/loop-control"

    /// Asks /dev/loop-control for a free device number (may create the device).
    package static func getFree() throws -> Int32 {
        let ctl = try Sys.open(controlPath, O_RDWR)
        defer { Sys.close(ctl.rawValue) }
        return try Sys.ioctl(ctl.rawValue, ecx_loop_ctl_get_free, value: 0)
    }

    package struct Flags: OptionSet, Sendable {
        package let rawValue: UInt32
        package init(rawValue: UInt32) { self.rawValue = rawValue }
        package static let readOnly = Flags(rawValue: ecx_lo_flags_read_only)
        package static let autoClear = Flags(rawValue: ecx_lo_flags_autoclear)
        package static let directIO = Flags(rawValue: ecx_lo_flags_direct_io)
    }

    /// LOOP_CONFIGURE: binds `backing` to the open loop device in one call.
    package static func configure(device: Int32, backing: Int32, flags: Flags, blockSize: UInt32 = 0, offset: UInt64 = 0) throws {
        var cfg = ecx_loop_config()
        cfg.fd = UInt32(bitPattern: backing)
        cfg.block_size = blockSize
        cfg.info.lo_flags = flags.rawValue
        cfg.info.lo_offset = offset
        _ = try Sys.ioctl(device, ecx_loop_configure, &cfg)
    }

    /// The backing file of /dev/loopN from sysfs (nil when unbound).
    package static func backingFile(_ n: Int32) -> String? {
        guard let fd = try? Sys.open("/sys/block/loop\(n)/loop/backing_file", O_RDONLY) else { return nil }
        defer { Sys.close(fd.rawValue) }
        guard let bytes = try? Sys.preadFully(fd.rawValue, count: 4096, at: 0) else { return nil }
        let s = String(decoding: bytes, as: UTF8.self)
        return s.hasSuffix("\n") ? String(s.dropLast()) : s
    }

    package static func clear(device: Int32) throws {
        _ = try Sys.ioctl(device, ecx_loop_clr_fd, value: 0)
    }
}
