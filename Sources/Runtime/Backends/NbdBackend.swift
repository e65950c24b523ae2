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

/// nbd: kernel EROFS on /dev/nbdN, whose connection `__nbd-serve` made over generic netlink and
/// keeps served (a dead server is replaced and the device reconnected to its successor): read-only,
/// the image's block size, the kernel's request and dead-connection timeouts; once mounted the device
/// disconnects when the filesystem lets go of it (also after a lazy umount) and is then destroyed.
struct NbdBackend: MountBackend {
    var kind: Backend { .nbd }

    func attach(_ request: PreparedMount) throws -> Attachment {
        guard request.options.fsOffset == 0 else {
            throw BackendFailure(detail: "fsoffset is not supported with nbd", fallback: false)
        }
        let stats = ServedProcess.statsPath(stateRoot: request.stateRoot, mountpoint: request.mountpoint)
        var spec = request.serveSpec(.nbd, .blob, statsPath: stats)
        spec.device = NBDDeviceSpec(blockSize: UInt64(min(max(request.blockSize, 512), 4096)))
        let server = ServedProcess.nbd
        let (pid, index): (Int32, UInt32)
        // In the daemon, served by it; elsewhere (or with only the ioctl interface) by a supervisor.
        if let hosted = try request.host.flatMap({ try $0.hostNbd(spec) }) {
            (pid, index) = (getpid(), hosted)
        } else {
            (pid, index) = try startSupervisor(spec)
        }
        let device = "/dev/nbd\(index)"
        do {
            try awaitDevice(index)
            try attachEROFS(source: device, at: request.target, options: request.options, passOffset: false)
        } catch {
            NbdWorker.disconnect(index)
            if let host = request.host, pid == getpid() { host.abandon(request.mountpoint) } else {
                server.awaitExit(pid: pid, statsPath: stats)
            }
            throw error
        }
        do {
            try NBDNetlink.reconfigure(index: index, disconnectOnClose: true)
        } catch let e as Errno where e == .noSuchFileOrDirectory {
            // Set up through ioctls (no "nbd" family here): its server disconnects it once unmounted.
        } catch {
            // Still served; only a lazy umount then leaves the device connected until `umount` again.
            FuseWorker.log("NBD_CMD_RECONFIGURE of \(device) (disconnect on close): \(error)")
        }
        return Attachment(device: device, workerPID: pid, statsPath: stats, servedByDaemon: pid == getpid())
    }

    /// `__nbd-serve`, which connects a device and answers "ready INDEX".
    func startSupervisor(_ spec: ServeSpec) throws -> (Int32, UInt32) {
        let server = ServedProcess.nbd
        let (pid, line) = try server.start(spec, args: [], keeping: [])
        let fields = line.split(separator: " ")
        guard fields.count == 2, fields[0] == "ready", let index = UInt32(fields[1]) else {
            server.kill(pid)
            throw BackendFailure(detail: "the NBD server answered '\(line)'", fallback: false)
        }
        return (pid, index)
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

    /// Disconnects the device (its server sees the socket close) and waits for the server. After a
    /// lazy umount the device stays until the filesystem lets go of it, then disconnects by itself.
    func release(_ record: MountRecord) { release(record, lazy: false) }

    func release(_ record: MountRecord, lazy: Bool) {
        guard !lazy else { return }
        if let dev = record.device, dev.hasPrefix("/dev/nbd"), let index = UInt32(dev.dropFirst("/dev/nbd".count)),
           FileManager.default.fileExists(atPath: "/sys/block/nbd\(index)/pid") {
            NbdWorker.disconnect(index)
        }
        ServedProcess.nbd.awaitExit(record)
    }
}
