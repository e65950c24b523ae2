#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import ArgumentParser
import Runtime

/// `erofs-compat cache ls`.
struct CacheLs: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ls", abstract: "List cached blobs: size, allocated, present, source, users.")
    @OptionGroup var dir: CacheDirOption
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let entries = CacheManager(directory: dir.cacheDir).entries()
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            print(String(decoding: try enc.encode(entries), as: UTF8.self))
            return
        }
        if entries.isEmpty { print("no cached blobs in \(dir.cacheDir)") }
        for e in entries {
            print("\(e.key.prefix(16))…  size \(e.size)  allocated \(e.allocated)  present \(formatPercent(e.presentPercent))  \(Self.verification(e.info))  \(e.info?.url ?? "?")"
                  + (e.usedBy.isEmpty ? "" : "  in use by \(e.usedBy.joined(separator: ", "))")
                  + (e.sameFileAs.map { "  (the same file as \($0.prefix(16))…)" } ?? ""))
        }
    }

    /// How an entry's bytes are known to be the blob's.
    static func verification(_ info: CacheInfo?) -> String {
        if info?.kernelVerity == true { return "verified whole, kernel fs-verity" }
        switch (info?.verified == true, info?.verity != nil) {
        case (true, true): return "verified whole and per block"
        case (true, false): return "verified whole"
        case (false, true): return "verified per block"
        case (false, false): return "unverified"
        }
    }
}
