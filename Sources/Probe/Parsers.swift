#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// /proc/filesystems: the registered filesystem types (with `nodev` stripped).
public enum ProcFilesystems {
    public static func parse(_ text: String) -> Set<String> {
        var out = Set<String>()
        for line in text.split(separator: "\n") {
            let parts = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if let last = parts.last { out.insert(String(last)) }
        }
        return out
    }
}

/// A kernel .config (from /proc/config.gz or /boot/config-RELEASE): CONFIG_X → "y" / "m" / value.
public struct KernelConfig: Sendable, Equatable {
    public var values: [String: String]
    /// Where it was read from.
    public var source: String

    public init(parsing text: String, source: String) {
        self.init(parsing: Array(text.utf8), source: source)
    }

    /// Parses raw bytes line by line (a distribution config has thousands of lines).
    public init(parsing bytes: [UInt8], source: String) {
        var v: [String: String] = [:]
        let prefix = Array("CONFIG_".utf8), unsetPrefix = Array("# CONFIG_".utf8), unsetSuffix = Array(" is not set".utf8)
        bytes.withUnsafeBufferPointer { buf in
            var start = 0
            while start < buf.count {
                var end = start
                while end < buf.count, buf[end] != 0x0A { end += 1 }
                let line = UnsafeBufferPointer(rebasing: buf[start..<end])
                if line.starts(with: prefix), let eq = line.firstIndex(of: 0x3D) {
                    var value = line[(eq + 1)...]
                    if value.first == 0x22, value.last == 0x22, value.count >= 2 { value = value.dropFirst().dropLast() }
                    v[String(decoding: line[..<eq], as: UTF8.self)] = String(decoding: value, as: UTF8.self)
                } else if line.starts(with: unsetPrefix), line.count > unsetPrefix.count + unsetSuffix.count,
                          line[(line.count - unsetSuffix.count)...].elementsEqual(unsetSuffix) {
                    v[String(decoding: line[2..<(line.count - unsetSuffix.count)], as: UTF8.self)] = "n"
                }
                start = end + 1
            }
        }
        values = v
        self.source = source
    }

    /// "y", "m", "n" (explicitly unset or missing), or a value.
    public func value(_ key: String) -> String { values[key] ?? "n" }
    public func enabled(_ key: String) -> Bool { let v = value(key); return v == "y" || v == "m" }
}

/// One line of /proc/self/mountinfo.
public struct MountInfoEntry: Sendable, Equatable {
    public var mountID: Int
    public var parentID: Int
    public var device: String
    public var root: String
    public var mountPoint: String
    public var options: String
    public var fsType: String
    public var source: String
    public var superOptions: String

    /// Parses one mountinfo line; nil when malformed.
    public init?(line: Substring) {
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
public enum MountInfo {
    public static func parse(_ text: String) -> [MountInfoEntry] {
        text.split(separator: "\n").compactMap { MountInfoEntry(line: $0) }
    }

    /// Decodes the octal escapes (\040 etc.) mountinfo uses for spaces, tabs, newlines and backslashes.
    public static func unescape(_ s: Substring) -> String {
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
    public static func mount(containing path: String, in entries: [MountInfoEntry]) -> MountInfoEntry? {
        var best: MountInfoEntry?
        for e in entries {
            let mp = e.mountPoint
            let inside = path == mp || mp == "/" || path.hasPrefix(mp.hasSuffix("/") ? mp : mp + "/")
            if inside, mp.count >= (best?.mountPoint.count ?? -1) { best = e }
        }
        return best
    }
}

/// /proc/self/status capability sets.
public enum ProcStatus {
    /// The CapEff mask, nil when the field is missing.
    public static func effectiveCapabilities(_ text: String) -> UInt64? {
        for line in text.split(separator: "\n") where line.hasPrefix("CapEff:") {
            return UInt64(String(line.dropFirst("CapEff:".count)).trimmed, radix: 16)
        }
        return nil
    }

    public static let capSysAdmin = 21
}

/// /proc/self/uid_map: the initial namespace maps the full 32-bit range onto itself.
public enum UIDMap {
    public static func isInitialNamespace(_ text: String) -> Bool {
        let lines = text.split(separator: "\n")
        guard lines.count == 1 else { return false }
        let f = lines[0].split(whereSeparator: { $0 == " " || $0 == "\t" })
        return f.count == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295"
    }
}

/// /proc/devices: block and character majors by driver name.
public enum ProcDevices {
    public static func parse(_ text: String) -> (character: [String: Int], block: [String: Int]) {
        var chr: [String: Int] = [:], blk: [String: Int] = [:]
        var inBlock = false
        for line in text.split(separator: "\n") {
            if line.hasPrefix("Character devices") { inBlock = false; continue }
            if line.hasPrefix("Block devices") { inBlock = true; continue }
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count == 2, let major = Int(f[0]) else { continue }
            if inBlock { blk[String(f[1])] = major } else { chr[String(f[1])] = major }
        }
        return (chr, blk)
    }
}
