import ArgumentParser
import Glibc
import Installer
import Syscall
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `erofs-compat install --systemd`.
struct InstallCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "install",
        abstract: "Install the systemd units that run 'erofs-compat daemon'.",
        discussion: """
            Writes erofs-compat.socket (activation on the first remote mount, /run/erofs-compat/daemon.sock, \
            root only) and erofs-compat.service (Type=notify; lazy mounts' fanotify groups kept in the unit's \
            file-descriptor store across a crash; KillMode=process so mounts handed to supervisors on stop \
            keep working; hardened without a private mount namespace, which would hide its mounts from the \
            host). When systemd runs this host, 'systemctl daemon-reload' follows; enable with \
            'systemctl enable --now erofs-compat.socket'.

            Exit codes: 0 installed, 1 a unit could not be written or systemd could not reload, 2 usage error.
            """
    )

    @Flag(help: "Install the systemd socket and service units (the only kind, so also without this flag).")
    var systemd = false

    @Option(help: ArgumentHelp("Prefix every written path with DIR (packaging; no daemon-reload then).", valueName: "DIR"))
    var root: String = "/"

    @Option(help: ArgumentHelp("Unit directory below the root.", valueName: "DIR"))
    var unitDir: String = "/etc/systemd/system"

    @Option(help: ArgumentHelp("The binary ExecStart runs (default: this executable).", valueName: "PATH"))
    var binary: String?

    func validate() throws {
        guard unitDir.hasPrefix("/") else { throw ValidationError("--unit-dir must be an absolute path") }
        if let binary, !binary.hasPrefix("/") { throw ValidationError("--binary must be an absolute path") }
    }

    func run() throws {
        let exe = binary ?? Sys.executablePath()
        let dir = (root == "/" ? "" : (root.hasSuffix("/") ? String(root.dropLast()) : root)) + unitDir
        let written: [String]
        do {
            written = try SystemdUnits.write(to: dir, options: SystemdUnits.Options(binary: exe))
        } catch {
            throw CLIFailure(message: "install: cannot write the units to \(dir): \(error)", code: 1)
        }
        written.forEach { print("wrote \($0)") }
        guard root == "/" else { return }
        guard access("/run/systemd/system", F_OK) == 0 else {
            print("systemd is not running this host: the units take effect where it does ('systemctl enable --now erofs-compat.socket')")
            return
        }
        let env = ProcessInfo.processInfo.environment
        guard let systemctl = Sys.which("systemctl", path: env["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin"),
              (try? Sys.run(systemctl, ["daemon-reload"], input: [], environment: env, timeoutMs: 60_000))?.status == 0 else {
            throw CLIFailure(message: "install: 'systemctl daemon-reload' failed; run it, then 'systemctl enable --now erofs-compat.socket'", code: 1)
        }
        print("systemd reloaded; enable with: systemctl enable --now erofs-compat.socket")
    }
}
