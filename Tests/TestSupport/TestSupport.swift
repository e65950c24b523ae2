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

/// The built CLI binary (built by `swift build` before `swift test`, as `make check` does).
public var cliBinary: String {
    for p in ["/.build/debug/erofs-compat", "/.build/release/erofs-compat"] where FileManager.default.isExecutableFile(atPath: TestEnv.repoRoot + p) {
        return TestEnv.repoRoot + p
    }
    return TestEnv.repoRoot + "/.build/debug/erofs-compat"
}
