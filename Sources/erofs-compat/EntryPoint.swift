import ArgumentParser
import Glibc
import SystemPackage
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `erofs-compat`: what this kernel supports for EROFS, and how to mount images here.
struct ErofsCompat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "erofs-compat",
        abstract: "Probe and use the EROFS mount paths this Linux host really supports.",
        discussion: """
            Exit codes: 0 success, 1 the operation failed (see each command), 2 usage error, 70 a Debian \
            library this command needs cannot be loaded (named, with its package).
            """,
        version: ToolInfo.version,
        subcommands: [ProbeCommand.self, MountCommand.self, UmountCommand.self, StatusCommand.self, ImageCommand.self, PushCommand.self, CacheCommand.self, DaemonCommand.self, NBDCommand.self, InstallCommand.self, ServeCommand.self, FuseServeCommand.self, NbdServeCommand.self]
    )
}

enum ToolInfo {
    static let version = "0.1.0"
}

/// Parses, runs, and maps errors to the documented exit codes (usage errors are 2, not 64).
@main
enum EntryPoint {
    static func main() {
        do {
            var command = try ErofsCompat.parseAsRoot()
            try command.run()
        } catch let exit as ExitCode {
            Glibc.exit(exit.rawValue)
        } catch let failure as CLIFailure {
            printError(failure.message)
            Glibc.exit(failure.code)
        } catch {
            let code = ErofsCompat.exitCode(for: error)
            if code == .success {
                ErofsCompat.exit(withError: error)
            }
            let message = ErofsCompat.message(for: error)
            printError(message.split(separator: "\n").joined(separator: " "))
            if code == .validationFailure {
                printError("run 'erofs-compat --help' for usage", prefix: false)
                Glibc.exit(2)
            }
            Glibc.exit(code.rawValue == 0 ? 1 : code.rawValue)
        }
    }
}

/// A failure with a one-line message and a documented exit code.
struct CLIFailure: Error {
    var message: String
    var code: Int32
}

/// Writes one line to standard error, prefixed with the tool name.
func printError(_ message: String, prefix: Bool = true) {
    let line = (prefix ? "erofs-compat: " : "") + message + "\n"
    _ = try? FileDescriptor.standardError.writeAll(Array(line.utf8))
}
