import ArgumentParser
import Runtime

/// `erofs-compat __serve`: the fanotify supervisor that `mount` starts for a remote image, and its
/// serving child. Everything it is told comes as one Codable spec on a pipe (`--spec-fd`), the
/// credentials on a pipe of their own; nothing but the descriptor number is on its command line.
/// Internal: not shown in --help.
struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "__serve", shouldDisplay: false)

    @Option var specFd: Int32

    func run() throws {
        let options: LazyWorker.Options
        do { options = try LazyWorker.readSpec(fd: specFd) } catch {
            LazyWorker.log("cannot read the spec from fd \(specFd): \(error)")
            throw ExitCode(2)
        }
        switch options.role {
        case .worker:
            throw ExitCode(LazyWorker.runWorker(options, groupFD: options.groupFD, writerFD: options.writerFD,
                                                journal: options.journal))
        case .supervisor:
            throw ExitCode(LazyWorker.run(options))
        }
    }
}
