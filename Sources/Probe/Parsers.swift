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
