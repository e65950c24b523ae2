#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import EROFS
import Syscall
import SystemPackage

/// With IMAGE: libblkid's verdict, the superblock's feature bits against the kernel's, and a
/// side-effect-free superblock trial with the image itself.
enum ImageChecks {
    /// What /sys/fs/erofs/features lists; nil where it does not exist (the erofs module is not
    /// loaded yet, so what it supports is not known — a mount would load it).
    static func kernelFeatures(_ ctx: ProbeContext) -> Set<String>? {
        ctx.host.exists("/sys/fs/erofs/features") ? Set(ctx.host.list("/sys/fs/erofs/features")) : nil
    }

    /// Whether this kernel reads the image's incompatible features and compression algorithms:
    /// absent naming what it lacks, unknown when that depends on features the kernel does not list yet.
    static func featureFinding(_ sb: Superblock, _ ctx: ProbeContext, kernelFeatures: Set<String>?) -> Finding {
        let used = Feature.table.filter { sb.featureIncompat & $0.bit != 0 }
        var unsupported: [String] = [], undecided: [String] = []
        for f in used {
            if f.sysfs.isEmpty {
                if !kernelAtLeast(ctx.release, 6, 4) { unsupported.append(f.name) }
            } else if let kernelFeatures {
                if kernelFeatures.isDisjoint(with: f.sysfs) { unsupported.append(f.name) }
            } else {
                undecided.append(f.name)
            }
        }
        unsupported += missingAlgorithms(sb, ctx)
        let unknownBits = sb.featureIncompat & ~Feature.table.reduce(0) { $0 | $1.bit }
        if unknownBits != 0 { unsupported.append("unknown bits 0x\(String(unknownBits, radix: 16))") }
        let status: Finding.Status = !unsupported.isEmpty ? .absent : (undecided.isEmpty ? .present : .unknown)
        let says = !unsupported.isEmpty ? "missing: \(unsupported.joined(separator: ", "))"
            : undecided.isEmpty ? "all understood"
            : "does not exist yet (the erofs module is not loaded; a mount loads it): "
                + "\(undecided.joined(separator: ", ")) not known"
        let names = sb.incompatFeatureNames
        let bits = "0x\(String(sb.featureIncompat, radix: 16)) = [\(names.joined(separator: ", "))]"
        return Finding("image.features", "image features supported by this kernel", status, value: names.joined(separator: " "),
                       evidence: [.init("feature_incompat", bits), .init("/sys/fs/erofs/features", says)])
    }

    static func run(_ ctx: ProbeContext, image: String, offset: UInt64 = 0, kernelFeatures: Set<String>?, trial: Bool = true) -> [Finding] {
        inspect(ctx, image: image, offset: offset, kernelFeatures: kernelFeatures, trial: trial).findings
    }

    /// The image's findings and, when it has one, its superblock. The superblock is read first; libblkid
    /// then confirms an EROFS signature (probing only for erofs), or names what the file is otherwise.
    /// `fd`: the image already open (read from, not closed).
    static func inspect(_ ctx: ProbeContext, image: String, fd given: Int32? = nil, offset: UInt64 = 0, kernelFeatures: Set<String>?,
                        trial: Bool = true) -> (findings: [Finding], superblock: Superblock?) {
        var out: [Finding] = []
        let fd: FileDescriptor
        do {
            fd = try given.map(FileDescriptor.init(rawValue:)) ?? Sys.open(image, O_RDONLY)
        } catch {
            out.append(Finding("image.blkid", "libblkid identification", .unknown, evidence: [.init("open", "\(error)")]))
            out.append(Finding("image.superblock", "EROFS superblock", .absent, evidence: [.init("open", "\(error)")]))
            out.append(Finding("image.mountable", "mountable here", .absent, evidence: [.init("open", "\(error)")]))
            return (out, nil)
        }
        defer { if given == nil { Sys.close(fd.rawValue) } }
        let parsed = Result<Superblock, Error> {
            // The checksum covers the rest of the first block: read that much, more only for big blocks.
            var head = try Sys.preadFully(fd.rawValue, count: 4096 - Int(Superblock.offset), at: Int64(offset + Superblock.offset))
            if head.count > 12, head[12] > 12, head[12] <= 16 {
                head = try Sys.preadFully(fd.rawValue, count: (1 << Int(head[12])) - Int(Superblock.offset), at: Int64(offset + Superblock.offset))
            }
            return try Superblock(parsing: head)
        }
        var (rc, values) = (Int32(1), [String: String]())
        if case .success = parsed { (rc, values) = Libraries.blkid(fd: fd.rawValue, offset: offset, onlyTypes: ["erofs"]) }
        if rc != 0 { (rc, values) = Libraries.blkid(fd: fd.rawValue, offset: offset) }
        let summary = ["TYPE", "UUID", "LABEL", "BLOCK_SIZE"].compactMap { k in values[k].map { "\(k)=\($0)" } }.joined(separator: " ")
        out.append(Finding("image.blkid", "libblkid identification", values["TYPE"] == "erofs" ? .present : .absent,
                           value: summary.isEmpty ? nil : summary,
                           evidence: [.init("blkid_do_safeprobe (libblkid \(Libraries.blkidVersion))", rc == 0 ? summary : (rc == 1 ? "no known signature" : "error \(rc)"))]))

        let sb: Superblock
        switch parsed {
        case .success(let s):
            sb = s
            out.append(Finding("image.superblock", "EROFS superblock", .present,
                               value: "block size \(sb.blockSize), \(sb.inodeCount) inodes, \(sb.blocks) blocks",
                               evidence: [.init("superblock at 1024", "magic ok" + (sb.featureCompat & CompatFeature.sbChecksum.rawValue != 0 ? ", crc32c ok" : ", no checksum")
                                                + ", uuid \(sb.uuidString)")]))
        case .failure(let error):
            out.append(Finding("image.superblock", "EROFS superblock", .absent, evidence: [.init("superblock at 1024", "\(error)")]))
            out.append(Finding("image.mountable", "mountable here", .absent, evidence: [.init("superblock", "not an EROFS image")]))
            return (out, nil)
        }

        // The kernel mounts a truncated image and fails its reads later (EUCLEAN): refuse it here.
        if let st = try? Sys.fstat(fd.rawValue), st.st_mode & S_IFMT == S_IFREG {
            let have = UInt64(max(Int64(st.st_size) - Int64(offset), 0))
            let (need, overflow) = sb.blocks.multipliedReportingOverflow(by: UInt64(sb.blockSize))
            if overflow || have < need {
                let says = overflow ? "\(sb.blocks) blocks of \(sb.blockSize) bytes" : "\(sb.blocks) blocks of \(sb.blockSize) bytes = \(need) bytes"
                out.append(Finding("image.size", "image as long as its superblock says", .absent,
                                   evidence: [.init("fstat", "truncated: the superblock says \(says), the file has \(have)")]))
                out.append(Finding("image.mountable", "mountable here", .absent, evidence: [.init("size", "truncated image")]))
                return (out, sb)
            }
        }
        let features = featureFinding(sb, ctx, kernelFeatures: kernelFeatures)
        out.append(features)

        // The image itself: build a superblock from it without attaching it.
        guard trial else { return (out, sb) }
        if ctx.host.isLive, ctx.privileged, offset == 0 {
            switch Result(catching: { try EROFSChecks.trialCreate(source: image) }) {
            case .success:
                out.append(Finding("image.mountable", "mountable here", .present, value: "file-backed",
                                   evidence: [.init("fsopen+fsconfig(source=IMAGE)+FSCONFIG_CMD_CREATE", "ok; nothing attached")]))
            case .failure(let e):
                out.append(Finding("image.mountable", "mountable here", features.status != .absent ? .unknown : .absent,
                                   evidence: [.init("FSCONFIG_CMD_CREATE with the image", "\(e)" + ((e as? Errno) == .notBlockDevice ? " (file-backed unavailable for this file; a loop device may still work)" : ""))]))
            }
        } else {
            out.append(Finding("image.mountable", "mountable here", features.status != .absent ? .unknown : .absent,
                               evidence: [.init("trial", ctx.privileged ? "not the live host" : "needs CAP_SYS_ADMIN")]))
        }
        return (out, sb)
    }

    /// Compression algorithms the image uses (`available_compr_algs` with COMPR_CFGS) that this
    /// kernel's EROFS cannot decompress: the kernel's config where it is readable, else the release
    /// that added each (lzma 5.16, deflate 6.6, zstd 6.10). /sys/fs/erofs/features does not list them.
    static func missingAlgorithms(_ sb: Superblock, _ ctx: ProbeContext) -> [String] {
        guard sb.featureIncompat & Feature.comprCfgs.rawValue != 0 else { return [] }
        let known: [(bit: UInt16, name: String, config: String?, since: (Int, Int))] = [
            (0, "lz4", nil, (4, 19)), (1, "lzma", "CONFIG_EROFS_FS_ZIP_LZMA", (5, 16)),
            (2, "deflate", "CONFIG_EROFS_FS_ZIP_DEFLATE", (6, 6)), (3, "zstd", "CONFIG_EROFS_FS_ZIP_ZSTD", (6, 10)),
        ]
        var out: [String] = []
        for a in known where sb.u1 & (1 << a.bit) != 0 {
            let built: Bool
            if let key = a.config, let config = ctx.config, config.values[key] != nil || kernelAtLeast(ctx.release, a.since.0, a.since.1) {
                built = config.value(key) == "y" || config.value(key) == "m"
            } else {
                built = kernelAtLeast(ctx.release, a.since.0, a.since.1)
            }
            if !built { out.append("\(a.name) compression (Linux \(a.since.0).\(a.since.1)+\(a.config.map { ", \($0)" } ?? ""))") }
        }
        let unknown = sb.u1 & ~UInt16(0xF)
        if unknown != 0 { out.append("unknown compression algorithms 0x\(String(unknown, radix: 16))") }
        return out
    }

    static func kernelAtLeast(_ release: String, _ major: Int, _ minor: Int) -> Bool {
        let parts = release.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
        guard parts.count == 2 else { return false }
        return (parts[0], parts[1]) >= (major, minor)
    }
}
