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

/// The per-mount worker process of the fanotify backend: it owns the fanotify group, fetches the
/// image's metadata before the mount, reports readiness on a pipe, serves events while the mount
/// exists, writes progress to a stats file, and exits when the mount is gone (also after a plain
/// umount(8)). Its standard streams are detached from the caller.
public enum LazyWorker {
    public struct Options: Sendable {
        public var url: String
        public var dataPath: String
        public var recordPath: String
        public var mountpoint: String
        public var statsPath: String
        public var readyFD: Int32
        public var digest: String?
        public var allowFullDownload: Bool

        public init(url: String, dataPath: String, recordPath: String, mountpoint: String, statsPath: String,
                    readyFD: Int32, digest: String?, allowFullDownload: Bool) {
            self.url = url
            self.dataPath = dataPath
            self.recordPath = recordPath
            self.mountpoint = mountpoint
            self.statsPath = statsPath
            self.readyFD = readyFD
            self.digest = digest
            self.allowFullDownload = allowFullDownload
        }
    }

    static func log(_ s: String) {
        let line = "\(Date()) erofs-compat worker[\(Sys.processID)]: \(s)\n"
        _ = try? FileDescriptor.standardError.writeAll(Array(line.utf8))
    }

    /// Runs the worker; returns its exit status.
    public static func run(_ o: Options) -> Int32 {
        func ready(_ line: String) {
            _ = try? Array((line + "\n").utf8).withUnsafeBytes { try Sys.write(o.readyFD, $0) }
            Sys.close(o.readyFD)
        }
        let server: FanotifyServer
        do {
            let blob = try HTTPBlob(url: o.url)
            try blob.open(allowFullDownload: false)
            // The writer is opened inside LazyBlob before the mark below: its writes raise no events.
            let lazy = try LazyBlob(blob: blob, dataPath: o.dataPath, recordPath: o.recordPath)
            server = try FanotifyServer(lazy: lazy, digest: o.digest, log: log)
            let meta = try lazy.fetchMetadata()
            log("metadata ready: \(meta.totalBytes) bytes in \(meta.ranges.count) ranges of \(blob.size)")
        } catch {
            log("failed: \(error)")
            ready("error: \(error)")
            return 1
        }
        ready("ready")
        let stop = Locked(false)
        Threads.detach {
            watchMount(o.mountpoint, source: o.dataPath)
            stop.set(true)
            server.stop()
        }
        Threads.detach {
            while !stop.get() {
                writeStats(server.snapshot, to: o.statsPath)
                usleep(500_000)
            }
        }
        server.run()
        writeStats(server.snapshot, to: o.statsPath)
        log("mount \(o.mountpoint) is gone; exiting")
        return 0
    }

    static func writeStats(_ s: FanotifyServer.Stats, to path: String) {
        guard let data = try? JSONEncoder().encode(s) else { return }
        let tmp = path + ".tmp"
        if FileManager.default.createFile(atPath: tmp, contents: data) { try? Sys.rename(tmp, path) }
    }

    /// Returns once the mount of `source` at `mountpoint` has appeared and every mount of `source`
    /// (other mountpoints share this worker) is gone again, or when none appeared within 120 s.
    /// mountinfo signals changes with POLLPRI.
    static func watchMount(_ mountpoint: String, source: String) {
        var seen = false
        func present() -> Bool {
            let mounts = MountInfo.current().filter { $0.fsType == "erofs" && $0.source == source }
            return seen ? !mounts.isEmpty : mounts.contains { $0.mountPoint == mountpoint }
        }
        guard let fd = try? Sys.open("/proc/self/mountinfo", O_RDONLY) else { return }
        defer { Sys.close(fd.rawValue) }
        let deadline = DispatchTime.now() + .seconds(120)
        while true {
            let now = present()
            if now { seen = true }
            if seen && !now { return }
            if !seen && DispatchTime.now() > deadline { return }
            _ = try? Sys.poll(fd.rawValue, events: Int16(POLLPRI | POLLERR), timeoutMs: 1000)
            var b = [UInt8](repeating: 0, count: 4096)
            _ = try? b.withUnsafeMutableBytes { try Sys.pread(fd.rawValue, into: $0, at: 0) }
        }
    }
}
