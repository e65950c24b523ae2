import CHeaders
import Glibc
import SystemPackage

extension Sys {
    // MARK: unix sockets

    /// An AF_UNIX socket of `type` bound to `path` (a stale socket file there is replaced; mode 0600),
    /// then `configure`d; closed again if either fails.
    private static func unixBound(_ type: Int32, _ path: String, configure: (Int32) throws -> Void = { _ in }) throws -> Int32 {
        let fd = try socket(AF_UNIX, type, 0).rawValue
        do {
            if !path.hasPrefix("@") { _ = Glibc.unlink(path) }
            _ = try call { ecx_unix_bind(fd, path) }
            if !path.hasPrefix("@") { _ = try call { Glibc.chmod(path, 0o600) } }
            try configure(fd)
            return fd
        } catch {
            close(fd)
            throw error
        }
    }

    /// A listening AF_UNIX stream socket at `path` (a stale socket file there is replaced), mode 0600.
    package static func unixListen(_ path: String, backlog: Int32 = 64) throws -> Int32 {
        try unixBound(Int32(SOCK_STREAM.rawValue), path) { fd in _ = try call { Glibc.listen(fd, backlog) } }
    }

    /// A stream connection to the AF_UNIX socket at `path`.
    package static func unixConnect(_ path: String) throws -> Int32 {
        let fd = try socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0).rawValue
        do {
            _ = try call { ecx_unix_connect(fd, path) }
            return fd
        } catch {
            close(fd)
            throw error
        }
    }

    /// An AF_UNIX datagram socket, bound to `path` (mode 0600) when given.
    package static func unixDatagram(bindTo path: String? = nil) throws -> Int32 {
        guard let path else { return try socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0).rawValue }
        return try unixBound(Int32(SOCK_DGRAM.rawValue), path)
    }

    /// Writes all of `bytes` to a connected stream socket; a peer that has gone away is an error
    /// (EPIPE), never a SIGPIPE.
    /// send(2) until all of `bytes` is out; `more`: MSG_MORE (what follows joins the same segment).
    package static func sendAll(_ fd: Int32, _ bytes: [UInt8], more: Bool = false) throws {
        let flags = Int32(MSG_NOSIGNAL) | (more ? Int32(MSG_MORE) : 0)
        try bytes.withUnsafeBytes { b in
            var done = 0
            while done < b.count {
                done += try call { Glibc.send(fd, b.baseAddress! + done, b.count - done, flags) }
            }
        }
    }

    /// sendfile(2) of `count` bytes of `file` from `offset` to the socket `fd`; EIO if the file ends
    /// first.
    package static func sendFileAll(_ fd: Int32, from file: Int32, offset: UInt64, count: Int) throws {
        var off = off_t(offset)
        var left = count
        while left > 0 {
            let n = try call { Glibc.sendfile(fd, file, &off, left) }
            if n == 0 { throw Errno.ioError }
            left -= n
        }
    }

    /// SO_SNDBUF: room for `bytes` of replies in the socket before a sender blocks (the kernel
    /// doubles it and caps it at wmem_max; unix sockets are not capped below that).
    package static func setSendBuffer(_ fd: Int32, _ bytes: Int) throws {
        var v = Int32(bytes)
        _ = try call { setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, socklen_t(MemoryLayout<Int32>.size)) }
    }

    /// SO_RCVTIMEO and SO_SNDTIMEO: a blocked read or write of this socket fails with EAGAIN after
    /// `seconds` (0: never).
    package static func setTimeouts(_ fd: Int32, receive: Int, send: Int) throws {
        for (opt, secs) in [(SO_RCVTIMEO, receive), (SO_SNDTIMEO, send)] {
            var tv = timeval(tv_sec: secs, tv_usec: 0)
            _ = try call { setsockopt(fd, SOL_SOCKET, opt, &tv, socklen_t(MemoryLayout<timeval>.size)) }
        }
    }

    /// accept(2), close-on-exec.
    package static func accept(_ fd: Int32) throws -> Int32 {
        try call { ecx_accept_cloexec(fd) }
    }

    /// The uid of the process at the other end of a unix stream socket.
    package static func peerUID(_ fd: Int32) throws -> UInt32 {
        var uid: UInt32 = 0
        _ = try call { ecx_peer_uid(fd, &uid) }
        return uid
    }

    /// Sends `bytes` with `fds` attached (SCM_RIGHTS), to `path` (datagram) or the connected peer.
    package static func send(_ sock: Int32, to path: String? = nil, _ bytes: [UInt8], fds: [Int32] = []) throws {
        _ = try bytes.withUnsafeBytes { b in
            try fds.withUnsafeBufferPointer { f in
                try call { ecx_send_fds(sock, path, b.baseAddress, b.count, f.baseAddress, Int32(f.count)) }
            }
        }
    }

    /// A connected pair of Unix stream sockets (both close-on-exec).
    package static func socketPair() throws -> (Int32, Int32) {
        var fds: [Int32] = [-1, -1]
        _ = try call { Glibc.socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
        return (fds[0], fds[1])
    }

    /// Receives one message and the descriptors attached to it (close-on-exec).
    package static func receive(_ sock: Int32, maxBytes: Int = 4096) throws -> (bytes: [UInt8], fds: [Int32]) {
        var buf = [UInt8](repeating: 0, count: maxBytes)
        var fds = [Int32](repeating: -1, count: 253)
        var nfds: Int32 = 0
        let n = try buf.withUnsafeMutableBytes { b in
            try fds.withUnsafeMutableBufferPointer { f in
                try call { ecx_recv_fds(sock, b.baseAddress, b.count, f.baseAddress, Int32(f.count), &nfds) }
            }
        }
        return (Array(buf[0..<n]), Array(fds[0..<Int(nfds)]))
    }

    /// An anonymous memory file holding `bytes` (for secrets that must never touch a disk).
    package static func memfd(_ name: String, holding bytes: [UInt8]) throws -> Int32 {
        let fd = try call { ecx_memfd(name) }
        do {
            _ = try FileDescriptor(rawValue: fd).writeAll(bytes)
            return fd
        } catch {
            close(fd)
            throw error
        }
    }
}

extension Sys {
    /// A close-on-exec duplicate of `fd`.
    package static func dup(_ fd: Int32) throws -> Int32 {
        try call { fcntl(fd, F_DUPFD_CLOEXEC, 0) }
    }
}

extension Sys {
    /// splice(2) of up to `count` bytes from `from` (at `offset`, advanced, when given) to `to`;
    /// the count moved (0: end of input). Without SPLICE_F_MOVE: with it the copy into /dev/fuse was
    /// 2.6 times slower here (6.18).
    package static func splice(from: Int32, offset: UnsafeMutablePointer<Int64>?, to: Int32, count: Int) throws -> Int {
        try call { Int(ecx_splice(from, offset, to, count, 0)) }
    }

    /// F_SETPIPE_SZ: the pipe's capacity raised to at least `bytes`; the capacity it has now.
    @discardableResult
    package static func setPipeSize(_ fd: Int32, _ bytes: Int) throws -> Int {
        Int(try call { ecx_set_pipe_size(fd, Int32(bytes)) })
    }
}

extension Sys {
    /// shutdown(2) both directions: every holder of the socket (and its peer) sees the end of the
    /// stream, while the descriptors stay open.
    package static func shutdownBoth(_ fd: Int32) throws {
        _ = try call { Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }
}

extension Sys {
    /// A shared read-write mapping of `length` bytes of `fd` (a memfd another process may inherit).
    package static func mapShared(_ fd: Int32, length: Int) throws -> UnsafeMutableRawPointer {
        guard let p = ecx_map_shared(fd, length) else { throw Errno(rawValue: errno) }
        return p
    }

    /// A 32-bit value read after everything its writer stored before it (`storeRelease`).
    package static func loadAcquire(_ p: UnsafeRawPointer) -> UInt32 { ecx_load_acquire_u32(p) }

    /// Stores `value` after every store before it is visible.
    package static func storeRelease(_ p: UnsafeMutableRawPointer, _ value: UInt32) { ecx_store_release_u32(p, value) }
}
