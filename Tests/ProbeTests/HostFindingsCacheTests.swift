import Foundation
import Testing
@testable import Probe
import Syscall
import TestSupport

/// The host findings the planners reuse between mounts: one entry per kind of plan in the cache
/// file, reused only while the key matches, gathered again when it does not or the file is damaged.
@Suite(.serialized) struct HostFindingsCacheTests {
    @Test func reusedWhileTheKeyMatches() throws {
        let d = try ScratchDir("hostcache")
        defer { d.remove() }
        let file = d.file("host-findings.json")
        func plan() -> MountPlanning.Result {
            MountPlanning.forgetMemo()  // as a new process would
            return MountPlanning.planRemote(cacheDir: d.path, implemented: [.fanotify, .file, .loop], cacheFile: file)
        }
        let first = plan()
        #expect(!first.cached)
        let stored = try JSONDecoder().decode([MountPlanning.CacheEntry].self, from: Data(contentsOf: URL(fileURLWithPath: file)))
        #expect(stored.count == 1 && stored[0].key.hasPrefix("remote "))
        let second = plan()
        #expect(second.cached)
        #expect(second.plan.candidates.map(\.backend) == first.plan.candidates.map(\.backend))
        #expect(second.findings["fanotify.pre_access"]?.status == first.findings["fanotify.pre_access"]?.status)

        // Another kind of plan adds its own entry and leaves this one in place.
        let other = MountPlanning.CacheEntry(key: "local v1 elsewhere", findings: Findings())
        MountPlanning.store(other, at: file)
        #expect(plan().cached)
        let both = try JSONDecoder().decode([MountPlanning.CacheEntry].self, from: Data(contentsOf: URL(fileURLWithPath: file)))
        #expect(Set(both.map { String($0.key.prefix(while: { $0 != " " })) }) == ["local", "remote"])

        // A key that no longer matches (another boot, kernel, module set…) or a damaged file: gathered again.
        MountPlanning.store(MountPlanning.CacheEntry(key: "remote v1 another-boot", findings: Findings()), at: file)
        #expect(!plan().cached)
        try Data("{not json".utf8).write(to: URL(fileURLWithPath: file))
        #expect(!plan().cached)
        #expect(plan().cached, "rewritten after the damaged file")
    }
}
