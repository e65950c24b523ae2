import ArgumentParser
import Runtime

/// `erofs-compat cache prune [--max-size SIZE]`.
struct CachePrune: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune", abstract: "Remove cached blobs that no mount uses (least recently used first with --max-size).")
    @OptionGroup var dir: CacheDirOption
    @Option(help: ArgumentHelp("Keep up to this much allocated (e.g. 10G, 512M).", valueName: "SIZE")) var maxSize: String?

    func validate() throws {
        if let maxSize, CacheManager.parseSize(maxSize) == nil { throw ValidationError("--max-size '\(maxSize)' is not a size; use e.g. 10G or 512M") }
    }

    func run() throws {
        let removed = try runtimeCall { try CacheManager(directory: dir.cacheDir).prune(maxSize: maxSize.flatMap(CacheManager.parseSize)) }
        for e in removed { print("removed \(e.key) (\(e.allocated) bytes, \(e.info?.url ?? "?"))") }
        if removed.isEmpty { print("nothing to prune") }
    }
}
