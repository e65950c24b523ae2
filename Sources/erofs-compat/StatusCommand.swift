#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import ArgumentParser
import Runtime

/// `erofs-compat status [--json] [--prune] [MOUNTPOINT]`.
struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "List the mounts erofs-compat made, with their health.",
        discussion: """
            A mount is stale when its record no longer matches reality (the mount is gone, its loop device \
            was released). --prune removes stale records; 'umount' does the same for one mountpoint.

            Exit codes: 0 listed (even if some are stale), 2 usage error, 5 --prune without root, \
            6 MOUNTPOINT is not an erofs-compat mount.
            """
    )

    @Flag(help: "Print JSON.")
    var json = false

    @Flag(help: "Remove stale records.")
    var prune = false

    @Argument(help: "Only this mountpoint.")
    var mountpoint: String?

    func run() throws {
        let runtime = Runtime()
        if prune {
            let pruned = try runtimeCall { try runtime.prune() }
            for r in pruned where !json { print("pruned stale record for \(r.mountpoint)") }
        }
        let list = try runtimeCall { try runtime.status(mountpoint) }
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            print(String(decoding: try enc.encode(StatusDocument(mounts: list)), as: UTF8.self))
            return
        }
        if list.isEmpty {
            print("no mounts made by erofs-compat")
            return
        }
        for s in list {
            let r = s.record
            let since = Date(timeIntervalSince1970: r.since)
            print("\(r.mountpoint)")
            print("  source   \(r.source)")
            print("  backend  \(r.backend)\(r.device.map { " (\($0))" } ?? "")  options \(r.options)")
            print("  since    \(since)")
            if let c = r.cachePath { print("  cache    \(c)") }
            if let pid = r.workerPID { print("  worker   \(pid)\(r.servedByDaemon ? " (erofs-compat daemon)" : "")") }
            if let f = s.fuse {
                let mean = f.reads == 0 ? 0 : Double(f.readMicros) / Double(f.reads) / 1000
                print("  fuse     \(f.requests) requests (\(f.errors) answered with an error), \(f.reads) reads of \(f.readBytes) bytes, "
                      + "mean \(formatMs(mean)) max \(formatMs(Double(f.maxReadMicros) / 1000)), protocol 7.\(f.kernelMinor)")
                if (f.passthroughOpens ?? 0) > 0 {
                    print("  passthru the image file is passed through to the complete cache file: reads skip the server")
                }
            }
            if let l = s.lazy {
                print("  progress \(formatPercent(l.population)) present, \(l.bytesFetched) bytes in \(l.requests) requests"
                      + (l.complete ? ", complete" : "") + (l.verified == true ? ", verified" : "")
                      + (l.verityFailures.map { ", every block checked against its fs-verity tree (\($0) failed)" } ?? ""))
                if let e = l.error { print("  error    \(e)") }
            }
            if let p = s.progress {
                print("  progress \(formatPercent(p.population)) present, \(p.bytesFetched) bytes in \(p.requests) requests, \(p.events) events (\(p.allowedFromCache) from cache, \(p.fetched) fetched, \(p.denied) denied), p50 \(formatMs(p.p50Ms)) p99 \(formatMs(p.p99Ms))\(p.complete ? ", complete" : "")\(p.verified == true ? ", verified" : "")\(p.verityFailures.map { ", every block checked against its fs-verity tree (\($0) failed)" } ?? "")")
                if let e = p.error { print("  error    \(e)") }
            }
            print("  health   \(s.stale ? "STALE: " + s.problems.joined(separator: "; ") : "ok")")
        }
    }
}

struct StatusDocument: Codable {
    var schemaVersion = 1
    var mounts: [MountStatus]
}

func formatPercent(_ v: Double) -> String { "\((v * 10).rounded() / 10)%" }
func formatMs(_ v: Double) -> String { "\((v * 100).rounded() / 100) ms" }
