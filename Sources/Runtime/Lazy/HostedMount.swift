import Syscall

/// One served mount that `erofs-compat daemon` serves in its own threads. The host stores the
/// descriptors it names `durable` in the service manager's fd store, so a crash of the daemon never
/// closes them (a closed fanotify group lets pending reads through; a closed /dev/fuse ends the
/// mount), and a restarted daemon serves the mount again from them and its spec. On a clean stop
/// the mount goes to a supervisor process of its own.
protocol HostedMount: AnyObject, Sendable {
    /// The mount's spec as the daemon writes it down (no secrets; `hostID` set).
    var spec: ServeSpec { get }
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

extension ServeSpec {
    /// How a hosted mount's descriptors are named in the fd store: `lazy-ID-K` (fanotify, as
    /// earlier versions named them), `fuse-ID-K` or `nbd-ID-K`.
    func fdName(_ kind: Character) -> String {
        let prefix = switch frontend {
        case .fanotify: "lazy"
        case .fuse: "fuse"
        case .nbd: "nbd"
        }
        return "\(prefix)-\(hostID ?? "")-\(kind)"
    }

    /// The (id, kind) of a stored descriptor's name, for any hosted backend.
    static func parseFDName(_ name: String) -> (id: String, kind: Character)? {
        let parts = name.split(separator: "-")
        guard parts.count == 3, ["lazy", "fuse", "nbd"].contains(parts[0]), parts[2].count == 1 else { return nil }
        return (String(parts[1]), parts[2].first!)
    }
}
