#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import NBD
import Probe
import Syscall
import SystemPackage

/// nbd: kernel EROFS on /dev/nbdN, attached over generic netlink to one end of a socket pair
/// whose other end `__nbd-serve` serves from the lazy reader (or a local image): read-only, the
/// image's block size, a dead-connection timeout; the device is destroyed on disconnect.
struct NbdBackend: MountBackend {
    var kind: Backend { .nbd }

    func attach(_ request: PreparedMount) throws -> Attachment {
        guard request.options.fsOffset == 0 else {
            throw BackendFailure(detail: "fsoffset is not supported with nbd", fallback: false)
        }
        let stats = ServedProcess.statsPath(stateRoot: request.stateRoot, mountpoint: request.mountpoint)
        let spec = ServeSpec(filesystem: .blob, source: request.source, remote: request.remote, statsPath: stats)
        let (mine, theirs) = try Sys.socketPair()
        defer { Sys.close(mine) }
        let (pid, size) = try startServer(spec, socket: theirs)
        let index: UInt32
        do {
            index = try NBDNetlink.connect(socket: mine, size: size, blockSize: UInt64(min(max(request.blockSize, 512), 4096)),
                                           timeoutSeconds: 30, deadConnectionSeconds: 30)
        } catch {
            ServedProcess.nbd.kill(pid)
            throw BackendFailure(detail: "NBD_CMD_CONNECT over netlink: \(error)", fallback: false)
        }
        let device = "/dev/nbd\(index)"
        do {
            try awaitDevice(index)
            try attachEROFS(source: device, at: request.target, options: request.options, passOffset: false)
        } catch {
            try? NBDNetlink.disconnect(index: index)
            throw error
        }
        return Attachment(device: device, workerPID: pid, statsPath: stats)
    }

    /// Starts `__nbd-serve` with the spec and its end of the socket pair; waits for "ready SIZE".
    func startServer(_ spec: ServeSpec, socket: Int32) throws -> (pid: Int32, size: UInt64) {
        defer { Sys.close(socket) }
        let server = ServedProcess.nbd
        let (pid, line) = try server.start(spec, args: ["--socket-fd", String(socket)], keeping: [socket])
        let fields = line.split(separator: " ")
        guard fields.count == 2, fields[0] == "ready", let size = UInt64(fields[1]) else {
            server.kill(pid)
            throw BackendFailure(detail: "the NBD server answered '\(line)'", fallback: false)
        }
        return (pid, size)
    }

    /// The device has its size once the kernel set it up (udev may still be running elsewhere).
    func awaitDevice(_ index: UInt32) throws {
        for _ in 0..<250 {
            if let raw = try? Sys.readFile("/sys/block/nbd\(index)/size"),
               let sectors = UInt64(String(decoding: raw.filter { $0 >= 0x30 && $0 <= 0x39 }, as: UTF8.self)),
               sectors > 0, FileManager.default.fileExists(atPath: "/dev/nbd\(index)") { return }
            usleep(20_000)
        }
        throw BackendFailure(detail: "/dev/nbd\(index) did not appear with its size within 5 s", fallback: false)
    }

    /// Disconnects the device (its server sees the socket close and exits) and waits for the server.
    func release(_ record: MountRecord) {
        if let dev = record.device, dev.hasPrefix("/dev/nbd"), let index = UInt32(dev.dropFirst("/dev/nbd".count)),
           FileManager.default.fileExists(atPath: "/sys/block/nbd\(index)/pid") {
            try? NBDNetlink.disconnect(index: index)
        }
        ServedProcess.nbd.awaitExit(record)
    }
}
