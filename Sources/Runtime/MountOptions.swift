import Syscall

/// The `-o` options: EROFS options passed to the kernel and generic mount flags. Read-only always.
public struct MountOptions: Sendable, Equatable, Codable {
    /// EROFS options in the order given (`directio`, `cache_strategy=…`, `fsoffset=…`, xattr/acl switches).
    public var erofs: [String] = []
    public var noSuid = false
    public var noDev = false
    public var noExec = false
    public var noAtime = false
    /// Byte offset of the filesystem inside the image file (`fsoffset=`).
    public var fsOffset: UInt64 = 0
    /// `suid` / `dev` given: a remote image may keep setuid bits and device nodes working (remote
    /// mounts are nosuid,nodev otherwise: the bytes come from a server).
    public var suid = false
    public var dev = false

    public static let known = ["ro", "nosuid", "nodev", "noexec", "noatime", "directio", "cache_strategy=disabled|readahead|readaround",
                               "fsoffset=BYTES", "user_xattr", "nouser_xattr", "acl", "noacl", "suid", "dev"]

    public init() {}

    /// Parses a comma-separated `-o` list (may be given several times).
    public init(parsing lists: [String]) throws {
        for list in lists {
            for raw in list.split(separator: ",", omittingEmptySubsequences: true) {
                let opt = String(raw)
                let (key, value) = opt.firstIndex(of: "=").map { (String(opt[..<$0]), String(opt[opt.index(after: $0)...])) } ?? (opt, nil)
                switch (key, value) {
                case ("ro", nil): break
                case ("rw", _): throw RuntimeError.badOptionValue("rw", detail: "EROFS is read-only; drop 'rw'")
                case ("nosuid", nil): noSuid = true
                case ("nodev", nil): noDev = true
                case ("suid", nil): suid = true
                case ("dev", nil): dev = true
                case ("noexec", nil): noExec = true
                case ("noatime", nil): noAtime = true
                case ("directio", nil), ("user_xattr", nil), ("nouser_xattr", nil), ("acl", nil), ("noacl", nil):
                    erofs.append(key)
                case ("cache_strategy", let v?):
                    guard ["disabled", "readahead", "readaround"].contains(v) else {
                        throw RuntimeError.badOptionValue(opt, detail: "use disabled, readahead or readaround")
                    }
                    erofs.append(opt)
                case ("fsoffset", let v?):
                    guard let n = UInt64(v) else { throw RuntimeError.badOptionValue(opt, detail: "a byte count is expected") }
                    guard n % 512 == 0 else { throw RuntimeError.badOptionValue(opt, detail: "must be a multiple of the block size") }
                    fsOffset = n
                default:
                    throw RuntimeError.unknownOption(opt)
                }
            }
        }
    }

    /// The options for a remote image: nosuid and nodev unless `suid` / `dev` was given.
    public var forRemoteImage: MountOptions {
        var o = self
        if !suid { o.noSuid = true }
        if !dev { o.noDev = true }
        return o
    }

    /// fsmount attributes.
    package var attributes: MountAPI.Attributes {
        var a: MountAPI.Attributes = [.readOnly]
        if noSuid { a.insert(.noSuid) }
        if noDev { a.insert(.noDev) }
        if noExec { a.insert(.noExec) }
        if noAtime { a.insert(.noAtime) }
        return a
    }

    /// The options as `-o` would spell them (for state and status).
    public var summary: String {
        var parts = ["ro"]
        if noSuid { parts.append("nosuid") } else if suid { parts.append("suid") }
        if noDev { parts.append("nodev") } else if dev { parts.append("dev") }
        if noExec { parts.append("noexec") }
        if noAtime { parts.append("noatime") }
        parts += erofs
        if fsOffset > 0 { parts.append("fsoffset=\(fsOffset)") }
        return parts.joined(separator: ",")
    }
}
