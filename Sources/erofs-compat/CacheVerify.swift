import ArgumentParser
import Runtime

/// `erofs-compat cache verify [KEY]`.
struct CacheVerify: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "verify", abstract: "Hash complete cached blobs whose digest is known.")
    @OptionGroup var dir: CacheDirOption
    @Argument(help: "Only blobs whose key starts with this.") var key: String?

    func run() throws {
        let results = try CacheManager(directory: dir.cacheDir).verify(key)
        for (e, v) in results { print("\(e.key)  \(v.rawValue)") }
        if results.contains(where: { $0.1 == .mismatch }) { throw ExitCode(1) }
    }
}
