#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Glibc
import NBD
import Syscall
import SystemPackage

/// An nbd mount served in the daemon: the device is connected over netlink to one end of a socket
/// pair whose other end this process serves, one reading thread per connection and the reads on
/// the shared pool. The server's end is durable, so a crash does not drop the device's connection
/// at once; but a dead server may have half-written a reply on it, so the successor never reads it
/// again: it closes that socket and reconnects the device to a new pair (NBD_CMD_RECONFIGURE), and
/// requests the dead one had read are sent again by the kernel after its request timeout. A clean
/// stop hands the device to a `__nbd-serve` supervisor the same way.
final class HostedNbd: HostedMount, @unchecked Sendable {  // `socket` is replaced only before serving starts
    let full: ServeSpec
    let index: UInt32
    let served: ServedSource
    let authFD: OwnedDescriptor?
    let log: @Sendable (String) -> Void
    private var socket: OwnedDescriptor
    private let lane = PoolLane(limit: 8, priority: .demand)
    private let stopped = Locked(false)
    private let finished = DispatchSemaphore(value: 0)
    private let running = Locked(false)

    var spec: ServeSpec { full.stored }

    var durable: [(kind: Character, fd: Int32)] {
        var list: [(kind: Character, fd: Int32)] = [("n", socket.rawValue)]
        if let authFD { list.append(("a", authFD.rawValue)) }
        return list
    }

    private init(_ full: ServeSpec, index: UInt32, served: ServedSource, socket: Int32, authFD: Int32?,
                 log: @escaping @Sendable (String) -> Void) {
        (self.full, self.index, self.served) = (full, index, served)
        self.socket = OwnedDescriptor(socket)
        self.authFD = authFD.map { OwnedDescriptor($0) }
        self.log = { [mp = full.mountpoint] in log("\(mp): \($0)") }
    }

    func serves(_ record: MountRecord) -> Bool { record.attached.kind == .nbd && record.mountpoint == full.mountpoint }

    func start(restarted: Bool, ended: @escaping @Sendable () -> Void) {
        if restarted {
            do { try reconnect() } catch {
                log("cannot reconnect /dev/nbd\(index): \(error); its reads fail")
                return
            }
        }
        let export = NBDExport(name: "image", description: served.description, size: served.size,
                               preferredBlock: served.granule)
        let server = NBDServer(exports: [export], read: { [served] in try served.read(offset: $0, length: $1) },
                               region: { [served] in
                                   try served.region(offset: $0, length: $1).map { ($0.fd, $0.offset) }
                               },
                               prefetch: { [served] in try served.prefetch(offset: $0, length: $1) },
                               submit: { [lane] in lane.submit($0) }, log: log)
        let connection = try? Sys.dup(socket.rawValue)
        running.set(true)
        Threads.detach { [self] in
            if let connection { server.serve(kernelConnection: connection) }
            running.set(false)
            // The device disconnected (umount) unless this was a hand-over.
            if !stopped.get() {
                served.close()
                full.servingEnded()
                log("/dev/nbd\(index) disconnected; stopped serving it")
                ended()
            }
            finished.signal()
        }
        let last = Locked<Data?>(nil)
        ServingTicker.shared.every(250) { [self] in
            guard running.get() else { return false }
            last.set(served.writeStatsIfChanged(to: full.statsPath, since: last.get(), fuse: nil))
            return true
        }
    }

    /// After a crash: the stored socket may hold half a reply; the device goes to a new pair.
    private func reconnect() throws {
        let (kernelEnd, serverEnd) = try Sys.socketPair()
        defer { Sys.close(kernelEnd) }
        // The old server end, closed everywhere (the store's copy too: shutdown), is what the kernel
        // must find dead before it takes a new one.
        try? Sys.shutdownBoth(socket.rawValue)
        do { try NbdWorker.reconnect(index, to: kernelEnd) } catch {
            Sys.close(serverEnd)
            throw error
        }
        socket.close()
        socket = OwnedDescriptor(serverEnd)
        log("reconnected /dev/nbd\(index) to a new connection")
    }

    /// Ends this connection (the device waits for the next one, which the supervisor makes).
    func stop() -> Bool {
        guard running.get() else { return false }
        stopped.set(true)
        try? Sys.shutdownBoth(socket.rawValue)
        finished.wait()
        finished.signal()
        return true
    }

    func spawnSupervisor() throws -> Int32 {
        served.close()
        let (pid, line) = try ServedProcess.nbd.start(full, args: ["--adopt-index", String(index)], keeping: [])
        guard line.hasPrefix("ready ") else {
            ServedProcess.nbd.kill(pid)
            throw BackendFailure(detail: "the NBD server answered '\(line)'", fallback: false)
        }
        return pid
    }

    func close() {
        served.close()
        socket.close()
        authFD?.close()
    }

    /// After a restart: the mount again from its spec, the stored socket (n) and credentials (a).
    static func restore(_ stored: ServeSpec, _ fds: [Character: Int32], state: StateStore,
                        log: @escaping @Sendable (String) -> Void) throws -> HostedNbd {
        guard let socket = fds["n"], let index = stored.device?.index else {
            throw RuntimeError.state("the stored descriptors lack the NBD socket")
        }
        var full = stored
        if let a = fds["a"] { full.credentials = try Sys.preadFully(a, count: Int(Sys.fstat(a).st_size), at: 0) }
        let served = try Runtime(state: state).openServedSource(full)
        return HostedNbd(full, index: index, served: served, socket: socket, authFD: fds["a"], log: log)
    }

    /// Opens what `spec` names and connects a free device to a new socket pair over netlink; nil
    /// where this network namespace has no "nbd" family (the ioctl interface needs a supervisor).
    static func connect(_ spec: ServeSpec, state: StateStore,
                        log: @escaping @Sendable (String) -> Void) throws -> HostedNbd? {
        guard var device = spec.device else { throw RuntimeError.state("the serve spec names no NBD device") }
        let served = try Runtime(state: state).openServedSource(spec)
        do {
            let (kernelEnd, serverEnd) = try Sys.socketPair()
            defer { Sys.close(kernelEnd) }
            do {
                device.index = try NBDNetlink.connect(socket: kernelEnd, size: served.size, blockSize: device.blockSize,
                                                      timeoutSeconds: device.timeoutSeconds,
                                                      deadConnectionSeconds: device.deadConnectionSeconds)
            } catch {
                Sys.close(serverEnd)
                if let e = error as? Errno, e == .noSuchFileOrDirectory { served.close(); return nil }
                throw BackendFailure(detail: "connecting an NBD device: \(error)", fallback: false)
            }
            var full = spec
            full.device = device
            let authFD = try full.credentials.map { try Sys.memfd("erofs-compat-auth", holding: $0) }
            return HostedNbd(full, index: device.index!, served: served, socket: serverEnd, authFD: authFD, log: log)
        } catch {
            served.close()
            throw error
        }
    }
}

extension InProcessServing {
    /// Serves an nbd mount here: connects a device to a socket this process serves; its index, or
    /// nil where only the ioctl interface is there (the caller starts a supervisor instead).
    func hostNbd(_ spec: ServeSpec) throws -> UInt32? {
        var spec = spec
        spec.hostID = Self.newID()
        guard let mount = try HostedNbd.connect(spec, state: state, log: log) else { return nil }
        do { try add(mount) } catch {
            NbdWorker.disconnect(mount.index)
            throw error
        }
        start(mount, restarted: false)
        return mount.index
    }
}
