#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import CHeaders

/// One line of /proc/self/mountinfo.
package struct MountInfoEntry: Sendable, Equatable {
    package var mountID: Int
    package var parentID: Int
    package var device: String
    package var root: String
    package var mountPoint: String
    package var options: String
    package var fsType: String
    package var source: String
    package var superOptions: String

    /// Parses one mountinfo line; nil when malformed.
    package init?(line: Substring) {
        let f = line.split(separator: " ", omittingEmptySubsequences: false)
        guard f.count >= 10, let sep = f.firstIndex(of: "-"), sep >= 6, sep + 2 < f.count else { return nil }
        guard let id = Int(f[0]), let pid = Int(f[1]) else { return nil }
        mountID = id
        parentID = pid
        device = String(f[2])
        root = MountInfo.unescape(f[3])
        mountPoint = MountInfo.unescape(f[4])
        options = String(f[5])
        fsType = String(f[sep + 1])
        source = MountInfo.unescape(f[sep + 2])
        superOptions = sep + 3 < f.count ? String(f[sep + 3]) : ""
    }
}

/// /proc/self/mountinfo.
package enum MountInfo {
    package static func parse(_ text: String) -> [MountInfoEntry] {
        text.split(separator: "\n").compactMap { MountInfoEntry(line: $0) }
    }

    /// Decodes the octal escapes (\040 etc.) mountinfo uses for spaces, tabs, newlines and backslashes.
    package static func unescape(_ s: Substring) -> String {
        guard s.contains("\\") else { return String(s) }
        var out = [UInt8]()
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == 0x5C, i + 3 < b.count, b[(i + 1)...(i + 3)].allSatisfy({ (0x30...0x37).contains($0) }) {
                out.append(UInt8(truncatingIfNeeded: Int(b[i + 1] - 0x30) << 6 | Int(b[i + 2] - 0x30) << 3 | Int(b[i + 3] - 0x30)))
                i += 4
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The mount that contains `path` (longest mount point prefix; last one wins for stacked mounts).
    package static func mount(containing path: String, in entries: [MountInfoEntry]) -> MountInfoEntry? {
        var best: MountInfoEntry?
        for e in entries {
            let mp = e.mountPoint
            let inside = path == mp || mp == "/" || path.hasPrefix(mp.hasSuffix("/") ? mp : mp + "/")
            if inside, mp.count >= (best?.mountPoint.count ?? -1) { best = e }
        }
        return best
    }
}

extension MountInfo {
    /// The current mount table of this process's mount namespace.
    package static func current() -> [MountInfoEntry] {
        guard let d = try? Sys.readFile("/proc/self/mountinfo") else { return [] }
        return parse(String(decoding: d, as: UTF8.self))
    }

    /// The topmost mount whose mount point is exactly `path`.
    package static func mount(at path: String, in entries: [MountInfoEntry]) -> MountInfoEntry? {
        entries.last { $0.mountPoint == path }
    }
}

extension Sys {
    /// CAP_SYS_ADMIN in the effective set (capget).
    package static func hasCapSysAdmin() -> Bool {
        var caps: UInt64 = 0
        guard ecx_effective_caps(&caps) == 0 else { return false }
        return caps & (1 << 21) != 0
    }

    /// The id of the mount holding `path` (statx STATX_MNT_ID) and whether `path` is its root.
    package static func mountIdentity(_ path: String) throws -> (id: UInt64, isRoot: Bool?) {
        var id: UInt64 = 0
        var root: Int32 = 0
        _ = try call { ecx_mount_identity(path, &id, &root) }
        return (id, root < 0 ? nil : root == 1)
    }

    /// The same for what an open descriptor (an O_PATH one too) names.
    package static func mountIdentity(fd: Int32) throws -> (id: UInt64, isRoot: Bool?) {
        var id: UInt64 = 0
        var root: Int32 = 0
        _ = try call { ecx_mount_identity_at(fd, "", &id, &root) }
        return (id, root < 0 ? nil : root == 1)
    }
}
