#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Probe

/// A direct JSON form of `MountRecord` for the mount/umount hot path: the record is a flat object of
/// strings and numbers, and Codable's generic machinery costs more than the mount itself. The output
/// is the same JSON a `JSONEncoder` with sorted keys writes; reading falls back to `JSONDecoder` for
/// anything this reader does not recognise.
extension MountRecord {
    /// The record as pretty-printed JSON with sorted keys.
    func jsonBytes() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(512)
        out.append(contentsOf: "{\n".utf8)
        var first = true
        func key(_ k: StaticString) {
            if !first { out.append(contentsOf: ",\n".utf8) }
            first = false
            out.append(contentsOf: "  \"".utf8)
            out.append(contentsOf: UnsafeBufferPointer(start: k.utf8Start, count: k.utf8CodeUnitCount))
            out.append(contentsOf: "\" : ".utf8)
        }
        func string(_ k: StaticString, _ v: String?) {
            guard let v else { return }
            key(k)
            Self.appendQuoted(v, to: &out)
        }
        func number(_ k: StaticString, _ v: String?) {
            guard let v else { return }
            key(k)
            out.append(contentsOf: v.utf8)
        }
        // Keys in sorted order, as JSONEncoder's .sortedKeys writes them.
        string("backend", backend)
        string("cachePath", cachePath)
        string("device", device)
        string("fuseMount", fuseMount)
        number("mountID", mountID.map { String($0) })
        string("mountpoint", mountpoint)
        string("options", options)
        string("servedBy", servedBy)
        number("since", "\(since)")
        string("source", source)
        string("sourceIdentity", sourceIdentity)
        string("sourceKind", sourceKind)
        string("statsPath", statsPath)
        number("version", String(version))
        number("workerPID", workerPID.map { String($0) })
        out.append(contentsOf: "\n}".utf8)
        return out
    }

    /// Parses a record written by `jsonBytes()` or by `JSONEncoder`.
    static func decode(_ bytes: [UInt8]) -> MountRecord? {
        if let fields = FlatJSON.parse(bytes), let r = MountRecord(fields: fields) { return r }
        return try? JSONDecoder().decode(MountRecord.self, from: Data(bytes))
    }

    private init?(fields f: [String: FlatJSON.Value]) {
        guard case .string(let source)? = f["source"], case .string(let kind)? = f["sourceKind"],
              case .string(let backend)? = f["backend"], case .string(let mountpoint)? = f["mountpoint"],
              case .string(let options)? = f["options"], case .number(let since)? = f["since"],
              case .string(let identity)? = f["sourceIdentity"], case .number(let version)? = f["version"]
        else { return nil }
        func string(_ k: String) -> String? { if case .string(let s)? = f[k] { return s } else { return nil } }
        func integer<T: FixedWidthInteger>(_ k: String) -> T?? {
            switch f[k] {
            case nil, .null?: return .some(nil)
            case .number(let d)?: return T(exactly: d).map { .some($0) } ?? nil
            default: return nil
            }
        }
        guard let pid: Int32? = integer("workerPID"), let mid: UInt64? = integer("mountID"), let v = Int(exactly: version) else { return nil }
        guard Backend(rawValue: backend) != nil else { return nil }
        self.init(source: source, sourceKind: kind, backend: backend, mountpoint: mountpoint, options: options,
                  device: string("device"), workerPID: pid, since: since, sourceIdentity: identity, mountID: mid,
                  cachePath: string("cachePath"), statsPath: string("statsPath"), servedBy: string("servedBy"),
                  fuseMount: string("fuseMount"))
        self.version = v
    }

    private static func appendQuoted(_ s: String, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"): out.append(0x5C); out.append(b)
            case 0x0A: out.append(contentsOf: "\\n".utf8)
            case 0x0D: out.append(contentsOf: "\\r".utf8)
            case 0x09: out.append(contentsOf: "\\t".utf8)
            case 0..<0x20: out.append(contentsOf: "\\u00".utf8); out.append(contentsOf: String(hexByte: b).utf8)
            default: out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}

/// A reader for one flat JSON object whose values are strings, numbers, booleans or null.
enum FlatJSON {
    enum Value: Equatable { case string(String), number(Double), bool(Bool), null }

    static func parse(_ bytes: [UInt8]) -> [String: Value]? {
        bytes.withUnsafeBufferPointer { buf in
            var p = Parser(b: buf)
            return p.object()
        }
    }

    /// One pass over the bytes; strings without escapes are decoded straight from the buffer.
    private struct Parser {
        let b: UnsafeBufferPointer<UInt8>
        var i = 0

        mutating func skip() {
            while i < b.count, b[i] == 0x20 || b[i] == 0x0A || b[i] == 0x0D || b[i] == 0x09 { i += 1 }
        }

        mutating func expect(_ c: UInt8) -> Bool {
            skip()
            guard i < b.count, b[i] == c else { return false }
            i += 1
            return true
        }

        mutating func object() -> [String: Value]? {
            guard expect(UInt8(ascii: "{")) else { return nil }
            var out: [String: Value] = [:]
            out.reserveCapacity(16)
            skip()
            if i < b.count, b[i] == UInt8(ascii: "}") { i += 1; skip(); return i == b.count ? out : nil }
            while true {
                guard let k = string(), expect(UInt8(ascii: ":")), let v = value() else { return nil }
                out[k] = v
                skip()
                guard i < b.count else { return nil }
                if b[i] == UInt8(ascii: ",") { i += 1; continue }
                guard b[i] == UInt8(ascii: "}") else { return nil }
                i += 1
                skip()
                return i == b.count ? out : nil
            }
        }

        mutating func value() -> Value? {
            skip()
            guard i < b.count else { return nil }
            switch b[i] {
            case UInt8(ascii: "\""): return string().map(Value.string)
            case UInt8(ascii: "n"): return literal("null", .null)
            case UInt8(ascii: "t"): return literal("true", .bool(true))
            case UInt8(ascii: "f"): return literal("false", .bool(false))
            default:
                let start = i
                while i < b.count, b[i] == UInt8(ascii: "-") || b[i] == UInt8(ascii: "+") || b[i] == UInt8(ascii: ".")
                        || b[i] == UInt8(ascii: "e") || b[i] == UInt8(ascii: "E") || (0x30...0x39).contains(b[i]) { i += 1 }
                return Double(String(decoding: UnsafeBufferPointer(rebasing: b[start..<i]), as: UTF8.self)).map(Value.number)
            }
        }

        mutating func literal(_ word: StaticString, _ v: Value) -> Value? {
            let n = word.utf8CodeUnitCount
            guard i + n <= b.count, memcmp(b.baseAddress! + i, word.utf8Start, n) == 0 else { return nil }
            i += n
            return v
        }

        mutating func string() -> String? {
            guard expect(UInt8(ascii: "\"")) else { return nil }
            let start = i
            while i < b.count, b[i] != UInt8(ascii: "\""), b[i] != 0x5C, b[i] >= 0x20 { i += 1 }
            guard i < b.count else { return nil }
            if b[i] == UInt8(ascii: "\"") {
                i += 1
                return String(validating: UnsafeBufferPointer(rebasing: b[start..<i - 1]), as: UTF8.self)
            }
            var out = Array(UnsafeBufferPointer(rebasing: b[start..<i]))
            while i < b.count {
                let c = b[i]; i += 1
                switch c {
                case UInt8(ascii: "\""): return String(validating: out, as: UTF8.self)
                case 0x5C:
                    guard i < b.count else { return nil }
                    let e = b[i]; i += 1
                    switch e {
                    case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
                    case UInt8(ascii: "n"): out.append(0x0A)
                    case UInt8(ascii: "r"): out.append(0x0D)
                    case UInt8(ascii: "t"): out.append(0x09)
                    case UInt8(ascii: "b"): out.append(0x08)
                    case UInt8(ascii: "f"): out.append(0x0C)
                    case UInt8(ascii: "u"):
                        guard var v = hex4() else { return nil }
                        if (0xD800..<0xDC00).contains(v) {
                            guard i + 2 <= b.count, b[i] == 0x5C, b[i + 1] == UInt8(ascii: "u") else { return nil }
                            i += 2
                            guard let lo = hex4(), (0xDC00..<0xE000).contains(lo) else { return nil }
                            v = 0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00)
                        }
                        guard let scalar = Unicode.Scalar(v) else { return nil }
                        out += Array(String(Character(scalar)).utf8)
                    default: return nil
                    }
                case 0..<0x20: return nil
                default: out.append(c)
                }
            }
            return nil
        }

        mutating func hex4() -> UInt32? {
            guard i + 4 <= b.count else { return nil }
            var v: UInt32 = 0
            for c in b[i..<i + 4] {
                switch c {
                case 0x30...0x39: v = v << 4 | UInt32(c - 0x30)
                case UInt8(ascii: "a")...UInt8(ascii: "f"): v = v << 4 | UInt32(c - UInt8(ascii: "a") + 10)
                case UInt8(ascii: "A")...UInt8(ascii: "F"): v = v << 4 | UInt32(c - UInt8(ascii: "A") + 10)
                default: return nil
                }
            }
            i += 4
            return v
        }
    }
}
