import CHeaders
import Glibc

/// The service-manager protocol of systemd (sd_notify(3), sd_listen_fds(3)), spoken without
/// libsystemd: readiness and the file-descriptor store over $NOTIFY_SOCKET, descriptors handed back
/// at start through $LISTEN_PID / $LISTEN_FDS / $LISTEN_FDNAMES. `erofs-compat daemon` started by hand
/// runs under a small keeper that speaks the same protocol, so both paths share this code.
package enum ServiceManager {
    /// $NOTIFY_SOCKET, when a service manager is listening.
    package static var notifySocket: String? {
        guard let p = getenv("NOTIFY_SOCKET").map({ String(cString: $0) }), p.hasPrefix("/") || p.hasPrefix("@") else { return nil }
        return p
    }

    /// Sends `assignments` ("READY=1", "FDSTORE=1\nFDNAME=x", …) with `fds` attached. Returns false
    /// when no manager listens.
    @discardableResult
    package static func notify(_ assignments: String, fds: [Int32] = []) throws -> Bool {
        guard let path = notifySocket else { return false }
        let sock = try Sys.unixDatagram()
        defer { Sys.close(sock) }
        try Sys.send(sock, to: path, Array(assignments.utf8), fds: fds)
        return true
    }

    /// A name the fd store accepts (FDNAME: at most 255 printable ASCII characters, no ':').
    package static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 255 && name.utf8.allSatisfy { $0 > 32 && $0 < 127 && $0 != UInt8(ascii: ":") }
    }

    /// The descriptors passed to this process (from 3 on) with their names, when $LISTEN_PID names
    /// this process; they are made close-on-exec and the variables removed, so children do not
    /// take them for their own.
    package static func listenedFDs() -> [(name: String, fd: Int32)] {
        defer { for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] { unsetenv(v) } }
        guard let pid = getenv("LISTEN_PID").flatMap({ Int32(String(cString: $0)) }), pid == getpid(),
              let count = getenv("LISTEN_FDS").flatMap({ Int32(String(cString: $0)) }), count > 0 else { return [] }
        let names = getenv("LISTEN_FDNAMES").map { String(cString: $0).split(separator: ":", omittingEmptySubsequences: false).map(String.init) } ?? []
        return (0..<count).map { i in
            let fd = 3 + i
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            return (Int(i) < names.count ? names[Int(i)] : "unknown", fd)
        }
    }

    /// One message a service sent to its manager: its assignments and the descriptors attached.
    package struct Message: Sendable {
        package var fields: [String: String]
        package var fds: [Int32]

        package init(bytes: [UInt8], fds: [Int32]) {
            var f: [String: String] = [:]
            for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
                guard let eq = line.firstIndex(of: "=") else { continue }
                f[String(line[..<eq])] = String(line[line.index(after: eq)...])
            }
            fields = f
            self.fds = fds
        }
    }
}
