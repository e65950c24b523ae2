#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Syscall

/// Read access to the host's /proc, /sys, /dev, /lib/modules and /etc, rooted at `root` so the parsers
/// can be tested against fixture trees.
public struct Host: Sendable {
    public var root: String

    public init(root: String = "/") {
        self.root = root.hasSuffix("/") ? String(root.dropLast()) : root
    }

    /// True when this is the running system (live syscalls allowed).
    public var isLive: Bool { root.isEmpty || root == "/" }

    public func path(_ p: String) -> String { root + p }

    public func read(_ p: String) -> String? {
        guard let d = try? Sys.readFile(path(p)) else { return nil }
        return String(decoding: d, as: UTF8.self)
    }

    public func readBytes(_ p: String) -> [UInt8]? {
        try? Sys.readFile(path(p))
    }

    public func exists(_ p: String) -> Bool { FileManager.default.fileExists(atPath: path(p)) }

    public func isDirectory(_ p: String) -> Bool {
        Sys.isDirectory(path(p))
    }

    public func list(_ p: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: path(p))) ?? []).sorted()
    }
}
