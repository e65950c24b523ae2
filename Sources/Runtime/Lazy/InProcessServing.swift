#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Glibc
import Remote
import Syscall
import SystemPackage

/// The served-mount host of `erofs-compat daemon`: every mount it serves (fanotify, FUSE) is a
/// `HostedMount` on the process's shared threads, without a process start per mount. Crash safety
/// comes from the service manager's file-descriptor store: each mount's durable descriptors are
/// stored there under `PREFIX-ID-KIND` and its spec written beside its figures, so a restarted
/// daemon gets them back and serves the mount again (`restore`). On a clean stop each mount goes
/// to a per-mount supervisor process, which keeps serving it (`handOver`).
public final class InProcessServing: @unchecked Sendable {  // the mounts behind their lock
    let state: StateStore
    let mounts = Locked<[String: any HostedMount]>([:])
    let log: @Sendable (String) -> Void

    public init(state: StateStore, log: @escaping @Sendable (String) -> Void) {
        self.state = state
        self.log = log
    }

    /// A fresh id per mount (never reused, so a late cleanup of an earlier mount at the same
    /// mountpoint cannot touch a newer one's stored descriptors or files).
    static func newID() -> String {
        var rng = SystemRandomNumberGenerator()
        return (0..<12).map { _ in String(hexByte: UInt8.random(in: 0...255, using: &rng)) }.joined()
    }

    /// How many mounts this process serves.
    public var count: Int { mounts.get().count }

    /// Takes a prepared mount: its spec written, its durable descriptors stored. On failure the
    /// mount is closed and forgotten, and the error thrown.
    func add(_ mount: any HostedMount) throws {
        do {
            try Sys.writeFileAtomically(mount.spec.specPath, [UInt8](JSONEncoder().encode(mount.spec.stored)))
            try store(mount)
        } catch {
            forget(mount.spec)
            mount.close()
            throw error
        }
        mounts.withLock { $0[mount.spec.mountpoint] = mount }
    }

    /// Hands the mount's durable descriptors to the service manager's store.
    func store(_ mount: any HostedMount) throws {
        for (kind, fd) in mount.durable {
            guard try ServiceManager.notify("FDSTORE=1\nFDNAME=\(mount.spec.fdName(kind))", fds: [fd]) else {
                throw RuntimeError.state("no service manager holds the descriptors ($NOTIFY_SOCKET is unset)")
            }
        }
    }

    /// Removes a mount's descriptors from the store and its spec file (and journal, unless a
    /// successor serves the mount now).
    func forget(_ spec: ServeSpec, keepJournal: Bool = false) {
        forgetDescriptors(spec)
        // The files are per mountpoint: leave them to a newer mount there.
        guard ServeSpec.readHosted(spec.specPath).map({ $0.hostID == spec.hostID }) ?? true else { return }
        try? Sys.unlink(spec.specPath)
        if !keepJournal { try? Sys.unlink(spec.journalPath) }
    }

    func forgetDescriptors(_ spec: ServeSpec) {
        for kind: Character in ["g", "w", "l", "a", "f", "j", "n"] {
            _ = try? ServiceManager.notify("FDSTOREREMOVE=1\nFDNAME=\(spec.fdName(kind))")
        }
    }

    /// After a failed mount: drops what was prepared for `mountpoint`.
    func abandon(_ mountpoint: String) {
        guard let m = mounts.withLock({ $0.removeValue(forKey: mountpoint) }) else { return }
        _ = m.stop()
        forget(m.spec)
        m.close()
        if m.spec.frontend != .fanotify { m.spec.servingEnded() }
    }

    /// Starts serving the mount prepared for `mountpoint` (now mounted).
    func serve(_ mountpoint: String) {
        guard let m = mounts.withLock({ $0[mountpoint] }) else { return }
        start(m, restarted: false)
    }

    func start(_ m: any HostedMount, restarted: Bool) {
        m.start(restarted: restarted) { [self] in
            mounts.withLock { if $0[m.spec.mountpoint] === m { $0[m.spec.mountpoint] = nil } }
            forget(m.spec)
            m.close()
        }
    }

    /// At start: takes back the mounts a previous daemon process served, from the descriptors the
    /// service manager kept and the specs beside their figures.
    public func restore(_ fds: [(name: String, fd: Int32)]) {
        var byID: [String: [Character: Int32]] = [:]
        for (name, fd) in fds {
            guard let (id, kind) = ServeSpec.parseFDName(name) else { continue }
            byID[id, default: [:]][kind] = fd
        }
        let dir = state.root + "/workers/"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        var known: [String: ServeSpec] = [:]
        for name in names where name.hasSuffix(".spec") {
            if let s = ServeSpec.readHosted(dir + name), let id = s.hostID { known[id] = s }
        }
        for (id, f) in byID {
            guard let spec = known[id] else {
                // Descriptors without a spec: nothing can serve them; the group must not close while a
                // mount might use it, so keep them (the next hand-over or stop ends them).
                log("stored descriptors \(id) have no spec; keeping them")
                continue
            }
            do {
                let m: any HostedMount = switch spec.frontend {
                case .fanotify: try HostedFanotify.restore(spec, f, log: log)
                case .fuse: try HostedFuse.restore(spec, f, state: state, log: log)
                case .nbd: try HostedNbd.restore(spec, f, state: state, log: log)
                }
                mounts.withLock { $0[spec.mountpoint] = m }
                updateRecords(of: m, pid: getpid(), servedBy: MountRecord.daemon)
                log("\(spec.mountpoint): serving again after a restart")
                start(m, restarted: true)
                // An NBD mount serves a new connection now: the store gets it in place of the old one.
                // (Never for the others: while the store lets go, a crash would close a group.)
                if spec.frontend == .nbd {
                    forgetDescriptors(spec)
                    try? store(m)
                }
            } catch {
                log("\(spec.mountpoint): cannot serve again: \(error)")
            }
        }
    }

    /// Points every record `m` serves at `pid`.
    func updateRecords(of m: any HostedMount, pid: Int32, servedBy: String?) {
        try? state.withLock {
            for var r in state.all() where m.serves(r) {
                r.workerPID = pid
                r.servedBy = servedBy
                try? state.save(r)
            }
        }
    }

    /// On a clean stop: each mount still served goes to its own supervisor process (started with
    /// its durable descriptors), which keeps serving it after this process exits.
    public func handOver() {
        for (mountpoint, m) in mounts.get() {
            guard m.stop() else {
                // Its mount is gone: what it held goes (if its end did not see to that already).
                mounts.withLock { if $0[mountpoint] === m { $0[mountpoint] = nil } }
                forget(m.spec)
                m.close()
                continue
            }
            do {
                let pid = try m.spawnSupervisor()
                updateRecords(of: m, pid: pid, servedBy: nil)
                mounts.withLock { if $0[mountpoint] === m { $0[mountpoint] = nil } }
                log("\(mountpoint): handed to supervisor \(pid)")
                forget(m.spec, keepJournal: true)
            } catch {
                // Keep the descriptors stored: the manager holds them until the next start.
                log("\(mountpoint): cannot hand over (\(error)); its descriptors stay in the store")
            }
        }
    }
}
