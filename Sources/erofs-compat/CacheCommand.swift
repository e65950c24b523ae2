import ArgumentParser

/// `erofs-compat cache …`: the blob cache of remote images.
struct CacheCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cache",
        abstract: "List, verify and prune cached remote images.",
        discussion: "Exit codes: 0 success, 1 a verification failed, 2 usage error, 5 prune without root.",
        subcommands: [CacheLs.self, CacheVerify.self, CachePrune.self]
    )
}

/// The option every cache subcommand takes.
struct CacheDirOption: ParsableArguments {
    @Option(help: ArgumentHelp("The cache directory.", valueName: "DIR"))
    var cacheDir: String = "/var/cache/erofs-compat"
}
