import ArgumentParser
import Runtime

/// `erofs-compat __serve`: the fanotify supervisor that `mount` starts for a remote image, and its
/// serving child. Everything it is told comes as one Codable spec on a pipe (`--spec-fd`); on its
/// command line only that descriptor and, as a label, the cache file.
/// Internal: not shown in --help.
struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "__serve", shouldDisplay: false)

    @Option var specFd: Int32
    /// The cache file the spec names: on the command line so that `umount` can tell this process
    /// serves its mount (a recorded pid may since belong to another process).
    @Option var data: String

    func run() throws {
        let options: LazyWorker.Options
        do { options = try LazyWorker.readSpec(fd: specFd) } catch {
            LazyWorker.log("cannot read the spec from fd \(specFd): \(error)")
            throw ExitCode(2)
        }
        guard options.serve.blob?.entry == data else {
            LazyWorker.log("the spec names \(options.serve.blob?.entry ?? "no blob"), the command line \(data)")
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
