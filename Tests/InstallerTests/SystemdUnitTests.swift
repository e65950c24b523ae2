import Foundation
import Glibc
import Installer
import Testing
import TestSupport

let analyze = TestEnv.which("systemd-analyze")

/// The generated units: what they must say, that systemd's own checker accepts them, how exposed
/// `systemd-analyze security` rates the service, and that packaging/systemd holds exactly them.
struct SystemdUnitTests {
    @Test func serviceKeepsDescriptorsAndMountsVisible() {
        let s = SystemdUnits.service(SystemdUnits.Options(binary: "/opt/x/erofs-compat"))
        for line in ["Type=notify", "ExecStart=/opt/x/erofs-compat daemon", "FileDescriptorStoreMax=4096", "KillMode=process",
                     "Restart=on-failure", "NoNewPrivileges=yes", "Requires=erofs-compat.socket"] {
            #expect(s.contains("\n" + line + "\n"), "missing \(line)")
        }
        // Any of these gives the service a private mount namespace: its mounts would be invisible.
        for key in ["ProtectSystem=", "ProtectHome=", "PrivateTmp=", "PrivateDevices=", "ReadOnlyPaths=", "ProtectKernelModules=",
                    "ProtectKernelTunables=", "ProtectKernelLogs=", "PrivateMounts=", "TemporaryFileSystem=", "RuntimeDirectory="] {
            #expect(!s.contains("\n" + key), "\(key) would hide the daemon's mounts from the host")
        }
        let sock = SystemdUnits.socket()
        #expect(sock.contains("\nListenStream=/run/erofs-compat/daemon.sock\n") && sock.contains("\nFileDescriptorName=control\n"))
        #expect(sock.contains("\nSocketMode=0600\n"))
    }

    @Test(.enabled(if: analyze != nil, "needs systemd-analyze (Debian package systemd)"))
    func systemdAcceptsTheUnits() throws {
        let dir = try ScratchDir("units")
        defer { dir.remove() }
        // ExecStart must name an existing executable for `verify`.
        let written = try SystemdUnits.write(to: dir.path, options: SystemdUnits.Options(binary: cliBinary))
        #expect(written.count == 2)
        for p in written {
            var st = stat()
            #expect(stat(p, &st) == 0 && st.st_mode & 0o777 == 0o644)
        }
        let verify = try run(analyze!, ["verify", dir.file("erofs-compat.socket"), dir.file("erofs-compat.service")])
        #expect(verify.status == 0 && verify.stderr.isEmpty, Comment(rawValue: verify.stderr))
        let sec = try run(analyze!, ["security", "--offline=true", dir.file("erofs-compat.service")])
        let line = sec.stdout.split(separator: "\n").first { $0.contains("Overall exposure level") } ?? ""
        let score = line.split(separator: ":").last?.split(separator: " ").first.flatMap { Double($0) }
        // The peers' lazy-pull daemons score 9.6 (UNSAFE); a mount service without a private mount
        // namespace cannot reach fuse4fs's 0.3, but everything else is restricted.
        let exposure = try #require(score, Comment(rawValue: sec.stdout + sec.stderr))
        #expect(exposure <= 5.0, Comment(rawValue: String(line)))
    }

    @Test func packagingHoldsTheGeneratedUnits() throws {
        for (name, text) in [(SystemdUnits.serviceName, SystemdUnits.service()), (SystemdUnits.socketName, SystemdUnits.socket())] {
            let path = TestEnv.repoRoot + "/packaging/systemd/" + name
            let committed = try String(contentsOfFile: path, encoding: .utf8)
            #expect(committed == text, "\(path) differs from `erofs-compat install --systemd` output: regenerate it")
        }
    }
}
