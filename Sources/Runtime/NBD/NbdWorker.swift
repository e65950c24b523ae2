#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import NBD
import Syscall
import SystemPackage

/// How the kernel's NBD device of a mount is set up (part of its `ServeSpec`).
public struct NBDDeviceSpec: Codable, Sendable, Equatable {
    /// The device's logical block size: the image's block size (512–4096).
    public var blockSize: UInt64
    /// A request unanswered this long makes the kernel drop the connection and queue the request
    /// again for the next one.
    public var timeoutSeconds: UInt64 = 30
    /// How long requests wait for a new connection before they fail with EIO.
    public var deadConnectionSeconds: UInt64 = 30
}

/// The server processes of an `nbd` mount. The supervisor connects the device over generic netlink
/// (NBD_CMD_CONNECT) to one end of a socket pair whose other end a serving child answers. When the
/// child dies while the device is still mounted, the supervisor starts another on a new socket pair
/// and hands the device its end (NBD_CMD_RECONFIGURE): requests waiting for a connection go to the
/// new server, and ones the dead child had read are sent again by the kernel after its timeout.
public enum NbdWorker {
    /// The supervisor; `ready` gets "ready INDEX" once the device is connected, or "error: …".
    public static func supervise(spec bytes: [UInt8], readyFD: Int32) -> Int32 {
        func ready(_ line: String) {
            _ = try? FileDescriptor(rawValue: readyFD).writeAll(Array((line + "\n").utf8))
            Sys.close(readyFD)
        }
        guard let spec = try? JSONDecoder().decode(ServeSpec.self, from: Data(bytes)), let device = spec.device else {
            ready("error: the serve spec names no NBD device")
            return 2
        }
        var index: UInt32?
        var restarts = 0
        while true {
            let started = ContinuousClock.now
            switch startChild(spec: bytes, device: device, index: index) {
            case .failure(let why):
                guard index != nil else { ready("error: \(why)"); return 1 }
                FuseWorker.log("cannot restart the server: \(why)")
            case .success(let (pid, connected)):
                if index == nil { ready("ready \(connected)") }
                index = connected
                let (code, signal) = Sys.wait(pid)
                guard isMounted(connected) else { return finish(spec) }
                FuseWorker.log("server \(pid) ended (\(signal.map { "signal \($0)" } ?? "exit \(code ?? -1)")) "
                               + "while /dev/nbd\(connected) is mounted; reconnecting it")
            }
            if ContinuousClock.now - started > .seconds(60) { restarts = 0 }
            restarts += 1
            guard restarts <= 50, let current = index, isMounted(current) else {
                FuseWorker.log("giving up after \(restarts) restarts; reads of the device fail")
                return 1
            }
            usleep(UInt32(min(restarts, 10)) * 50_000)
        }
    }

    /// Starts a serving child on a new socket pair and, once it has opened its source, connects the
    /// device to the pair's other end (`index` nil) or reconnects device `index` to it.
    static func startChild(spec: [UInt8], device: NBDDeviceSpec, index: UInt32?) -> Result<(Int32, UInt32), Failure> {
        do {
            let (kernelEnd, serverEnd) = try Sys.socketPair()
            defer { Sys.close(kernelEnd) }
            let (pid, status) = try spawnChild(spec: spec, socket: serverEnd)
            Sys.close(serverEnd)
            let line = Sys.readLine(status, timeoutMs: 3_600_000)
            Sys.close(status)
            let fields = line.split(separator: " ")
            guard fields.count == 2, fields[0] == "ready", let size = UInt64(fields[1]) else {
                try? Sys.kill(pid, SIGKILL)
                _ = Sys.wait(pid)
                return .failure(Failure(line.hasPrefix("error: ") ? String(line.dropFirst(7)) : "the server exited before it was ready"))
            }
            do {
                if let index {
                    try NBDNetlink.reconfigure(index: index, socket: kernelEnd, disconnectOnClose: true)
                    return .success((pid, index))
                }
                return .success((pid, try NBDNetlink.connect(socket: kernelEnd, size: size, blockSize: device.blockSize,
                                                             timeoutSeconds: device.timeoutSeconds,
                                                             deadConnectionSeconds: device.deadConnectionSeconds)))
            } catch {
                try? Sys.kill(pid, SIGKILL)
                _ = Sys.wait(pid)
                return .failure(Failure("\(index == nil ? "NBD_CMD_CONNECT" : "NBD_CMD_RECONFIGURE") over netlink: \(error)"))
            }
        } catch {
            return .failure(Failure("cannot start the server: \(error)"))
        }
    }

    static func spawnChild(spec: [UInt8], socket: Int32) throws -> (Int32, Int32) {
        let specFD = try Sys.pipe(holding: spec)
        defer { Sys.close(specFD) }
        let (r, w) = try Sys.pipe()
        defer { Sys.close(w) }
        let args = ["__nbd-serve", "--child", "--socket-fd", String(socket), "--spec-fd", String(specFD),
                    "--ready-fd", String(w)]
        do {
            return (try Sys.spawnChild(Runtime.workerExecutable, args, keep: [socket, specFD, w],
                                       environment: ProcessInfo.processInfo.environment), r)
        } catch {
            Sys.close(r)
            throw error
        }
    }

    /// Whether a filesystem (or anyone else) still holds /dev/nbdN exclusively: an exclusive open
    /// fails with EBUSY then. Once the mount is gone (or the device with it) serving is over.
    static func isMounted(_ index: UInt32) -> Bool {
        do {
            let fd = try Sys.open("/dev/nbd\(index)", O_RDONLY | O_EXCL | O_NONBLOCK)
            Sys.close(fd.rawValue)
            return false
        } catch let e as Errno {
            return e == .resourceBusy
        } catch {
            return false
        }
    }

    /// Serving is over: the figures and the log go with the mount.
    static func finish(_ spec: ServeSpec) -> Int32 {
        FuseWorker.log("the device is no longer mounted; exiting")
        for f in [spec.statsPath, StateStore.sibling(of: spec.statsPath, ".log")] { try? Sys.unlink(f) }
        return 0
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }

    /// A serving child: serves its end of the pair from the source the spec names (no negotiation:
    /// the kernel was told size and flags over netlink) until the connection ends. `readyFD` gets
    /// "ready SIZE" once the source is open, or "error: …".
    public static func serve(spec bytes: [UInt8], socketFD: Int32, readyFD: Int32) -> Int32 {
        let ready = FileDescriptor(rawValue: readyFD)
        let served: ServedSource
        do {
            let spec = try JSONDecoder().decode(ServeSpec.self, from: Data(bytes))
            served = try Runtime().openServedSource(spec.source, remote: spec.remote ?? RemoteOptions())
        } catch {
            FuseWorker.log("cannot serve: \(error)")
            _ = try? ready.writeAll(Array("error: \(error)\n".utf8))
            return 2
        }
        defer { served.close() }
        let export = NBDExport(name: "image", description: served.description, size: served.size,
                               preferredBlock: served.granule)
        let server = NBDServer(exports: [export], read: { try served.read(offset: $0, length: $1) },
                               prefetch: { try served.prefetch(offset: $0, length: $1) }, log: { FuseWorker.log($0) })
        _ = try? ready.writeAll(Array("ready \(served.size)\n".utf8))
        Sys.close(readyFD)
        server.serve(kernelConnection: socketFD)
        FuseWorker.log("the connection ended; exiting")
        return 0
    }
}
