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
    /// Taking over a connection whose INIT was answered (the daemon hands it over): the kernel's
    /// flags and minor are those given.
    @Flag var adopted = false
    /// The memfd of requests read and not yet answered (kept by the supervisor or the daemon).
    @Option var journalFd: Int32?
    /// The blob file's FUSE passthrough backing id, registered on the connection.
    @Option var backingId: Int32?

    func run() throws {
        let spec = try readServeSpec(specFd)
        if child {
            throw ExitCode(FuseWorker.serve(spec: spec, fuseFD: fuseFd, statusFD: statusFd, kernelFlags: kernelFlags,
                                            kernelMinor: kernelMinor, backing: backingId, journalFD: journalFd,
                                            resend: resend))
        }
        let negotiated = ServeSpec.Negotiated(flags: kernelFlags, minor: kernelMinor, backing: backingId)
        throw ExitCode(FuseWorker.supervise(spec: spec, fuseFD: fuseFd, readyFD: readyFd,
                                            negotiated: adopted ? negotiated : nil, journalFD: journalFd))
    }
}

/// The serve spec a served mount's process gets on a pipe (exit 2 when it cannot be read).
func readServeSpec(_ fd: Int32) throws -> [UInt8] {
    do {
        defer { Sys.close(fd) }
        return try Sys.readAll(fd)
    } catch {
        FuseWorker.log("cannot read the serve spec from fd \(fd): \(error)")
        throw ExitCode(2)
    }
}
