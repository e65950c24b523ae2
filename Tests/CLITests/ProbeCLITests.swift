import Foundation
import Testing
import TestSupport

/// The `erofs-compat` binary as users run it.
@Suite(.serialized) struct ProbeCLITests {
    @Test func jsonHasSchemaVersionAndExitCodeMatches() throws {
        let dir = try ScratchDir("cli")
        defer { dir.remove() }
        let r = try run(cliBinary, ["probe", "--json", "--cache-dir", dir.path])
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        let obj = try #require(json)
        #expect(obj["schemaVersion"] as? Int == 1)
        let findings = try #require(obj["findings"] as? [[String: Any]])
        #expect(findings.contains { $0["id"] as? String == "kernel.release" })
        for f in findings {
            #expect(["present", "absent", "unknown"].contains(f["status"] as? String ?? ""))
            #expect(!((f["evidence"] as? [Any]) ?? []).isEmpty, "finding \(f["id"] ?? "?") has evidence")
        }
        let plans = try #require(obj["plans"] as? [[String: Any]])
        #expect(plans.count == 2)
        let localViable = (plans[0]["candidates"] as? [[String: Any]] ?? []).contains { $0["verdict"] as? String == "viable" }
        #expect(r.status == (localViable ? 0 : 1))
    }

    /// The Debian libraries are loaded on first use: with one of them unreadable (an empty file bound
    /// over it in a private mount namespace), a command that needs none still works, and one that
    /// needs it stops with one line naming the library and the package, exit 70.
    @Test(.enabled(if: TestEnv.isRoot && TestEnv.which("unshare") != nil && FileManager.default.fileExists(atPath: "/lib/x86_64-linux-gnu/libkmod.so.2"),
                   "needs root, unshare(1) and /lib/x86_64-linux-gnu/libkmod.so.2"))
    func missingLibraryIsNamedOnlyWhenNeeded() throws {
        func withoutKmod(_ args: String) throws -> RunResult {
            try run(TestEnv.which("unshare")!, ["-m", "sh", "-c", "mount --bind /dev/null /lib/x86_64-linux-gnu/libkmod.so.2 && exec \(cliBinary) \(args)"])
        }
        let version = try withoutKmod("--version")
        #expect(version.status == 0, Comment(rawValue: version.stderr))
        let probe = try withoutKmod("probe")
        #expect(probe.status == 70, "\(probe.status)")
        #expect(probe.stderr.contains("cannot load libkmod.so.2") && probe.stderr.contains("install Debian's libkmod2"), Comment(rawValue: probe.stderr))
        #expect(probe.stderr.split(separator: "\n").count == 1, Comment(rawValue: probe.stderr))
    }

    @Test func tableHasNoColourWithoutTerminal() throws {
        let r = try run(cliBinary, ["probe"])
        #expect(!r.stdout.contains("\u{1B}["))
        #expect(r.stdout.contains("backend for a local image"))
    }

    @Test func usageErrorsExitTwoWithOneLine() throws {
        let r = try run(cliBinary, ["probe", "--bogus"])
        #expect(r.status == 2)
        #expect(r.stderr.hasPrefix("erofs-compat: "))
        let missing = try run(cliBinary, ["probe", "/nonexistent/image.erofs"])
        #expect(missing.status == 2)
        #expect(missing.stderr.contains("/nonexistent/image.erofs"))
        #expect(missing.stdout.isEmpty)
        let rel = try run(cliBinary, ["probe", "--cache-dir", "relative/dir"])
        #expect(rel.status == 2)
    }

    @Test(.enabled(if: TestEnv.isRoot && TestEnv.which("setpriv") != nil, "needs root and setpriv (util-linux) to drop to uid 65534"))
    func unprivilegedRunGivesUnknownNotErrors() throws {
        let r = try run(TestEnv.which("setpriv")!, ["--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all",
                                                    cliBinary, "probe", "--json", "--cache-dir", "/var/tmp"])
        #expect(r.status == 0 || r.status == 1, "stderr: \(r.stderr)")
        let obj = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
        let findings = try #require(obj["findings"] as? [[String: Any]])
        func status(_ id: String) -> String? { findings.first { $0["id"] as? String == id }?["status"] as? String }
        #expect(status("privileges.cap_sys_admin") == "absent")
        #expect(status("fanotify.pre_access") == "unknown")
        #expect(status("erofs.file_backed") == "unknown")
        #expect(status("loop.configure") == "unknown")
        let ev = findings.first { $0["id"] as? String == "erofs.file_backed" }?["evidence"] as? [[String: String]]
        #expect(ev?.contains { $0["result"]?.contains("CAP_SYS_ADMIN") == true } == true)
    }
}
