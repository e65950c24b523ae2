import Foundation
import Testing
import TestSupport

/// `erofs-compat image …` as users run it.
@Suite(.enabled(if: TestEnv.which("mkfs.erofs") != nil, "needs mkfs.erofs (erofs-utils)"))
struct ImageCLITests {
    @Test func lsCatStatExtractMetaRanges() throws {
        let dir = try ScratchDir("cli-image")
        defer { dir.remove() }
        try Samples.makeTree(at: dir.file("tree"))
        try Samples.mkfs(dir.file("tree"), dir.file("img"), ["-zlz4hc"])
        let ls = try run(cliBinary, ["image", "ls", dir.file("img")])
        #expect(ls.status == 0)
        #expect(ls.stdout.split(separator: "\n").contains("block+1"))
        let lsl = try run(cliBinary, ["image", "ls", "-l", dir.file("img"), "/"])
        #expect(lsl.stdout.contains("link -> dir/a.txt"))
        #expect(lsl.stdout.contains("-rw-r-----") || lsl.stdout.contains("drwx"))
        let cat = try run(cliBinary, ["image", "cat", dir.file("img"), "/dir/a.txt"])
        #expect(cat.stdout == (try String(contentsOfFile: dir.file("tree/dir/a.txt"), encoding: .utf8)))
        let stat = try run(cliBinary, ["image", "stat", "--extents", dir.file("img"), "/dir/a.txt"])
        #expect(stat.stdout.contains("mode:    -rw-r----- (0640)"))
        #expect(stat.stdout.contains("extent 0"))
        let ex = try run(cliBinary, ["image", "extract", dir.file("img"), dir.file("out")])
        #expect(ex.status == 0, "\(ex.stderr)")
        #expect(Samples.compare(dir.file("tree"), dir.file("out")) == [])
        let mr = try run(cliBinary, ["image", "meta-ranges", "--json", dir.file("img")])
        let obj = try #require(try JSONSerialization.jsonObject(with: Data(mr.stdout.utf8)) as? [String: Any])
        #expect((obj["totalBytes"] as? Int ?? 0) > 0)
        #expect(!((obj["ranges"] as? [Any]) ?? []).isEmpty)
    }

    @Test func errorsHaveDocumentedCodes() throws {
        let dir = try ScratchDir("cli-image-err")
        defer { dir.remove() }
        try Samples.makeTree(at: dir.file("tree"))
        try Samples.mkfs(dir.file("tree"), dir.file("img"))
        try Data(repeating: 7, count: 8192).write(to: URL(fileURLWithPath: dir.file("junk")))
        try FileManager.default.createDirectory(atPath: dir.file("full"), withIntermediateDirectories: true)
        try Data("x".utf8).write(to: URL(fileURLWithPath: dir.file("full/x")))
        let cases: [([String], Int32)] = [
            (["image", "ls", dir.file("missing")], 3),
            (["image", "ls", dir.file("junk")], 3),
            (["image", "cat", dir.file("img"), "/nope"], 4),
            (["image", "cat", dir.file("img"), "/dir"], 4),
            (["image", "ls", dir.file("img"), "/one/x"], 4),
            (["image", "extract", dir.file("img"), dir.file("full")], 2),
            (["image", "bogus"], 2),
        ]
        for (args, code) in cases {
            let r = try run(cliBinary, args)
            #expect(r.status == code, "\(args): \(r.stderr)")
            #expect(r.stderr.hasPrefix("erofs-compat: "), "\(args): \(r.stderr)")
        }
    }

    /// `image verity` prints what `fsverity digest` prints for every fixture image, and `--tree`
    /// writes the same tree.
    @Test(.enabled(if: TestEnv.which("fsverity") != nil, "needs fsverity (Debian's fsverity-utils)"))
    func verityMatchesFsverityUtils() throws {
        let dir = try ScratchDir("cli-verity")
        defer { dir.remove() }
        let fixtures = TestEnv.repoRoot + "/Tests/Fixtures/mkfs-erofs-1.9.3"
        for name in try FileManager.default.contentsOfDirectory(atPath: fixtures).filter({ $0.hasSuffix(".erofs") }).sorted() {
            let image = fixtures + "/" + name
            let ours = try run(cliBinary, ["image", "verity", image, "--tree", dir.file("ours")])
            let theirs = try run(TestEnv.which("fsverity")!, ["digest", image, "--out-merkle-tree=" + dir.file("theirs")])
            #expect(ours.status == 0 && ours.stdout == theirs.stdout, "\(name): \(ours.stdout) \(ours.stderr) vs \(theirs.stdout)")
            #expect(FileManager.default.contentsEqual(atPath: dir.file("ours"), andPath: dir.file("theirs")), "\(name): trees differ")
        }
    }
}
