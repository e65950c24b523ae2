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
    /// The device, once connected (a hosted mount's spec records it for a successor).
    public var index: UInt32?
}

/// The server processes of an `nbd` mount. The supervisor connects the device over generic netlink
/// (NBD_CMD_CONNECT) to one end of a socket pair whose other end a serving child answers. When the
/// child dies while the device is still mounted, the supervisor starts another on a new socket pair
/// and hands the device its end (NBD_CMD_RECONFIGURE): requests waiting for a connection go to the
/// new server, and ones the dead child had read are sent again by the kernel after its timeout.
public enum NbdWorker {
    /// The supervisor; `ready` gets "ready INDEX" once the device is connected, or "error: …".
    /// `adopting`: the device is connected already (the daemon hands it over): its first child is
    /// reconnected to it as a restarted one would be.
    public static func supervise(spec bytes: [UInt8], readyFD: Int32, adopting: UInt32? = nil) -> Int32 {
        func ready(_ line: String) {
            _ = try? FileDescriptor(rawValue: readyFD).writeAll(Array((line + "\n").utf8))
            Sys.close(readyFD)
        }
        guard let spec = try? JSONDecoder().decode(ServeSpec.self, from: Data(bytes)), let device = spec.device else {
            ready("error: the serve spec names no NBD device")
            return 2
        }
        var link = adopting.map { Link(index: $0) }
        var readySent = false
        var restarts = 0
        while true {
            let started = ContinuousClock.now
            switch startChild(spec: bytes, device: device, link: link) {
            case .failure(let why):
                guard readySent, let link else { ready("error: \(why)"); return 1 }
                FuseWorker.log("cannot restart the server of /dev/nbd\(link.index): \(why)")
            case .success(let (pid, connected)):
                if !readySent { ready("ready \(connected.index)") }
                (link, readySent) = (connected, true)
                let (code, signal) = Sys.wait(pid)
                guard isMounted(connected.index) else { return finish(spec) }
                FuseWorker.log("server \(pid) ended (\(signal.map { "signal \($0)" } ?? "exit \(code ?? -1)")) "
                               + "while /dev/nbd\(connected.index) is mounted; reconnecting it")
                guard connected.ioctl == nil else {
                    FuseWorker.log("set up through ioctls, /dev/nbd\(connected.index) cannot be reconnected; "
                                   + "its reads fail")
                    return 1
                }
            }
            if ContinuousClock.now - started > .seconds(60) { restarts = 0 }
            restarts += 1
            guard restarts <= 50, let current = link, isMounted(current.index) else {
                FuseWorker.log("giving up after \(restarts) restarts; reads of the device fail")
                return 1
            }
            usleep(UInt32(min(restarts, 10)) * 50_000)
        }
    }

    /// How the supervisor holds the device: its index, and for the ioctl interface the descriptor
    /// whose NBD_DO_IT call serves it.
    struct Link {
        var index: UInt32
        var ioctl: FileDescriptor?
    }

    /// Starts a serving child on a new socket pair and, once it has opened its source, connects a
    /// device to the pair's other end (`link` nil) or reconnects the linked device to it.
    static func startChild(spec: [UInt8], device: NBDDeviceSpec, link: Link?) -> Result<(Int32, Link), Failure> {
        do {
            let (kernelEnd, serverEnd) = try Sys.socketPair()
            defer { Sys.close(kernelEnd) }
            let (pid, status) = try spawnChild(spec: spec, socket: serverEnd)
            Sys.close(serverEnd)
            let line = Sys.readLine(status, timeoutMs: 3_600_000)
            Sys.close(status)
            let fields = line.split(separator: " ")
            guard fields.count == 2, fields[0] == "ready", let size = UInt64(fields[1]) else {
                stop(pid)
                let why = line.hasPrefix("error: ") ? String(line.dropFirst(7)) : "the server exited before it was ready"
                return .failure(Failure(why))
            }
            do {
                if let link {
                    try reconnect(link.index, to: kernelEnd)
                    return .success((pid, link))
                }
                return .success((pid, try connect(kernelEnd, size: size, device)))
            } catch {
                stop(pid)
                let what = link == nil ? "connecting" : "NBD_CMD_RECONFIGURE of"
                return .failure(Failure("\(what) an NBD device: \(error)"))
            }
        } catch {
            return .failure(Failure("cannot start the server: \(error)"))
        }
    }

    /// NBD_CMD_RECONFIGURE of the device onto `socket`. The kernel takes a new socket only in place
    /// of one it found dead, which it notices moments after the old server's end closed: retried
    /// for up to 5 s while it answers ENOSPC.
    static func reconnect(_ index: UInt32, to socket: Int32) throws {
        for attempt in 0..<100 {
            do { return try NBDNetlink.reconfigure(index: index, socket: socket, disconnectOnClose: true) } catch
                let e as Errno where e == .noSpace && attempt < 99 {
                usleep(50_000)
            }
        }
    }

    static func stop(_ pid: Int32) {
        try? Sys.kill(pid, SIGKILL)
        _ = Sys.wait(pid)
    }

    /// A free device connected to `socket`: over generic netlink (NBD_CMD_CONNECT), or where this
    /// network namespace has no "nbd" family, through the device's ioctls with NBD_DO_IT on a thread
    /// of this process and a watcher that disconnects the device once it is no longer mounted.
    static func connect(_ socket: Int32, size: UInt64, _ device: NBDDeviceSpec) throws -> Link {
        do {
            return Link(index: try NBDNetlink.connect(socket: socket, size: size, blockSize: device.blockSize,
                                                      timeoutSeconds: device.timeoutSeconds,
                                                      deadConnectionSeconds: device.deadConnectionSeconds))
        } catch let e as Errno where e == .noSuchFileOrDirectory {
            FuseWorker.log("no \"nbd\" generic netlink family in this network namespace; using the ioctl interface")
        }
        let (fd, index) = try NBDIoctl.claim(socket: socket, size: size, blockSize: device.blockSize,
                                             timeoutSeconds: device.timeoutSeconds)
        Threads.detach {
            if let e = NBDIoctl.run(fd.rawValue) { FuseWorker.log("NBD_DO_IT on /dev/nbd\(index): \(e)") }
        }
        for _ in 0..<250 where !FileManager.default.fileExists(atPath: "/sys/block/nbd\(index)/pid") { usleep(20_000) }
        Threads.detach { disconnectWhenUnmounted(fd.rawValue, index: index) }
        return Link(index: index, ioctl: fd)
    }

    /// For an ioctl-configured device (no disconnect-on-close): once it has been mounted and is no
    /// longer, NBD_DISCONNECT, which ends NBD_DO_IT and the server's connection. Mounted is first
    /// read from mountinfo (an exclusive open while the mount is being made would make it fail with
    /// EBUSY); once it left mountinfo, an exclusive open tells whether a lazily detached superblock
    /// still holds the device.
    static func disconnectWhenUnmounted(_ fd: Int32, index: UInt32) {
        let device = "/dev/nbd\(index)"
        var seen = false
        while FileManager.default.fileExists(atPath: "/sys/block/nbd\(index)/pid") {
            let listed = MountInfo.current().contains { $0.source == device }
            if seen && !listed && !isMounted(index) { break }
            seen = seen || listed
            usleep(seen ? 500_000 : 100_000)
        }
        try? NBDIoctl.disconnect(fd: fd)
    }

    static func spawnChild(spec: [UInt8], socket: Int32) throws -> (Int32, Int32) {
        try ServedProcess.startChild(spec: spec, keeping: [socket]) { specFD, statusFD in
            ["__nbd-serve", "--child", "--socket-fd", String(socket), "--spec-fd", String(specFD),
             "--ready-fd", String(statusFD)]
        }
    }

    /// Disconnects /dev/nbdN over generic netlink, or through its ioctl where this network namespace
    /// has no "nbd" family.
    static func disconnect(_ index: UInt32) {
        do { try NBDNetlink.disconnect(index: index) } catch let e as Errno where e == .noSuchFileOrDirectory {
            try? NBDIoctl.disconnect(index: index)
        } catch {}
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
        spec.servingEnded()
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
        let spec: ServeSpec
        do {
            spec = try JSONDecoder().decode(ServeSpec.self, from: Data(bytes))
            served = try Runtime().openServedSource(spec)
        } catch {
            FuseWorker.log("cannot serve: \(error)")
            _ = try? ready.writeAll(Array("error: \(error)\n".utf8))
            return 2
        }
        defer { served.close() }
        let export = NBDExport(name: "image", description: served.description, size: served.size,
                               preferredBlock: served.granule)
        let server = NBDServer(exports: [export], read: { try served.read(offset: $0, length: $1) },
                               region: { try served.region(offset: $0, length: $1).map { ($0.fd, $0.offset) } },
                               prefetch: { try served.prefetch(offset: $0, length: $1) }, log: { FuseWorker.log($0) })
        _ = try? ready.writeAll(Array("ready \(served.size)\n".utf8))
        Sys.close(readyFD)
        let stop = Locked(false)
        Threads.detach { served.writeStatsWhileServing(to: spec.statsPath, until: stop) }
        server.serve(kernelConnection: socketFD)
        stop.set(true)
        FuseWorker.log("the connection ended; exiting")
        return 0
    }
}
