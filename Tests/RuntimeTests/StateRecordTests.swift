import Foundation
import Testing
@testable import Runtime
import TestSupport

/// The state record's direct JSON form agrees with Foundation's JSON in both directions.
@Suite struct StateRecordTests {
    static let awkward = ["/mnt/plain", "/mnt/with space/and \"quotes\"", "/m\\back/slash", "/tab\there\nnewline\r",
                          "/ctl\u{01}\u{1f}", "/ünïcödé/日本/🙂", "/x/./y//z", ""]

    func records() -> [MountRecord] {
        var out: [MountRecord] = []
        for (i, s) in Self.awkward.enumerated() {
            out.append(MountRecord(source: s, sourceKind: i % 2 == 0 ? "local" : "http", backend: "file", mountpoint: "/mnt/\(s)",
                                   options: "ro,nosuid", device: i % 3 == 0 ? "/dev/loop\(i)" : nil,
                                   workerPID: i % 2 == 1 ? Int32(1000 + i) : nil, since: 1_763_700_000.123456 + Double(i),
                                   sourceIdentity: "2049:\(i)", mountID: i % 2 == 0 ? UInt64(1) << 40 + UInt64(i) : nil,
                                   cachePath: i == 3 ? s : nil, statsPath: i == 5 ? s + ".stats" : nil))
        }
        return out
    }

    @Test func ourBytesDecodeWithFoundation() throws {
        for r in records() {
            let back = try JSONDecoder().decode(MountRecord.self, from: Data(r.jsonBytes()))
            #expect(back == r)
        }
    }

    @Test func foundationBytesDecodeWithOurs() throws {
        let enc = JSONEncoder()
        for format in [JSONEncoder.OutputFormatting.sortedKeys, [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]] {
            enc.outputFormatting = format
            for r in records() {
                #expect(MountRecord.decode([UInt8](try enc.encode(r))) == r)
            }
        }
    }

    @Test func sameTextAsFoundation() throws {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let r = records()[0]
        #expect(String(decoding: r.jsonBytes(), as: UTF8.self) == String(decoding: try enc.encode(r), as: UTF8.self))
    }

    /// Records as the previous version wrote them (a flat object, the same keys for every backend)
    /// are read into the typed form — each backend's own fields, nothing else — and written back
    /// byte for byte the same.
    @Test func previousVersionRecordsAreRead() throws {
        func text(_ fields: [(String, String)]) -> String {
            "{\n" + fields.map { "  \"\($0.0)\" : \($0.1)" }.joined(separator: ",\n") + "\n}"
        }
        func common(_ backend: String, _ extra: [(String, String)]) -> String {
            let base: [(String, String)] = [("backend", "\"\(backend)\""), ("mountpoint", "\"/mnt/a\""),
                                            ("options", "\"ro\""), ("since", "1763700000.5"),
                                            ("source", "\"http://127.0.0.1:1/i.erofs\""), ("sourceIdentity", "\"\""),
                                            ("sourceKind", "\"http\""), ("version", "1")]
            return text((base + extra).sorted { $0.0 < $1.0 })
        }
        let server = AttachedBackend.Server(pid: 42, stats: "/run/s/workers/mnt-a", daemon: false)
        let cases: [(String, AttachedBackend)] = [
            (common("file", [("cachePath", "\"/c/e\"")]), .file(cache: "/c/e")),
            (common("loop", [("device", "\"/dev/loop7\""), ("mountID", "1099511627776")]), .loop(device: "/dev/loop7", cache: nil)),
            (common("fanotify", [("cachePath", "\"/c/e\""), ("statsPath", "\"/run/s/workers/mnt-a\""), ("workerPID", "42")]),
             .fanotify(cache: "/c/e", server: server)),
            (common("fanotify", [("cachePath", "\"/c/e\""), ("servedBy", "\"daemon\""), ("statsPath", "\"/run/s/workers/mnt-a\""),
                                 ("workerPID", "42")]),
             .fanotify(cache: "/c/e", server: .init(pid: 42, stats: "/run/s/workers/mnt-a", daemon: true))),
            (common("fuse-blob", [("device", "\"/dev/loop3\""), ("fuseMount", "\"/run/s/fuse/k\""),
                                  ("statsPath", "\"/run/s/workers/mnt-a\""), ("workerPID", "42")]),
             .fuseBlob(server: server, fuseMount: "/run/s/fuse/k", device: "/dev/loop3")),
            (common("fuse-erofs", [("statsPath", "\"/run/s/workers/mnt-a\""), ("workerPID", "42")]), .fuseErofs(server: server)),
            (common("nbd", [("device", "\"/dev/nbd0\""), ("statsPath", "\"/run/s/workers/mnt-a\""), ("workerPID", "42")]),
             .nbd(server: server, device: "/dev/nbd0")),
        ]
        for (old, typed) in cases {
            let record = try #require(MountRecord.decode(Array(old.utf8)), Comment(rawValue: old))
            #expect(record.attached == typed)
            #expect(String(decoding: record.jsonBytes(), as: UTF8.self) == old)
            #expect(try JSONDecoder().decode(MountRecord.self, from: Data(old.utf8)) == record)
        }
        // A backend this version does not know is not taken for one it does.
        #expect(MountRecord.decode(Array(common("fscache", []).utf8)) == nil)
    }

    /// The store reads a record in one read when it is small and still whole when it is not.
    @Test func storeRoundTripsSmallAndLargeRecords() throws {
        let dir = try ScratchDir("records")
        defer { dir.remove() }
        let store = StateStore(root: dir.file("state"))
        var records = records()
        records[1].options = String(repeating: "x,", count: 20_000)  // 40 KB: more than one read
        for r in records where !r.mountpoint.isEmpty {
            try store.save(r)
            #expect(store.load(r.mountpoint) == r)
        }
        #expect(store.all().count == Set(records.map(\.mountpoint)).count)
    }

    @Test func malformedRecordsAreRejected() {
        for text in ["", "{", "{\"source\": \"x\"}", "[1]", "{\"source\":\"a\",}", "{\"backend\":\"file\"} trailing",
                     "{\"source\":\"\\ud800\"}", "not json"] {
            #expect(MountRecord.decode(Array(text.utf8)) == nil, "accepted: \(text)")
        }
    }
}
