import ArgumentParser
import Glibc
import Runtime
import Syscall

/// `erofs-compat __fuse-serve`: the FUSE server of a fuse-blob or fuse-erofs mount (the supervisor,
/// or with --child one serving process it started). Internal: not shown in --help.
struct FuseServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "__fuse-serve", shouldDisplay: false)

    @Option var fuseFd: Int32
    @Option var specFd: Int32
    @Option var readyFd: Int32 = -1
    @Flag var child = false
    @Option var statusFd: Int32 = -1
    @Option var kernelFlags: UInt64 = 0
    @Option var kernelMinor: UInt32 = 0
    @Flag var resend = false

    func run() throws {
        let spec: [UInt8]
        do {
            spec = try Sys.readAll(specFd)
            Sys.close(specFd)
        } catch {
            FuseWorker.log("cannot read the serve spec from fd \(specFd): \(error)")
            throw ExitCode(2)
        }
        if child {
            throw ExitCode(FuseWorker.serve(spec: spec, fuseFD: fuseFd, statusFD: statusFd, kernelFlags: kernelFlags,
                                            kernelMinor: kernelMinor, resend: resend))
        }
        throw ExitCode(FuseWorker.supervise(spec: spec, fuseFD: fuseFd, readyFD: readyFd))
    }
}
