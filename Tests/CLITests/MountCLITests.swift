import Foundation
import Testing
import TestSupport

/// `mount`, `umount` and `status` as users run them: exit codes, one-line errors, nothing left behind.
@Suite(.serialized, .enabled(if: TestEnv.isRoot && TestEnv.which("mkfs.erofs") != nil, "needs root and mkfs.erofs (erofs-utils) for real mounts"))
struct MountCLITests {
    struct Env {
        let dir: ScratchDir
        var env: [String: String] {
            var e = ProcessInfo.processInfo.environment
            e["EROFS_COMPAT_STATE_DIR"] = dir.file("state")
            return e
        }
        init() throws {
            dir = try ScratchDir("cli-mount")
            try Samples.makeTree(at: dir.file("tree"))
            try Samples.mkfs(dir.file("tree"), dir.file("img.erofs"))
            try FileManager.default.createDirectory(atPath: dir.file("mnt"), withIntermediateDirectories: false)
        }
        func cli(_ args: String...) throws -> RunResult { try run(cliBinary, args, environment: env) }
    }

    @Test func mountStatusUmountRoundTrip() throws {
        let e = try Env()
        defer { e.dir.remove() }
        let loops = boundLoopDevices()
        let m = try e.cli("mount", "--explain", "-o", "nodev", e.dir.file("img.erofs"), e.dir.file("mnt"))
        #expect(m.status == 0, "\(m.stderr)")
        #expect(m.stdout.contains("file      used"))
        #expect(m.stdout.contains("loop      viable"))
        #expect(m.stdout.contains("mounted \(e.dir.file("img.erofs")) on \(e.dir.file("mnt")) (backend file)"))
        let s = try e.cli("status", "--json")
        let obj = try #require(try JSONSerialization.jsonObject(with: Data(s.stdout.utf8)) as? [String: Any])
        let mounts = try #require(obj["mounts"] as? [[String: Any]])
        #expect(mounts.count == 1)
        #expect((mounts[0]["record"] as? [String: Any])?["backend"] as? String == "file")
        #expect(mounts[0]["mounted"] as? Bool == true)
        // Again on the same mountpoint: exit 4, one line, nothing changes.
        let again = try e.cli("mount", e.dir.file("img.erofs"), e.dir.file("mnt"))
        #expect(again.status == 4)
        #expect(again.stderr.split(separator: "\n").count == 1)
        // umount from another directory with a relative, dotted path.
        let u = try run("/bin/sh", ["-c", "cd \(e.dir.path)/tree && exec \(cliBinary) umount ../tree/../mnt/."], environment: e.env)
        #expect(u.status == 0, "\(u.stderr)")
        #expect(!currentMounts().contains(e.dir.file("mnt")))
        #expect(Set(boundLoopDevices(ignoringOtherTestsThan: e.dir)).subtracting(loops).isEmpty, "a loop device is left")
        let empty = try e.cli("status")
        #expect(empty.stdout.contains("no mounts made by erofs-compat"))
    }

    @Test func dryRunMountsNothing() throws {
        let e = try Env()
        defer { e.dir.remove() }
        let r = try e.cli("mount", "--dry-run", "--backend", "loop", e.dir.file("img.erofs"), e.dir.file("mnt"))
        #expect(r.status == 0)
        #expect(r.stdout.contains("candidates for a local image"))
        #expect(!currentMounts().contains(e.dir.file("mnt")))
        let records = (try? FileManager.default.contentsOfDirectory(atPath: e.dir.file("state/mounts"))) ?? []
        #expect(records.isEmpty)
    }

    @Test func documentedExitCodes() throws {
        let e = try Env()
        defer { e.dir.remove() }
        let cases: [([String], Int32)] = [
            (["mount", e.dir.file("nope.erofs"), e.dir.file("mnt")], 3),
            (["mount", e.dir.file("tree"), e.dir.file("mnt")], 3),
            (["mount", e.dir.file("img.erofs"), e.dir.file("nomnt")], 4),
            (["mount", "-o", "bogus", e.dir.file("img.erofs"), e.dir.file("mnt")], 2),
            (["mount", "--backend", "ublk", e.dir.file("img.erofs"), e.dir.file("mnt")], 2),
            (["mount", e.dir.file("img.erofs")], 2),
            (["umount", e.dir.file("mnt")], 6),
            (["status", e.dir.file("mnt")], 6),
            (["mount", "--password-stdin", "oci://127.0.0.1:1/a/b", e.dir.file("mnt")], 2),
            (["mount", "--username", "u", "oci://127.0.0.1:1/a/b", e.dir.file("mnt")], 2),
            (["mount", "--layer", "1", "http://127.0.0.1:1/x.erofs", e.dir.file("mnt")], 2),
            (["mount", "--layer", "1", "--blob", "sha256:" + String(repeating: "a", count: 64), "oci://127.0.0.1:1/a/b", e.dir.file("mnt")], 2),
            (["mount", "--prefetch", "all", e.dir.file("img.erofs"), e.dir.file("mnt")], 2),
            (["mount", "--prefetch", e.dir.file("noprofile"), "http://127.0.0.1:1/x.erofs", e.dir.file("mnt")], 2),
            (["mount", "oci://127.0.0.1:1/UPPER", e.dir.file("mnt")], 3),
            (["mount", "oci://127.0.0.1:1/a/b:v1", e.dir.file("mnt")], 3),
            (["mount", "--platform", "linux", "oci://127.0.0.1:1/a/b:v1", e.dir.file("mnt")], 3),
        ]
        for (args, code) in cases {
            let r = try run(cliBinary, args, environment: e.env)
            #expect(r.status == code, "\(args): \(r.stderr)")
            #expect(r.stderr.hasPrefix("erofs-compat: "), "\(args)")
            #expect(r.stderr.split(separator: "\n").count <= 2, "\(args): \(r.stderr)")
        }
        #expect(!currentMounts().contains { $0.hasPrefix(e.dir.path) })
    }

    @Test(.enabled(if: TestEnv.which("setpriv") != nil, "needs setpriv (util-linux)"))
    func unprivilegedMountIsRefusedWithExitFive() throws {
        let e = try Env()
        defer { e.dir.remove() }
        chmod(e.dir.path, 0o755)
        let r = try run(TestEnv.which("setpriv")!, ["--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all",
                                                    cliBinary, "mount", "--backend", "loop", e.dir.file("img.erofs"), e.dir.file("mnt")],
                        environment: e.env)
        #expect(r.status == 5, "\(r.stderr)")
        #expect(r.stderr.contains("needs root"))
        #expect(!currentMounts().contains(e.dir.file("mnt")))
    }

    @Test func helpListsOnlyImplementedBackends() throws {
        let r = try run(cliBinary, ["mount", "--help"])
        let flat = r.stdout.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        #expect(flat.contains("values: auto, fanotify, file, loop, fuse, fuse-blob, fuse-erofs, nbd;"), "\(flat)")
        for flag in ["oci://", "--layer", "--blob", "--platform", "--auth-file", "--username", "--password-stdin", "--insecure",
                     "--prefetch", "--record-profile"] {
            #expect(r.stdout.contains(flag), "\(flag) documented")
        }
        #expect(!r.stdout.contains("--password "), "no password on the command line")
        #expect(!r.stdout.contains("__serve"))
        let top = try run(cliBinary, ["--help"])
        for sub in ["probe", "mount", "umount", "status"] { #expect(top.stdout.contains(sub)) }
    }
}
