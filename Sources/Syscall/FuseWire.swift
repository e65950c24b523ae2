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
