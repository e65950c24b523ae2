#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import CHeaders
import Glibc
import SystemPackage

/// Generic netlink: just enough to ask the control family whether a family is registered.
package enum GenericNetlink {
    /// CTRL_CMD_GETFAMILY for `name`: the family id, or the errno the kernel answered (ENOENT = absent).
    /// On kernels with modules, the kernel may try to autoload "net-pf-16-proto-16-family-NAME".
    package static func familyID(_ name: String) throws -> Result<UInt16, Errno> {
        let sock = try Sys.socket(AF_NETLINK, Int32(SOCK_RAW.rawValue), ecx_netlink_generic)
        defer { Sys.close(sock.rawValue) }
        var attr: [UInt8] = []
        let nameBytes = Array(name.utf8) + [0]
        let attrLen = 4 + nameBytes.count
        attr += le16(UInt16(attrLen)) + le16(ecx_ctrl_attr_family_name) + nameBytes
        while attr.count % 4 != 0 { attr.append(0) }
        let genl: [UInt8] = [ecx_ctrl_cmd_getfamily, 1, 0, 0]
        let total = 16 + genl.count + attr.count
        var msg = le32(UInt32(total)) + le16(ecx_genl_id_ctrl) + le16(ecx_nlm_f_request) + le32(1) + le32(0)
        msg += genl + attr
        _ = try Sys.send(sock.rawValue, msg)
        guard try Sys.poll(sock.rawValue, timeoutMs: 2000) else { return .failure(.timedOut) }
        let reply = try Sys.recv(sock.rawValue, maxBytes: 8192)
        guard reply.count >= 20 else { return .failure(.ioError) }
        let type = UInt16(reply[4]) | UInt16(reply[5]) << 8
        if type == ecx_nlmsg_error {
            let code = Int32(bitPattern: UInt32(reply[16]) | UInt32(reply[17]) << 8 | UInt32(reply[18]) << 16 | UInt32(reply[19]) << 24)
            return .failure(Errno(rawValue: -code))
        }
        // Walk the attributes after nlmsghdr (16) + genlmsghdr (4).
        var off = 20
        while off + 4 <= reply.count {
            let len = Int(UInt16(reply[off]) | UInt16(reply[off + 1]) << 8)
            let atype = UInt16(reply[off + 2]) | UInt16(reply[off + 3]) << 8
            if len < 4 { break }
            if atype & 0x3fff == ecx_ctrl_attr_family_id, off + 6 <= reply.count {
                return .success(UInt16(reply[off + 4]) | UInt16(reply[off + 5]) << 8)
            }
            off += (len + 3) & ~3
        }
        return .failure(.noData)
    }

    private static func le16(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xff), UInt8(v >> 8)] }
    private static func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8((v >> (8 * $0)) & 0xff) } }

    /// One attribute: length, type, payload padded to 4 bytes.
    package static func attribute(_ type: UInt16, _ payload: [UInt8]) -> [UInt8] {
        var a = le16(UInt16(4 + payload.count)) + le16(type) + payload
        while a.count % 4 != 0 { a.append(0) }
        return a
    }

    package static func u32(_ type: UInt16, _ v: UInt32) -> [UInt8] { attribute(type, le32(v)) }
    package static func u64(_ type: UInt16, _ v: UInt64) -> [UInt8] { attribute(type, le32(UInt32(v & 0xffff_ffff)) + le32(UInt32(v >> 32))) }

    /// Sends one request of `family` (with an ACK asked for) and returns the first reply's attributes
    /// as (type, payload) pairs: empty for a bare ACK; throws the errno of an error reply.
    package static func request(family: UInt16, command: UInt8, attributes: [UInt8]) throws -> [(UInt16, [UInt8])] {
        let sock = try Sys.socket(AF_NETLINK, Int32(SOCK_RAW.rawValue), ecx_netlink_generic)
        defer { Sys.close(sock.rawValue) }
        let genl: [UInt8] = [command, 1, 0, 0]
        let total = 16 + genl.count + attributes.count
        let msg = le32(UInt32(total)) + le16(family) + le16(ecx_nlm_f_request | ecx_nlm_f_ack) + le32(1) + le32(0)
            + genl + attributes
        _ = try Sys.send(sock.rawValue, msg)
        guard try Sys.poll(sock.rawValue, timeoutMs: 10_000) else { throw Errno.timedOut }
        let reply = try Sys.recv(sock.rawValue, maxBytes: 16384)
        guard reply.count >= 20 else { throw Errno.ioError }
        let type = UInt16(reply[4]) | UInt16(reply[5]) << 8
        if type == ecx_nlmsg_error {
            let code = Int32(bitPattern: UInt32(reply[16]) | UInt32(reply[17]) << 8 | UInt32(reply[18]) << 16 | UInt32(reply[19]) << 24)
            if code != 0 { throw Errno(rawValue: -code) }
            return []
        }
        var out: [(UInt16, [UInt8])] = []
        var off = 20
        while off + 4 <= reply.count {
            let len = Int(UInt16(reply[off]) | UInt16(reply[off + 1]) << 8)
            guard len >= 4, off + len <= reply.count else { break }
            out.append((UInt16(reply[off + 2]) | UInt16(reply[off + 3]) << 8 & 0x3fff, Array(reply[(off + 4)..<(off + len)])))
            off += (len + 3) & ~3
        }
        return out
    }
}

/// The kernel's NBD driver over generic netlink (Linux 4.12+).
package enum NBDNetlink {
    /// Connects a free /dev/nbdN, read-only, to `socket` (one end of a connected pair; the kernel
    /// takes its own reference): returns N. The device is destroyed again on disconnect.
    package static func connect(socket: Int32, size: UInt64, blockSize: UInt64, timeoutSeconds: UInt64,
                                deadConnectionSeconds: UInt64) throws -> UInt32 {
        let family = try familyID()
        let item = GenericNetlink.attribute(ecx_nbd_sock_item, GenericNetlink.u32(ecx_nbd_sock_fd, UInt32(socket)))
        let attrs = GenericNetlink.u64(ecx_nbd_attr_size_bytes, size) + GenericNetlink.u64(ecx_nbd_attr_block_size_bytes, blockSize)
            + GenericNetlink.u64(ecx_nbd_attr_server_flags, ecx_nbd_flag_has_flags | ecx_nbd_flag_read_only)
            + GenericNetlink.u64(ecx_nbd_attr_client_flags, ecx_nbd_cflag_destroy_on_disconnect)
            + GenericNetlink.u64(ecx_nbd_attr_timeout, timeoutSeconds)
            + GenericNetlink.u64(ecx_nbd_attr_dead_conn_timeout, deadConnectionSeconds)
            + GenericNetlink.attribute(ecx_nbd_attr_sockets, item)
        let reply = try GenericNetlink.request(family: family, command: ecx_nbd_cmd_connect, attributes: attrs)
        guard let index = reply.first(where: { $0.0 == ecx_nbd_attr_index }), index.1.count >= 4 else { throw Errno.noData }
        return UInt32(index.1[0]) | UInt32(index.1[1]) << 8 | UInt32(index.1[2]) << 16 | UInt32(index.1[3]) << 24
    }

    /// Disconnects /dev/nbdN (its server sees the socket close).
    package static func disconnect(index: UInt32) throws {
        _ = try GenericNetlink.request(family: try familyID(), command: ecx_nbd_cmd_disconnect,
                                       attributes: GenericNetlink.u32(ecx_nbd_attr_index, index))
    }

    /// NBD_CMD_RECONFIGURE of /dev/nbdN: `socket` replaces its dead connection (requests waiting
    /// for one are sent on it); `disconnectOnClose` makes the kernel disconnect the device when its
    /// last opener (a mounted filesystem) closes it. The device stays destroyed on disconnect.
    package static func reconfigure(index: UInt32, socket: Int32? = nil, disconnectOnClose: Bool) throws {
        var attrs = GenericNetlink.u32(ecx_nbd_attr_index, index)
            + GenericNetlink.u64(ecx_nbd_attr_client_flags, ecx_nbd_cflag_destroy_on_disconnect
                                 | (disconnectOnClose ? ecx_nbd_cflag_disconnect_on_close : 0))
        if let socket {
            let item = GenericNetlink.attribute(ecx_nbd_sock_item, GenericNetlink.u32(ecx_nbd_sock_fd, UInt32(socket)))
            attrs += GenericNetlink.attribute(ecx_nbd_attr_sockets, item)
        }
        _ = try GenericNetlink.request(family: try familyID(), command: ecx_nbd_cmd_reconfigure, attributes: attrs)
    }

    /// The "nbd" family's id. ENOENT where it is not registered in this network namespace (the
    /// family is not namespace-aware on older kernels such as 6.1: in a container's own netns it is absent
    /// there even with the driver).
    static func familyID() throws -> UInt16 {
        switch try GenericNetlink.familyID("nbd") {
        case .success(let id): return id
        case .failure(let e): throw e
        }
    }
}

/// The kernel's NBD driver through its ioctls on /dev/nbdN: where generic netlink cannot reach it
/// (on older kernels such as 6.1 the "nbd" family is not namespace-aware, so a process in its own
/// network namespace sees none).
/// No reconnection: the device lives as long as its one socket and the NBD_DO_IT call serving it.
package enum NBDIoctl {
    /// Claims the first free /dev/nbdN and configures it read-only on `socket`; returns its
    /// descriptor and N. A device another process is setting up answers EBUSY: the next is tried.
    package static func claim(socket: Int32, size: UInt64, blockSize: UInt64, timeoutSeconds: UInt64) throws
        -> (fd: FileDescriptor, index: UInt32) {
        let indices = ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? [])
            .compactMap { $0.hasPrefix("nbd") ? UInt32($0.dropFirst(3)) : nil }.sorted()
        var last: Error = Errno.noSuchFileOrDirectory
        for n in indices where !FileManager.default.fileExists(atPath: "/sys/block/nbd\(n)/pid") {
            do {
                let fd = try Sys.open("/dev/nbd\(n)", O_RDWR)
                do {
                    try configure(fd.rawValue, socket: socket, size: size, blockSize: blockSize,
                                  timeout: timeoutSeconds)
                    return (fd, n)
                } catch {
                    Sys.close(fd.rawValue)
                    throw error
                }
            } catch let e as Errno where e == .resourceBusy || e == .noSuchFileOrDirectory {
                last = e
            }
        }
        throw last
    }

    static func configure(_ fd: Int32, socket: Int32, size: UInt64, blockSize: UInt64, timeout: UInt64) throws {
        _ = try Sys.call { ecx_ioctl_val(fd, ecx_nbd_set_blksize, UInt(blockSize)) }
        _ = try Sys.call { ecx_ioctl_val(fd, ecx_nbd_set_size, UInt(size)) }
        _ = try Sys.call { ecx_ioctl_val(fd, ecx_nbd_set_flags, UInt(ecx_nbd_flag_has_flags | ecx_nbd_flag_read_only)) }
        _ = try Sys.call { ecx_ioctl_val(fd, ecx_nbd_set_timeout, UInt(timeout)) }
        _ = try Sys.call { ecx_ioctl_val(fd, ecx_nbd_set_sock, UInt(socket)) }
    }

    /// NBD_DO_IT: serves the device until it is disconnected or its socket dies, then clears it.
    package static func run(_ fd: Int32) -> Errno? {
        let rc = ecx_ioctl_val(fd, ecx_nbd_do_it, 0)
        let e = rc < 0 ? Errno(rawValue: errno) : nil
        _ = ecx_ioctl_val(fd, ecx_nbd_clear_sock, 0)
        return e
    }

    /// NBD_DISCONNECT of /dev/nbdN, opened for the call.
    package static func disconnect(index: UInt32) throws {
        let fd = try Sys.open("/dev/nbd\(index)", O_RDWR)
        defer { Sys.close(fd.rawValue) }
        try disconnect(fd: fd.rawValue)
    }

    package static func disconnect(fd: Int32) throws {
        _ = try Sys.call { ecx_ioctl_val(fd, ecx_nbd_disconnect, 0) }
    }
}
