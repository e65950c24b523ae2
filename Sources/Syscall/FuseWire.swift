import CHeaders
import Glibc

/// FUSE wire-protocol constants the probe reads from the kernel's INIT request.
package enum FuseWire {
    package static let initOpcode = ecx_fuse_init_opcode
    package static let initExt = ecx_fuse_init_ext
    package static let passthrough = ecx_fuse_passthrough
    package static let overIoUring = ecx_fuse_over_io_uring
}

extension Sys {
    package static func major(_ dev: dev_t) -> UInt32 { ecx_major(dev) }
    package static func minor(_ dev: dev_t) -> UInt32 { ecx_minor(dev) }
}

extension Sys {
    /// FUSE_DEV_IOC_BACKING_OPEN on a /dev/fuse descriptor: registers `file` as a passthrough backing
    /// file of that connection; returns the backing id an OPEN reply names. EPERM without CAP_SYS_ADMIN,
    /// EOPNOTSUPP (or ENOTTY) where the kernel has no passthrough or it was not negotiated in INIT.
    package static func fuseBackingOpen(device: Int32, file: Int32) throws -> Int32 {
        var map = ecx_fuse_backing_map()
        map.fd = file
        return try ioctl(device, ecx_fuse_dev_ioc_backing_open, &map)
    }
}
