#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Syscall

/// One served mount that `erofs-compat daemon` serves in its own threads. The host stores the
/// descriptors it names `durable` in the service manager's fd store, so a crash of the daemon never
/// closes them (a closed fanotify group lets pending reads through; a closed /dev/fuse ends the
/// mount), and a restarted daemon serves the mount again from them and its spec. On a clean stop
/// the mount goes to a supervisor process of its own.
protocol HostedMount: AnyObject, Sendable {
    var spec: HostedSpec { get }
    /// The descriptors that must outlive a crash of this process, by a one-letter kind.
    var durable: [(kind: Character, fd: Int32)] { get }
    /// Whether `record` is one of the mounts this serves (fanotify: every mount of its cache file).
    func serves(_ record: MountRecord) -> Bool
    /// Starts serving; `ended` runs once every mount it serves is gone (never after `stop`).
    func start(restarted: Bool, ended: @escaping @Sendable () -> Void)
    /// Stops serving for a hand-over; returns once nothing of it runs. False when the mount went
    /// away meanwhile (`ended` runs or ran: nothing to hand over).
    func stop() -> Bool
    /// Starts the supervisor process that serves the mount from now on, with the durable
    /// descriptors (which stay open here too until `close`); its pid.
    func spawnSupervisor() throws -> Int32
    /// Closes this process's copies of the durable descriptors.
    func close()
}

/// What the daemon keeps beside a hosted mount's figures so that its successor can serve the mount
/// again: one type for every hosted backend, never a secret (credentials are in the fd store, in a
/// memfd). A fanotify spec is written as the object earlier versions wrote, so a daemon upgraded
/// in place reads what its predecessor left.
enum HostedSpec: Codable, Sendable {
    case fanotify(LazySpec)
    case fuse(FuseHostingSpec)

    var id: String {
        switch self {
        case .fanotify(let s): s.id
        case .fuse(let s): s.id
        }
    }

    var mountpoint: String {
        switch self {
        case .fanotify(let s): s.mountpoint
        case .fuse(let s): s.mountpoint
        }
    }

    var statsPath: String {
        switch self {
        case .fanotify(let s): s.statsPath
        case .fuse(let s): s.serve.statsPath
        }
    }

    var specPath: String { StateStore.sibling(of: statsPath, ".spec") }
    var journalPath: String { StateStore.sibling(of: statsPath, ".journal") }

    /// How its descriptors are named in the fd store: `lazy-ID-K` (fanotify, as before) or `fuse-ID-K`.
    var storePrefix: String {
        switch self {
        case .fanotify: "lazy"
        case .fuse: "fuse"
        }
    }

    func fdName(_ kind: Character) -> String { "\(storePrefix)-\(id)-\(kind)" }

    /// The (id, kind) of a stored descriptor's name, for any hosted backend.
    static func parseFDName(_ name: String) -> (id: String, kind: Character)? {
        let parts = name.split(separator: "-")
        guard parts.count == 3, ["lazy", "fuse"].contains(parts[0]), parts[2].count == 1 else { return nil }
        return (String(parts[1]), parts[2].first!)
    }

    private struct Tag: Decodable { var kind: String? }

    init(from decoder: Decoder) throws {
        if try Tag(from: decoder).kind == FuseHostingSpec.kind {
            self = .fuse(try FuseHostingSpec(from: decoder))
        } else {
            self = .fanotify(try LazySpec(from: decoder))
        }
    }

    func encode(to encoder: Encoder) throws {
        switch self {
        case .fanotify(let s): try s.encode(to: encoder)
        case .fuse(let s): try s.encode(to: encoder)
        }
    }

    /// The spec in a file the daemon wrote, if it is one.
    static func read(_ path: String) -> HostedSpec? {
        (try? Sys.readFile(path)).flatMap { try? JSONDecoder().decode(HostedSpec.self, from: Data($0)) }
    }
}
