/// The mount backends erofs-compat knows about, best first for remote sources.
public enum Backend: String, CaseIterable, Codable, Sendable {
    /// fanotify pre-content lazy fetching into a sparse cache file + file-backed EROFS.
    case fanotify
    /// Kernel EROFS mounted straight from a regular file (Linux 6.12+).
    case file
    /// Kernel EROFS on a loop device over the file.
    case loop
    /// Kernel EROFS on an NBD device served by a user-space server.
    case nbd
    /// The image as one file served through FUSE (from the lazy reader for remote sources), with
    /// kernel EROFS mounted on that file: lazy remote mounts where pre-content fanotify is missing.
    case fuseBlob = "fuse-blob"
    /// The image read by the user-space EROFS reader and served through FUSE: kernels without EROFS
    /// or without the image's features, and callers without CAP_SYS_ADMIN.
    case fuseErofs = "fuse-erofs"
}

/// Where the image comes from.
public enum SourceKind: String, Codable, Sendable {
    case local, remote
}

/// One backend as the planner judged it.
public struct Candidate: Codable, Sendable, Equatable {
    public enum Verdict: String, Codable, Sendable {
        /// Every requirement was proven present.
        case viable
        /// Nothing is known to be missing, but something could not be decided (e.g. unprivileged run).
        case unverified
        case rejected
    }

    public var backend: Backend
    public var verdict: Verdict
    /// Why it was taken or rejected, one clause per requirement that decided it.
    public var reasons: [String]
}

/// The planner's answer: candidates in preference order and the one `mount` would use.
public struct Plan: Codable, Sendable, Equatable {
    public var source: SourceKind
    public var candidates: [Candidate]
    public var chosen: Backend? { candidates.first { $0.verdict == .viable }?.backend }
}

/// The single decision function shared by `probe` and `mount`: findings in, ordered candidates out.
public enum Planner {
    /// Preference order per source kind.
    public static func order(for source: SourceKind) -> [Backend] {
        switch source {
        case .local: return [.file, .loop, .fuseErofs, .nbd, .fanotify, .fuseBlob]
        case .remote: return [.fanotify, .fuseBlob, .nbd, .fuseErofs, .file, .loop]
        }
    }

    struct Requirement {
        let id: String
        let what: String
    }

    static func requirements(_ b: Backend, _ source: SourceKind) -> [Requirement] {
        let admin = Requirement(id: "privileges.cap_sys_admin", what: "CAP_SYS_ADMIN to mount")
        let erofs = Requirement(id: "erofs.module", what: "the erofs driver")
        switch b {
        case .file:
            return [admin, erofs, .init(id: "erofs.file_backed", what: "file-backed EROFS mounts (Linux 6.12+)")]
        case .loop:
            return [admin, erofs, .init(id: "loop.module", what: "the loop driver"), .init(id: "loop.configure", what: "LOOP_CONFIGURE (Linux 5.8+)")]
        case .fanotify:
            return [admin, erofs,
                    .init(id: "fanotify.pre_access", what: "FAN_PRE_ACCESS marks on the cache filesystem (Linux 6.14+, ext4/xfs/btrfs)"),
                    .init(id: "fanotify.range_info", what: "range info records"),
                    .init(id: "fanotify.deny_errno", what: "FAN_DENY_ERRNO to fail unfetchable reads with EIO (Linux 6.13+)"),
                    .init(id: "erofs.file_backed", what: "file-backed EROFS (a loop device over a marked file raises no events)")]
        case .nbd:
            return [admin, erofs, .init(id: "nbd.module", what: "the nbd driver")]
        case .fuseErofs:
            return [.init(id: "fuse.device", what: "/dev/fuse")]
        case .fuseBlob:
            return [admin, erofs, .init(id: "fuse.device", what: "/dev/fuse")]
        }
    }

    /// Judges every backend for `source` on `findings`. `implemented` is what this build can run;
    /// anything else is rejected with that reason so the output never promises a missing backend.
    public static func plan(_ findings: Findings, source: SourceKind, implemented: Set<Backend>) -> Plan {
        var out: [Candidate] = []
        let imageUnsupported = findings.status("image.features") == .absent || findings.status("image.superblock") == .absent
        for b in order(for: source) {
            var missing: [String] = [], undecided: [String] = [], present: [String] = []
            if source == .local, b == .fanotify || b == .fuseBlob {
                out.append(Candidate(backend: b, verdict: .rejected, reasons: ["lazy fetching applies to remote sources; a local image is already complete"]))
                continue
            }
            if b == .fuseBlob { kernelAttach(findings, present: &present, missing: &missing, undecided: &undecided) }
            for r in requirements(b, source) {
                switch findings.status(r.id) {
                case .present: present.append(r.what)
                case .absent: missing.append(r.what + " " + absentDetail(findings[r.id]))
                case .unknown: undecided.append(r.what + " (could not be decided)")
                }
            }
            if b == .fuseErofs, findings.status("privileges.cap_sys_admin") != .present {
                if findings.isPresent("fuse.fusermount3") { present.append("setuid fusermount3 for an unprivileged mount") } else { missing.append("CAP_SYS_ADMIN or a setuid fusermount3") }
                if findings.status("fuse.device_unprivileged") == .absent {
                    missing.append("/dev/fuse open to unprivileged users " + absentDetail(findings["fuse.device_unprivileged"]))
                }
            }
            if imageUnsupported, b != .fuseErofs {
                missing.append("an image this kernel can read (" + (findings["image.features"]?.evidence.last?.result ?? "not an EROFS image") + ")")
            }
            var note = source == .remote && (b == .file || b == .loop) ? ["needs the whole image downloaded first"] : []
            if b == .fuseErofs || b == .fuseBlob { note += fuseNotes(b, findings) }
            let built = implemented.contains(b)
            var reasons: [String]
            let verdict: Candidate.Verdict
            if !missing.isEmpty {
                verdict = .rejected
                reasons = missing.map { "missing " + $0 }
            } else if !built {
                verdict = .rejected
                reasons = ["the host supports it, but this build of erofs-compat does not implement the \(b.rawValue) backend"]
            } else if !undecided.isEmpty {
                verdict = .unverified
                reasons = undecided
            } else {
                verdict = .viable
                reasons = present.map { "has " + $0 } + note
            }
            out.append(Candidate(backend: b, verdict: verdict, reasons: reasons))
        }
        return Plan(source: source, candidates: out)
    }

    /// What the FUSE backends use of the kernel's FUSE, and what they leave unused and why (said by
    /// --explain).
    static func fuseNotes(_ b: Backend, _ findings: Findings) -> [String] {
        let passthrough: String
        if b == .fuseErofs {
            passthrough = "no FUSE passthrough (an image's files are ranges of one file, not whole backing files)"
        } else {
            let use = " once the blob is whole in the cache (a mount of a complete entry reads the cache file without"
                + " the server, through a loop device: file-backed EROFS refuses a stacked file)"
            switch findings.status("fuse.kernel_passthrough") {
            case .present: passthrough = "FUSE passthrough" + use
            case .absent: passthrough = "no FUSE passthrough (the kernel does not offer FUSE_PASSTHROUGH)"
            default: passthrough = "FUSE passthrough, where the kernel offers it," + use
            }
        }
        return [passthrough, "no FUSE-over-io_uring (not implemented: /dev/fuse is read by 4 threads)"]
    }

    /// fuse-blob mounts kernel EROFS on its FUSE file: file-backed where the kernel has it, else
    /// through a loop device.
    static func kernelAttach(_ findings: Findings, present: inout [String], missing: inout [String], undecided: inout [String]) {
        if findings.status("erofs.file_backed") == .present {
            present.append("file-backed EROFS on the FUSE file")
        } else if findings.status("loop.module") == .present, findings.status("loop.configure") == .present {
            present.append("a loop device over the FUSE file (no file-backed EROFS)")
        } else if findings.status("erofs.file_backed") == .absent, findings.status("loop.module") == .absent {
            missing.append("file-backed EROFS or the loop driver to mount the FUSE file")
        } else {
            undecided.append("file-backed EROFS or a loop device to mount the FUSE file (could not be decided)")
        }
    }

    /// Whether the host itself (implemented or not) could mount with some backend.
    public static func hostCanMount(_ findings: Findings, source: SourceKind) -> Bool {
        plan(findings, source: source, implemented: Set(Backend.allCases)).chosen != nil
    }

    static func absentDetail(_ f: Finding?) -> String {
        guard let f else { return "" }
        if let v = f.value, !v.isEmpty { return "(\(v))" }
        guard let ev = f.evidence.last(where: { !$0.result.isEmpty }) else { return "" }
        return "(\(ev.source): \(ev.result))"
    }
}
