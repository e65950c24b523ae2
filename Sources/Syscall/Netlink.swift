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
}
