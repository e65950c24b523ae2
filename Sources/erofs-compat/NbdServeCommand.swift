import ArgumentParser
import Runtime

/// `erofs-compat __nbd-serve`: the server of an `nbd` mount — the supervisor that connects the
/// kernel's device, or with --child one serving process on the socket whose other end the device
/// holds. Internal: not shown in --help.
struct NbdServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "__nbd-serve", shouldDisplay: false)

    @Option var specFd: Int32
    @Option var readyFd: Int32
    @Flag var child = false
    @Option var socketFd: Int32 = -1
    /// Take over /dev/nbdN, connected already (the daemon hands it over).
    @Option var adoptIndex: UInt32?

    func run() throws {
        let spec = try readServeSpec(specFd)
        if child { throw ExitCode(NbdWorker.serve(spec: spec, socketFD: socketFd, readyFD: readyFd)) }
        throw ExitCode(NbdWorker.supervise(spec: spec, readyFD: readyFd, adopting: adoptIndex))
    }
}
