import Foundation
import Glibc
import Testing
@testable import EROFS
@testable import Probe
@testable import Runtime
import Syscall
import TestSupport

/// The pid of the first child of `parent` (the process strace runs), once it exists.
func firstChild(of parent: Int32) -> Int32? {
    for _ in 0..<100 {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(parent)/task")) ?? []
        for t in tasks {
            let text = (try? String(contentsOfFile: "/proc/\(parent)/task/\(t)/children", encoding: .utf8)) ?? ""
            if let pid = text.split(separator: " ").first.flatMap({ Int32($0) }) { return pid }
        }
        usleep(20_000)
    }
    return nil
}

/// Issue 13, items 11–15: user-facing correctness of local mounts, the reader and the CLI.
@Suite(.serialized, .enabled(if: canMount, Comment(rawValue: liveReason)))
struct CorrectnessTests {
    /// 11. A `mount` killed right after the kernel attached (before it could finish) leaves a mount
    /// that `umount` still recognises as its own: the record is written before attaching.
    @Test(.enabled(if: TestEnv.which("strace") != nil, "needs strace (to hold mount at move_mount's return)"))
    func aMountKilledAfterAttachingCanBeUnmounted() throws {
        let f = try Fixture("killed-mount")
        defer { f.remove() }
        let env = ["EROFS_COMPAT_STATE_DIR": f.runtime.state.root, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"]
        // move_mount returns 20 s late: the mount exists, the command has not gone on (long enough for
        // a test process slowed by the rest of a parallel suite to see the mount and kill it first).
        let tracer = try Sys.spawnDetached(TestEnv.which("strace")!, ["-f", "-o", "/dev/null", "-e", "trace=move_mount",
                                                                      "-e", "inject=move_mount:delay_exit=20000000",
                                                                      cliBinary, "mount", f.image, f.mnt],
                                           keep: [], logPath: f.dir.file("strace.log"), environment: env)
        defer { try? Sys.kill(tracer, SIGKILL); _ = Sys.reap(tracer) }
        let child = try #require(firstChild(of: tracer))
        for _ in 0..<750 where !currentMounts().contains(f.mnt) { usleep(20_000) }
        try #require(currentMounts().contains(f.mnt), "the traced mount never attached")
        try Sys.kill(child, SIGKILL)
        _ = Sys.wait(tracer)
        let r = try run(cliBinary, ["umount", f.mnt], environment: env)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(!currentMounts().contains(f.mnt))
        f.expectClean([])
    }

    /// 11. `status --prune` signals a recorded worker only if that pid still is the worker.
    @Test func pruneNeverSignalsAReusedPid() throws {
        let f = try Fixture("pid-reuse")
        defer { f.remove() }
        let stranger = try Sys.spawnDetached("/bin/sleep", ["30"], keep: [], logPath: "/dev/null")
        defer { try? Sys.kill(stranger, SIGKILL); _ = Sys.reap(stranger) }
        try f.runtime.state.ensureDirectories()
        let record = MountRecord(source: "http://127.0.0.1:1/img.erofs", sourceKind: "http", backend: "fanotify", mountpoint: f.mnt,
                                 options: "ro", device: nil, workerPID: stranger, since: 0, sourceIdentity: "", mountID: nil,
                                 cachePath: f.dir.file("cache/blobs/sha256/x"), statsPath: nil)
        try f.runtime.state.save(record)
        let pruned = try f.runtime.prune()
        #expect(pruned.map(\.mountpoint) == [f.mnt])
        usleep(100_000)
        #expect(!Sys.reap(stranger), "a process that merely got the worker's pid was signalled")
    }

    /// 12. An image shorter than its superblock says is refused before anything is attached, the
    /// sizes named; `probe IMAGE` does not call it mountable.
    @Test func aTruncatedImageIsRefused() throws {
        let f = try Fixture("truncated", mkfs: [])
        defer { f.remove() }
        let size = try #require(try FileManager.default.attributesOfItem(atPath: f.image)[.size] as? Int)
        try #require(truncate(f.image, off_t(size - 4096)) == 0)
        do {
            _ = try f.runtime.mount(MountRequest(source: f.image, mountpoint: f.mnt))
            Issue.record("a truncated image was mounted")
        } catch let e as RuntimeError {
            #expect(e.exitCode == .badSource)
            #expect(e.description.contains("truncated") && e.description.contains("\(size - 4096)"), "\(e)")
        }
        let p = try run(cliBinary, ["probe", "--json", f.image])
        #expect(p.stdout.contains("\"image.size\"") && !p.stdout.contains("\"id\" : \"image.mountable\",\n      \"status\" : \"present\""))
        f.expectClean([])
    }

    /// 14. `--dry-run` refuses what the mount refuses (a mountpoint that already is one).
    @Test func dryRunRefusesABusyMountpoint() throws {
        let f = try Fixture("dry-busy")
        defer { f.remove() }
        _ = try f.runtime.mount(MountRequest(source: f.image, mountpoint: f.mnt))
        defer { try? f.runtime.umount(f.mnt) }
        #expect(throws: RuntimeError.alreadyMounted(f.mnt, source: f.image)) {
            _ = try f.runtime.mount(MountRequest(source: f.image, mountpoint: f.mnt, dryRun: true))
        }
    }

    /// 14. `image ls` of a directory: exit 3 and words, not an errno.
    @Test func imageOfADirectoryIsNamed() throws {
        let r = try run(cliBinary, ["image", "ls", "/etc"])
        #expect(r.status == 3 && r.stderr.contains("is a directory, not an image file"), "\(r.status) \(r.stderr)")
    }
}
