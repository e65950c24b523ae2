import ArgumentParser
import Remote
import Runtime

/// `erofs-compat __serve`: the fanotify worker process that `mount` starts for a remote image.
/// Internal: not shown in --help.
struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "__serve", shouldDisplay: false)

    @Option var url: String
    @Option var data: String
    @Option var record: String
    @Option var mountpoint: String
    @Option var stats: String
    @Option var readyFd: Int32
    @Option var digest: String?
    @Flag var worker = false
    @Option var groupFd: Int32 = -1
    @Option var writerFd: Int32 = -1
    @Option var lockFd: Int32 = -1
    @Flag var adopt = false
    @Option var journal: String = ""
    @Option var authFd: Int32 = -1
    @Option var prefetch: String = "none"
    @Option var recordProfile: String?
    @Option var supervisorPid: Int32?
    @Option var size: UInt64?
    @Option var etag: String?
    @Option var lastModified: String?
    @Option var prepareTimeout: Double?
    @Option var verity: String?
    @Option var verityTree: String?

    func run() throws {
        var options = LazyWorker.Options(url: url, dataPath: data, recordPath: record, mountpoint: mountpoint, statsPath: stats,
                                         readyFD: readyFd, digest: digest, allowFullDownload: false)
        options.prefetch = Prefetch(argument: prefetch)
        options.recordProfile = recordProfile
        options.supervisorPID = supervisorPid
        options.prepareTimeout = prepareTimeout
        if let verity, let verityTree { options.verity = VeritySource(digest: verity, treeURL: verityTree) }
        if let size { options.known = (size, etag, lastModified) }
        if authFd >= 0 {
            do {
                try options.readAuth(fd: authFd)
            } catch {
                LazyWorker.log("cannot read credentials from fd \(authFd): \(error)")
                throw ExitCode(2)
            }
        }
        if adopt { options.adopt = (groupFd, writerFd, lockFd) }
        if worker {
            throw ExitCode(LazyWorker.runWorker(options, groupFD: groupFd, writerFD: writerFd, journal: journal))
        }
        throw ExitCode(LazyWorker.run(options))
    }
}
