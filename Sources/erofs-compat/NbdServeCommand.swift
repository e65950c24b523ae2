import ArgumentParser
import Runtime

/// `erofs-compat __nbd-serve`: the server of an `nbd` mount, on the socket whose other end the
/// kernel's NBD driver holds. Internal: not shown in --help.
struct NbdServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "__nbd-serve", shouldDisplay: false)

    @Option var socketFd: Int32
    @Option var specFd: Int32
    @Option var readyFd: Int32

    func run() throws {
        let spec = try readServeSpec(specFd)
        throw ExitCode(NbdWorker.serve(spec: spec, socketFD: socketFd, readyFD: readyFd))
    }
}
