import Foundation
import Glibc
import Syscall

/// Helpers shared by the test targets: scratch directories on a real disk filesystem, running tools,
/// and the reasons a live test is skipped.
public enum TestEnv {
    /// True when running as root (most live kernel tests need CAP_SYS_ADMIN).
    public static var isRoot: Bool { geteuid() == 0 }

    /// The repository root (two levels above this file's directory).
    public static let repoRoot: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()

    /// A base directory on a disk filesystem (ext4/xfs/btrfs), never tmpfs: fanotify pre-content marks
    /// and file-backed EROFS mounts do not work on tmpfs.
    public static let scratchBase: String = {
        for candidate in [ProcessInfo.processInfo.environment["EROFS_COMPAT_TEST_DIR"], "/var/tmp", repoRoot + "/.build"] {
            guard let c = candidate, let st = try? Sys.statfs(c) else { continue }
            if !FilesystemMagic.isMemoryBacked(UInt64(bitPattern: Int64(st.f_type))) { return c }
        }
        return repoRoot + "/.build"
    }()

    /// Which tool binary a missing-tool skip should name.
    public static func which(_ tool: String) -> String? {
        for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
            let p = dir + "/" + tool
            if access(p, X_OK) == 0 { return p }
        }
        return nil
    }
}

/// A unique scratch directory removed by `remove()` (call it in `defer`).
public final class ScratchDir: @unchecked Sendable {
    public let path: String

    public init(_ label: String = "t") throws {
        let template = TestEnv.scratchBase + "/erofs-compat-\(label)-XXXXXX"
        var bytes = Array(template.utf8CString)
        guard let p = mkdtemp(&bytes) else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        path = String(cString: p)
    }

    public func file(_ name: String) -> String { path + "/" + name }

    /// Unmounts anything still mounted below the directory, then removes it.
    public func remove() {
        if let mounts = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) {
            for line in mounts.split(separator: "\n").reversed() {
                let f = line.split(separator: " ")
                if f.count > 4, f[4].hasPrefix(path) { _ = umount2(String(f[4]), Int32(MNT_DETACH)) }
            }
        }
        try? FileManager.default.removeItem(atPath: path)
    }
}

/// The result of running a program.
public struct RunResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String

    public init(status: Int32, stdout: String, stderr: String) {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
    }
}

/// Runs an executable with arguments and captures its output (stdin is /dev/null).
@discardableResult
public func run(_ executable: String, _ args: [String], environment: [String: String]? = nil, stdin: String? = nil) throws -> RunResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    if let environment { p.environment = environment }
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    let inPipe = Pipe()
    p.standardInput = stdin == nil ? FileHandle.nullDevice : inPipe
    try p.run()
    if let stdin {
        inPipe.fileHandleForWriting.write(Data(stdin.utf8))
        try? inPipe.fileHandleForWriting.close()
    }
    // Read both pipes concurrently to avoid a full-pipe deadlock.
    final class Box: @unchecked Sendable { var data = Data() }
    let errBox = Box()
    let group = DispatchGroup()
    group.enter()
    DispatchQueue.global().async {
        errBox.data = err.fileHandleForReading.readDataToEndOfFile()
        group.leave()
    }
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    group.wait()
    let errData = errBox.data
    p.waitUntilExit()
    return RunResult(status: p.terminationStatus,
                     stdout: String(decoding: outData, as: UTF8.self),
                     stderr: String(decoding: errData, as: UTF8.self))
}

/// A fake host root for parser tests: files written under a scratch directory.
public final class FixtureRoot: @unchecked Sendable {
    public let dir: ScratchDir
    public var root: String { dir.path }

    public init() throws { dir = try ScratchDir("root") }

    /// Writes `text` to `path` (absolute inside the fake root), creating parents.
    public func write(_ path: String, _ text: String) throws {
        let full = root + path
        try FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try text.write(toFile: full, atomically: false, encoding: .utf8)
    }

    public func mkdir(_ path: String) throws {
        try FileManager.default.createDirectory(atPath: root + path, withIntermediateDirectories: true)
    }

    public func remove() { dir.remove() }
}

/// Mount points currently present, for leak checks.
public func currentMounts() -> [String] {
    ((try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? "")
        .split(separator: "\n").map { String($0.split(separator: " ")[4]) }
}

/// Loop devices with a backing file, for leak checks.
public func boundLoopDevices() -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? [])
        .filter { $0.hasPrefix("loop") && FileManager.default.fileExists(atPath: "/sys/block/\($0)/loop/backing_file") }
        .sorted()
}

/// The file behind a bound loop device ("loop3"), if any.
public func loopBackingFile(_ device: String) -> String? {
    (try? String(contentsOfFile: "/sys/block/\(device)/loop/backing_file", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
}

/// Bound loop devices, leaving out those backed by files in other tests' scratch directories.
public func boundLoopDevices(ignoringOtherTestsThan mine: ScratchDir) -> [String] {
    boundLoopDevices().filter { loopBackingFile($0).map { !inOtherTestsScratch($0, mine: mine) } ?? true }
}

/// Whether `path` lies in another test's scratch directory: suites run in parallel and mount there, so
/// a leak check on the whole host must leave those out.
public func inOtherTestsScratch(_ path: String, mine: ScratchDir) -> Bool {
    path.hasPrefix(TestEnv.scratchBase + "/erofs-compat-") && !(path == mine.path || path.hasPrefix(mine.path + "/"))
}

/// The built CLI binary (built by `swift build` before `swift test`, as `make check` does).
/// Writes a script and makes it executable, through a close-on-exec descriptor: a child another test
/// thread spawns meanwhile must not keep it open for writing (exec of it would fail with ETXTBSY).
public func writeExecutable(_ path: String, _ text: String) throws {
    let fd = try Sys.open(path, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o755)
    defer { Sys.close(fd.rawValue) }
    try Array(text.utf8).withUnsafeBytes { try Sys.pwriteAll(fd.rawValue, $0, at: 0) }
    _ = fchmod(fd.rawValue, 0o755)
}

public var cliBinary: String {
    for p in ["/.build/debug/erofs-compat", "/.build/release/erofs-compat"] where FileManager.default.isExecutableFile(atPath: TestEnv.repoRoot + p) {
        return TestEnv.repoRoot + p
    }
    return TestEnv.repoRoot + "/.build/debug/erofs-compat"
}

/// Sample trees and images built with Debian's mkfs.erofs.
public enum Samples {
    /// Writes a small but varied tree: nested dirs, empty and block-boundary-sized files, random data,
    /// a symlink, a long name.
    public static func makeTree(at root: String, seed: UInt64 = 42) throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: root + "/dir/sub/deeper", withIntermediateDirectories: true)
        var rng = SplitMix(seed: seed)
        for (name, size) in [("empty", 0), ("one", 1), ("block", 4096), ("block+1", 4097), ("dir/a.txt", 100),
                             ("dir/sub/big.bin", 300_000), ("dir/sub/deeper/c", 8191), (String(repeating: "n", count: 200), 10)] {
            var bytes = [UInt8](repeating: 0, count: size)
            for i in 0..<size { bytes[i] = UInt8(truncatingIfNeeded: rng.next() >> 7) }
            if name.hasSuffix(".txt") { bytes = Array(String(repeating: "text line\n", count: 1000).utf8) }
            try Data(bytes).write(to: URL(fileURLWithPath: root + "/" + name))
        }
        try fm.createSymbolicLink(atPath: root + "/link", withDestinationPath: "dir/a.txt")
        chmod(root + "/dir/a.txt", 0o640)
    }

    /// mkfs.erofs --quiet [extra] IMAGE TREE.
    public static func mkfs(_ tree: String, _ image: String, _ extra: [String] = []) throws {
        guard let mk = TestEnv.which("mkfs.erofs") else { throw POSIXError(.ENOENT) }
        let r = try run(mk, ["--quiet"] + extra + [image, tree])
        guard r.status == 0 else { throw SampleError.mkfs(r.stderr) }
    }

    public enum SampleError: Error { case mkfs(String) }

    /// Differences between two trees: bytes of every file, symlink targets, permission bits, names.
    public static func compare(_ a: String, _ b: String) -> [String] {
        var diffs: [String] = []
        let fm = FileManager.default
        let left = Set((fm.subpaths(atPath: a) ?? []))
        let right = Set((fm.subpaths(atPath: b) ?? []))
        if left != right { diffs.append("names differ: only in source \(left.subtracting(right).sorted()), only in mount \(right.subtracting(left).sorted())") }
        for p in left.intersection(right).sorted() {
            var sa = stat(), sb = stat()
            lstat(a + "/" + p, &sa); lstat(b + "/" + p, &sb)
            if sa.st_mode & 0o7777 != sb.st_mode & 0o7777 || sa.st_mode & S_IFMT != sb.st_mode & S_IFMT { diffs.append("\(p): mode"); continue }
            switch sa.st_mode & S_IFMT {
            case S_IFLNK:
                if (try? fm.destinationOfSymbolicLink(atPath: a + "/" + p)) != (try? fm.destinationOfSymbolicLink(atPath: b + "/" + p)) { diffs.append("\(p): link target") }
            case S_IFREG:
                if fm.contents(atPath: a + "/" + p) != fm.contents(atPath: b + "/" + p) { diffs.append("\(p): content") }
            default: break
            }
        }
        return diffs
    }
}

/// A small deterministic PRNG for test data.
public struct SplitMix {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Trees that exercise the EROFS reader.
public enum ReaderTrees {
    /// Several MB of real files: licenses, time zones (symlinks and hard links) and shared libraries.
    public static func makeReal(at root: String, budget: Int = 4 << 20) throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: root, withIntermediateDirectories: true)
        for dir in ["/usr/share/common-licenses", "/usr/share/zoneinfo/Europe", "/usr/share/zoneinfo/America"] where fm.fileExists(atPath: dir) {
            _ = try run("/bin/cp", ["-a", dir, root + "/" + dir.split(separator: "/").joined(separator: "_")])
        }
        var used = 0
        try fm.createDirectory(atPath: root + "/lib", withIntermediateDirectories: true)
        let libdir = "/usr/lib/x86_64-linux-gnu"
        for name in ((try? fm.contentsOfDirectory(atPath: libdir)) ?? []).sorted() where name.contains(".so.") {
            let p = libdir + "/" + name
            guard let attrs = try? fm.attributesOfItem(atPath: p), attrs[.type] as? FileAttributeType == .typeRegular,
                  let size = attrs[.size] as? Int, size < 1 << 20 else { continue }
            if used + size > budget { break }
            _ = try run("/bin/cp", ["-a", p, root + "/lib/" + name])
            used += size
        }
    }

    /// Edge cases: empty files, sizes around block boundaries, deep paths, long names, hard links,
    /// a directory with thousands of entries, xattrs, devices and a FIFO (as root), symlinks.
    public static func makeEdge(at root: String) throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: root, withIntermediateDirectories: true)
        var rng = SplitMix(seed: 7)
        func file(_ path: String, _ size: Int, compressible: Bool = false) throws {
            var b = [UInt8](repeating: 0, count: size)
            for i in 0..<size { b[i] = compressible ? UInt8(truncatingIfNeeded: i / 64 % 7 + 97) : UInt8(truncatingIfNeeded: rng.next()) }
            try Data(b).write(to: URL(fileURLWithPath: root + "/" + path))
        }
        try fm.createDirectory(atPath: root + "/sizes", withIntermediateDirectories: true)
        for s in [0, 1, 511, 512, 513, 4095, 4096, 4097, 8191, 8192, 8193, 65535, 65536, 65537, 200_000] {
            try file("sizes/r\(s)", s)
            try file("sizes/c\(s)", s, compressible: true)
        }
        var deep = "deep"
        for i in 0..<24 { deep += "/level\(i)" }
        try fm.createDirectory(atPath: root + "/" + deep, withIntermediateDirectories: true)
        try file(deep + "/leaf", 1234)
        try file(String(repeating: "L", count: 200), 10)  // mkfs.erofs 1.5 fails on 255-byte names
        try fm.createDirectory(atPath: root + "/many", withIntermediateDirectories: true)
        for i in 0..<3000 { try Data("entry \(i)\n".utf8).write(to: URL(fileURLWithPath: root + "/many/f\(String(i, radix: 36))-\(i % 7)")) }
        try file("hard-a", 5000)
        try fm.linkItem(atPath: root + "/hard-a", toPath: root + "/hard-b")
        try fm.linkItem(atPath: root + "/hard-a", toPath: root + "/sizes/hard-c")
        try fm.createSymbolicLink(atPath: root + "/sym-short", withDestinationPath: "hard-a")
        try fm.createSymbolicLink(atPath: root + "/sym-long", withDestinationPath: String(repeating: "x/", count: 1000) + "end")
        try fm.createSymbolicLink(atPath: root + "/sym-dangling", withDestinationPath: "/nonexistent/target")
        try file("xattrs", 100)
        try Sys.lsetxattr(root + "/xattrs", "user.comment", Array("hello".utf8))
        try Sys.lsetxattr(root + "/xattrs", "user.empty", [])
        try Sys.lsetxattr(root + "/xattrs", "user.big", [UInt8](repeating: 0x42, count: 300))
        for name in ["r1", "r512", "r4096"] { try Sys.lsetxattr(root + "/sizes/" + name, "user.shared", Array("same-value".utf8)) }
        if geteuid() == 0 {
            try Sys.lsetxattr(root + "/xattrs", "trusted.t", Array("trusted-value".utf8))
            try Sys.mknod(root + "/chardev", mode: UInt32(S_IFCHR) | 0o640, device: Sys.makedev(1, 3))
            try Sys.mknod(root + "/blockdev", mode: UInt32(S_IFBLK) | 0o600, device: Sys.makedev(7, 300))
            chown(root + "/sizes/r1", 1234, 5678)
        }
        mkfifo(root + "/fifo", 0o644)
        chmod(root + "/sizes/r512", 0o4755)
        chmod(root + "/deep", 0o1777)
    }
}

/// A real nginx on 127.0.0.1 serving a scratch directory: `/` honours Range, `/norange/` answers
/// every request with 200 and the whole file (max_ranges 0).
public final class NginxServer: @unchecked Sendable {
    public let dir: ScratchDir
    public private(set) var port: Int = 0
    public var root: String { dir.file("www") }
    public var base: String { "http://127.0.0.1:\(port)" }
    private var process: ServerProcess?

    public static var available: Bool { TestEnv.which("nginx") != nil }

    public init() throws {
        dir = try ScratchDir("nginx")
        try FileManager.default.createDirectory(atPath: dir.file("www"), withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: dir.file("tmp"), withIntermediateDirectories: true)
        var lastError = ""
        for _ in 0..<10 {
            let port = Int.random(in: 20000...60000)
            self.port = port
            if try start() { return }
            lastError = (try? String(contentsOfFile: dir.file("error.log"), encoding: .utf8)) ?? "nginx did not start"
        }
        dir.remove()
        throw POSIXError(.EADDRINUSE, userInfo: ["nginx": lastError])
    }

    /// Starts (or restarts, on the same port) nginx; false when it could not listen.
    @discardableResult
    public func start() throws -> Bool {
        let conf = """
            daemon off;
            user root;
            worker_processes 2;
            pid \(dir.file("nginx.pid"));
            error_log \(dir.file("error.log")) warn;
            events { worker_connections 256; }
            http {
                access_log off;
                client_body_temp_path \(dir.file("tmp"));
                proxy_temp_path \(dir.file("tmp"));
                fastcgi_temp_path \(dir.file("tmp"));
                uwsgi_temp_path \(dir.file("tmp"));
                scgi_temp_path \(dir.file("tmp"));
                keepalive_requests 100000;
                server {
                    listen 127.0.0.1:\(port);
                    root \(dir.file("www"));
                    location /norange/ { alias \(dir.file("www"))/; max_ranges 0; }
                }
            }
            """
        try conf.write(toFile: dir.file("nginx.conf"), atomically: false, encoding: .utf8)
        process = try TCP.startListening(TestEnv.which("nginx")!, ["-c", dir.file("nginx.conf"), "-p", dir.path], port: port,
                                         log: dir.file("stderr.log"))
        return process != nil
    }

    /// Stops the server (`start()` brings it back on the same port).
    public func stop() {
        process?.stop()
        process = nil
    }

    public func remove() {
        stop()
        dir.remove()
    }
}

/// Mounts `image` file-backed and read-only at `mnt` (the kernel as an oracle) for `body`.
public func withKernelMount<T>(_ image: String, _ mnt: String, _ body: () throws -> T) throws -> T {
    let fc = try MountAPI.fsopen("erofs")
    try MountAPI.setString(fc, "source", image)
    try MountAPI.setFlag(fc, "ro")
    try MountAPI.create(fc)
    try MountAPI.attach(fc, attributes: [.readOnly], at: mnt)
    defer { try? MountAPI.umount(mnt, detach: true) }
    return try body()
}

/// Everything `lstat` and the filesystem say about a tree, keyed by path.
public struct TreeFacts: Equatable, CustomStringConvertible {
    public var entries: [String: String] = [:]
    public var description: String { entries.keys.sorted().prefix(5).map { "\($0): \(entries[$0]!)" }.joined(separator: "\n") }

    public init(_ root: String, content: Bool, times: Bool = true) {
        let fm = FileManager.default
        var inodes: [UInt64: String] = [:]
        for p in (fm.subpaths(atPath: root) ?? []).sorted() {
            let full = root + "/" + p
            var st = stat()
            lstat(full, &st)
            // Directory sizes are filesystem-specific; everything else must match.
            var desc = "mode \(String(st.st_mode, radix: 8)) uid \(st.st_uid) gid \(st.st_gid)"
            if st.st_mode & S_IFMT != S_IFDIR { desc += " size \(st.st_size)" }
            if st.st_mode & S_IFMT != S_IFDIR { desc += " nlink \(st.st_nlink)" }
            if times, st.st_mode & S_IFMT != S_IFLNK { desc += " mtime \(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)" }
            switch st.st_mode & S_IFMT {
            case S_IFLNK: desc += " -> " + ((try? fm.destinationOfSymbolicLink(atPath: full)) ?? "?")
            case S_IFREG:
                if content, let d = Self.contents(full) { desc += " sum \(d.reduce(into: UInt64(1469598103934665603)) { $0 = ($0 ^ UInt64($1)) &* 1099511628211 })" }
                if st.st_nlink > 1 {
                    if let first = inodes[UInt64(st.st_ino)] { desc += " linked-to \(first)" } else { inodes[UInt64(st.st_ino)] = p }
                }
            case S_IFCHR, S_IFBLK: desc += " rdev \(st.st_rdev)"
            default: break
            }
            if let x = try? Sys.listXattrs(full), !x.isEmpty {
                desc += " xattrs " + x.keys.sorted().map { "\($0)=\(x[$0]!.count)b:\(x[$0]!.reduce(0) { $0 &+ Int($1) })" }.joined(separator: ",")
            }
            entries[p] = desc
        }
    }

    /// A file's bytes, read through a close-on-exec descriptor: a process another test spawns at
    /// that moment must not inherit it (and keep the mount busy for its whole life).
    static func contents(_ path: String) -> [UInt8]? {
        guard let fd = try? Sys.open(path, O_RDONLY) else { return nil }
        defer { Sys.close(fd.rawValue) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            guard let n = try? buf.withUnsafeMutableBytes({ try Sys.pread(fd.rawValue, into: $0, at: Int64(out.count)) }) else { return nil }
            if n == 0 { return out }
            out += buf[0..<n]
        }
    }

    public func diff(_ other: TreeFacts) -> [String] {
        var out: [String] = []
        for k in Set(entries.keys).union(other.entries.keys).sorted() where entries[k] != other.entries[k] {
            out.append("\(k): \(entries[k] ?? "missing") vs \(other.entries[k] ?? "missing")")
        }
        return out
    }
}
