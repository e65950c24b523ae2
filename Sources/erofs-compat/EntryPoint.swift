import ArgumentParser
import Foundation

/// `erofs-compat`: what this kernel supports for EROFS, and how to mount images here.
struct ErofsCompat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "erofs-compat",
        abstract: "Probe and use the EROFS mount paths this Linux host really supports.",
        discussion: """
            Exit codes: 0 success, 1 the operation failed (see each command), 2 usage error.
            """,
        version: ToolInfo.version,
        subcommands: [ProbeCommand.self]
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
            Foundation.exit(exit.rawValue)
        } catch let failure as CLIFailure {
            FileHandle.standardError.write(Data(("erofs-compat: " + failure.message + "\n").utf8))
            Foundation.exit(failure.code)
        } catch {
            let code = ErofsCompat.exitCode(for: error)
            if code == .success {
                ErofsCompat.exit(withError: error)
            }
            let message = ErofsCompat.message(for: error)
            FileHandle.standardError.write(Data(("erofs-compat: " + message.split(separator: "\n").joined(separator: " ") + "\n").utf8))
            if code == .validationFailure {
                FileHandle.standardError.write(Data("Run 'erofs-compat --help' for usage.\n".utf8))
                Foundation.exit(2)
            }
            Foundation.exit(code.rawValue == 0 ? 1 : code.rawValue)
        }
    }
}

/// A failure with a one-line message and a documented exit code.
struct CLIFailure: Error {
    var message: String
    var code: Int32
}
