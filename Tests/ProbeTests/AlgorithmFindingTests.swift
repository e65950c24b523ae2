import Foundation
import Testing
@testable import EROFS
@testable import Probe
import TestSupport

/// Compression algorithms against the kernel's: Debian's 6.1 kernel calls the zstd image mountable
/// by its feature bits, then fails FSCONFIG_CMD_CREATE ("unidentified algorithms"); the finding must
/// say so first, so that the planner rejects file and loop and picks fuse-erofs.
struct AlgorithmFindingTests {
    /// A host tree that reports `release` (a kernel without a readable config).
    func context(release: String) throws -> (ProbeContext, ScratchDir) {
        let dir = try ScratchDir("algs")
        try FileManager.default.createDirectory(atPath: dir.file("proc/sys/kernel"), withIntermediateDirectories: true)
        try release.write(toFile: dir.file("proc/sys/kernel/osrelease"), atomically: false, encoding: .utf8)
        return (ProbeContext(options: ProbeOptions(cacheDir: "/", host: Host(root: dir.path)), lightweight: true), dir)
    }

    func superblock(_ fixture: String) throws -> Superblock {
        try EROFSImage.superblock(of: FileSource(path: TestEnv.repoRoot + "/Tests/Fixtures/mkfs-erofs-1.9.3/\(fixture).erofs"))
    }

    @Test(arguments: [("zstd", "6.1.0-28-amd64", "zstd"), ("zstd", "6.9.12", "zstd"), ("zstd", "6.10.0", ""),
                      ("deflate", "6.5.0", "deflate"), ("deflate", "6.6.1", ""), ("48bit-lzma", "5.15.0", "lzma"),
                      ("b1024-lz4", "6.1.0", "")])
    func algorithmsTheKernelLacks(fixture: String, release: String, missing: String) throws {
        let (ctx, dir) = try context(release: release)
        defer { dir.remove() }
        let found = ImageChecks.missingAlgorithms(try superblock(fixture), ctx)
        if missing.isEmpty {
            #expect(found.isEmpty, "\(fixture) on \(release): \(found)")
        } else {
            #expect(found.count == 1 && found[0].hasPrefix(missing + " compression"), "\(fixture) on \(release): \(found)")
        }
    }

    /// Before the erofs module is loaded /sys/fs/erofs/features does not exist: features the kernel
    /// would list are unknown, not missing; what the release alone decides stays absent.
    @Test(arguments: [("b1024-lz4", "6.1.0", Finding.Status.unknown), ("zstd", "6.1.0", .absent),
                      ("b1024-lz4", "6.12.0", .unknown)])
    func featuresBeforeTheModuleLoads(fixture: String, release: String, expected: Finding.Status) throws {
        let (ctx, dir) = try context(release: release)
        defer { dir.remove() }
        let sb = try superblock(fixture)
        let before = ImageChecks.featureFinding(sb, ctx, kernelFeatures: nil)
        #expect(before.status == expected, "\(fixture) on \(release): \(before.evidence)")
        if expected == .unknown { #expect(before.evidence.last?.result.contains("not loaded") == true) }
        let loaded = ImageChecks.featureFinding(sb, ctx, kernelFeatures: ["zero_padding", "compr_cfgs", "big_pcluster",
                                                                           "chunked_file", "device_table", "ztailpacking",
                                                                           "fragments", "dedupe", "compr_head2"])
        #expect(loaded.status == (expected == .absent ? .absent : .present), "\(fixture) on \(release) loaded: \(loaded.evidence)")
    }
}
