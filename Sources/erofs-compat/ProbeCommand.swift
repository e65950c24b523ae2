import ArgumentParser
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Probe
import Runtime

/// `erofs-compat probe`: prove with live syscalls what this host supports.
struct ProbeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe",
        abstract: "Prove with live syscalls what this host supports for EROFS and which backend mount would use.",
        discussion: """
            Every finding is present, absent or unknown (could not be decided, e.g. without CAP_SYS_ADMIN), \
            with the evidence behind it. Nothing is left behind: trials use unnamed temporary files, a \
            superblock that is never attached, and a FUSE mount inside a private mount namespace.

            Exit codes: 0 at least one backend can mount a local image here, 1 none can, 2 usage error.
            """
    )

    @Flag(help: "Print JSON (with schemaVersion) instead of the table.")
    var json = false

    @Option(help: ArgumentHelp("Cache directory whose filesystem must accept pre-content marks.", valueName: "DIR"))
    var cacheDir: String = ProbeOptions.defaultCacheDir

    @Flag(help: "Allow trials that may autoload kernel modules (erofs, nbd).")
    var allowModuleLoad = false

    @Argument(help: ArgumentHelp("An EROFS image to check against this kernel.", valueName: "IMAGE"))
    var image: String?

    func validate() throws {
        if let image {
            guard FileManager.default.fileExists(atPath: image) else {
                throw ValidationError("image '\(image)' does not exist; pass the path of an EROFS image file")
            }
            guard (try? FileManager.default.contentsOfDirectory(atPath: image)) == nil else {
                throw ValidationError("image '\(image)' is a directory; pass an EROFS image file")
            }
            guard FileManager.default.isReadableFile(atPath: image) else {
                throw ValidationError("image '\(image)' is not readable; check its permissions")
            }
        }
        guard cacheDir.hasPrefix("/") else {
            throw ValidationError("--cache-dir '\(cacheDir)' must be an absolute path")
        }
    }

    func run() throws {
        let options = ProbeOptions(cacheDir: cacheDir, allowModuleLoad: allowModuleLoad,
                                   image: image.map { URL(fileURLWithPath: $0).standardizedFileURL.path })
        let report = HostProbe.run(options, implemented: Runtime.implemented)
        if json {
            print(try report.json())
        } else {
            print(report.table(color: Terminal.wantsColor), terminator: "")
        }
        throw ExitCode(report.exitCode)
    }
}

