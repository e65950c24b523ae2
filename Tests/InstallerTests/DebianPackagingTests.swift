import Foundation
import Testing
import TestSupport

/// packaging/debian agrees with what it packages: the version, the libraries loaded at run time, and
/// the manual page's tidying.
@Suite struct DebianPackagingTests {
    let debian = TestEnv.repoRoot + "/packaging/debian/"

    func read(_ path: String) throws -> String { try String(contentsOfFile: path, encoding: .utf8) }

    /// The Debian packages named in control's Depends field.
    func depends() throws -> Set<String> {
        let control = try read(debian + "control")
        let lines = control.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        guard let start = lines.firstIndex(where: { $0.hasPrefix("Depends:") }) else { return [] }
        var field = String(lines[start].dropFirst("Depends:".count))
        for line in lines[(start + 1)...] {
            if line.hasPrefix("#") { continue }
            guard line.hasPrefix(" ") else { break }
            field += line
        }
        return Set(field.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).split(separator: " ")[0] }.map(String.init))
    }

    @Test func dependsOnEveryLibraryLoadedAtRunTime() throws {
        // The shim loads each library by SONAME and names its package in the message for a missing one.
        let shim = try read(TestEnv.repoRoot + "/Sources/CHeaders/shim.c")
        let pairs = try Regex(#""(lib[a-z0-9]+\.so\.[0-9]+)", "([a-z0-9.+-]+)""#)
        var packages = Set(shim.matches(of: pairs).map { String($0.output[2].substring ?? "") })
        #expect(shim.contains("\"libcurl.so.4\""))
        packages.insert("libcurl4")
        #expect(packages.count >= 8, "\(packages)")
        let deps = try depends()
        for p in packages.sorted() { #expect(deps.contains(p), "control's Depends lacks \(p)") }
    }

    @Test func changelogVersionIsTheToolVersion() throws {
        let first = try read(debian + "changelog").split(separator: "\n")[0]
        let version = try #require(first.firstMatch(of: try Regex(#"^erofs-compat \(([^)-]+)-[^)]+\)"#))?.output[1].substring)
        let reported = try run(cliBinary, ["--version"])
        #expect(reported.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == String(version))
    }

    @Test func unitsComeFromPackagingSystemd() throws {
        // build-deb.sh copies packaging/systemd's units (kept equal to `install --systemd` by
        // SystemdUnitTests) into debian/: none may be kept in packaging/debian itself.
        let own = try FileManager.default.contentsOfDirectory(atPath: debian)
        #expect(!own.contains { $0.hasSuffix(".service") || $0.hasSuffix(".socket") })
        let script = try read(TestEnv.repoRoot + "/scripts/build-deb.sh")
        #expect(script.contains("packaging/systemd/erofs-compat.service packaging/systemd/erofs-compat.socket"))
    }

    @Test func manualTidyingDropsTheInternalCommandAndEmptyLines() throws {
        let dir = try ScratchDir("manual")
        defer { dir.remove() }
        let page = """
            .Sh DESCRIPTION
            Intro.

            More.
            .Bl -tag -width 6n
            .It Em daemon
            Serve.
            .Bl -tag -width 6n
            .It Fl h
            Help.
            .El
            .It Em __serve
            Internal.
            .Bl -tag -width 6n
            .It Fl -adopt
            Adopt.
            .El
            .It Em help
            Show help.
            .El
            .Bl -tag -width 6n
            .It Em __serve
            Last item.
            .El
            """
        try page.write(toFile: dir.file("in.1"), atomically: true, encoding: .utf8)
        let out = try run("/usr/bin/awk", ["-f", debian + "tidy-manual.awk", dir.file("in.1")])
        #expect(out.status == 0, "\(out.stderr)")
        let lines = out.stdout.split(separator: "\n", omittingEmptySubsequences: false).dropLast().map(String.init)
        #expect(lines == [".Sh DESCRIPTION", "Intro.", ".Pp", "More.", ".Bl -tag -width 6n", ".It Em daemon", "Serve.",
                          ".Bl -tag -width 6n", ".It Fl h", "Help.", ".El", ".It Em help", "Show help.", ".El",
                          ".Bl -tag -width 6n", ".El"])
    }
}
