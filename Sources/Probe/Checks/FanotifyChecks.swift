#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Glibc
import Syscall
import SystemPackage

/// fanotify: availability, permission events, the pre-content class, FAN_PRE_ACCESS on the cache
/// filesystem, range records (live round trip), FAN_DENY_ERRNO and restartable queue fds.
enum FanotifyChecks {
    static func run(_ ctx: ProbeContext) -> [Finding] {
        guard ctx.host.isLive else { return [] }
        var out: [Finding] = []
        let cfg = [ctx.configEvidence("CONFIG_FANOTIFY"), ctx.configEvidence("CONFIG_FANOTIFY_ACCESS_PERMISSIONS")].compactMap { $0 }

        // Available at all.
        switch Result(catching: { try Fanotify.initGroup(Fanotify.classNotif | Fanotify.cloexec) }) {
        case .success(let fd):
            Sys.close(fd.rawValue)
            out.append(Finding("fanotify.available", "fanotify", .present, evidence: [.init("fanotify_init(FAN_CLASS_NOTIF)", "ok")] + cfg))
        case .failure(let e as Errno) where e == .noFunction:
            out.append(Finding("fanotify.available", "fanotify", .absent, evidence: [.init("fanotify_init(FAN_CLASS_NOTIF)", "ENOSYS: kernel built without CONFIG_FANOTIFY")] + cfg))
            return out
        case .failure(let e as Errno) where e == .notPermitted:
            out.append(ctx.unknownWithoutPrivilege("fanotify.available", "fanotify", "fanotify_init(FAN_CLASS_NOTIF): EPERM"))
            return out + ["fanotify.permission_events", "fanotify.pre_content_class", "fanotify.pre_access", "fanotify.range_info",
                          "fanotify.deny_errno", "fanotify.restartable"].map { ctx.unknownWithoutPrivilege($0, title(for: $0), "fanotify_init") }
        case .failure(let e):
            out.append(Finding("fanotify.available", "fanotify", .unknown, evidence: [.init("fanotify_init(FAN_CLASS_NOTIF)", "\(e)")]))
            return out
        }
        guard ctx.privileged else {
            return out + ["fanotify.permission_events", "fanotify.pre_content_class", "fanotify.pre_access", "fanotify.range_info",
                          "fanotify.deny_errno", "fanotify.restartable"].map { ctx.unknownWithoutPrivilege($0, title(for: $0), "fanotify_init(FAN_CLASS_CONTENT)") }
        }

        out.append(permissionEvents(ctx, cfg))

        // Pre-content class: accepted by fanotify_init since 2.6.37, so this alone proves little.
        let preGroup: FileDescriptor
        do {
            preGroup = try Fanotify.initGroup(Fanotify.classPreContent | Fanotify.cloexec)
            out.append(Finding("fanotify.pre_content_class", title(for: "fanotify.pre_content_class"), .present,
                               evidence: [.init("fanotify_init(FAN_CLASS_PRE_CONTENT)", "ok (old kernels accept it too; FAN_PRE_ACCESS below decides)")]))
        } catch {
            out.append(Finding("fanotify.pre_content_class", title(for: "fanotify.pre_content_class"), .absent,
                               evidence: [.init("fanotify_init(FAN_CLASS_PRE_CONTENT)", errnoName(error as! Errno))]))
            return out + ["fanotify.pre_access", "fanotify.range_info", "fanotify.deny_errno", "fanotify.restartable"].map {
                Finding($0, title(for: $0), .absent, evidence: [.init("fanotify_init(FAN_CLASS_PRE_CONTENT)", "failed")])
            }
        }
        defer { Sys.close(preGroup.rawValue) }

        let preAccess = preAccessMark(ctx, group: preGroup)
        out.append(preAccess)
        out.append(preAccess.status == .present ? rangeRoundTrip(ctx) :
            Finding("fanotify.range_info", title(for: "fanotify.range_info"), preAccess.status == .absent && preAccess.value == nil ? .absent : .unknown,
                    evidence: [.init("event round trip", "not attempted: FAN_PRE_ACCESS could not be marked on \(ctx.trialDir)")]))
        out.append(denyErrno(group: preGroup))
        out.append(restartable())
        return out
    }

    static func title(for id: String) -> String {
        switch id {
        case "fanotify.permission_events": return "permission events (FAN_OPEN_PERM)"
        case "fanotify.pre_content_class": return "pre-content class (FAN_CLASS_PRE_CONTENT)"
        case "fanotify.pre_access": return "FAN_PRE_ACCESS on the cache filesystem"
        case "fanotify.range_info": return "range info records (event round trip)"
        case "fanotify.deny_errno": return "FAN_DENY_ERRNO"
        case "fanotify.restartable": return "restartable queue fds (FAN_RESTARTABLE_EVENTS)"
        default: return id
        }
    }

    static func permissionEvents(_ ctx: ProbeContext, _ cfg: [Finding.Evidence]) -> Finding {
        let id = "fanotify.permission_events"
        do {
            let group = try Fanotify.initGroup(Fanotify.classContent | Fanotify.cloexec)
            defer { Sys.close(group.rawValue) }
            let file = try ctx.temporaryFile()
            defer { Sys.close(file.rawValue) }
            do {
                try Fanotify.mark(group, flags: Fanotify.markAdd, mask: Fanotify.openPerm, fd: file.rawValue, path: nil)
                // Removing the mark first keeps close() from waiting for a grace period.
                try? Fanotify.mark(group, flags: Fanotify.markRemove, mask: Fanotify.openPerm, fd: file.rawValue, path: nil)
                return Finding(id, title(for: id), .present, evidence: [.init("fanotify_mark(FAN_OPEN_PERM) on a temporary file", "ok")] + cfg)
            } catch let e as Errno where e == .invalidArgument {
                return Finding(id, title(for: id), .absent, evidence: [.init("fanotify_mark(FAN_OPEN_PERM)", "EINVAL: kernel built without CONFIG_FANOTIFY_ACCESS_PERMISSIONS")] + cfg)
            }
        } catch {
            return Finding(id, title(for: id), .unknown, evidence: [.init("trial in \(ctx.trialDir)", "\(error)")])
        }
    }

    static func preAccessMark(_ ctx: ProbeContext, group: FileDescriptor) -> Finding {
        let id = "fanotify.pre_access"
        let fsValue = "\(ctx.trialFSType) (\(ctx.trialDir))"
        var ev: [Finding.Evidence] = []
        if ctx.trialDir != ctx.options.cacheDir {
            ev.append(.init("cache dir", "\(ctx.options.cacheDir) does not exist yet; tried its nearest existing parent \(ctx.trialDir)"))
        }
        func verdict(_ r: Result<Void, Error>, what: String) -> Finding {
            switch r {
            case .success:
                return Finding(id, title(for: id), .present, value: fsValue, evidence: ev + [.init("fanotify_mark(FAN_PRE_ACCESS) on \(what)", "ok")])
            case .failure(let e as Errno) where e == .invalidArgument:
                return Finding(id, title(for: id), .absent, evidence: ev + [.init("fanotify_mark(FAN_PRE_ACCESS)", "EINVAL: kernel has no pre-content events (needs Linux 6.14 with CONFIG_FANOTIFY_ACCESS_PERMISSIONS)")])
            case .failure(let e as Errno) where e == .notSupported:
                return Finding(id, title(for: id), .absent, value: fsValue,
                               evidence: ev + [.init("fanotify_mark(FAN_PRE_ACCESS) on \(what)", "EOPNOTSUPP: filesystem \(ctx.trialFSType) does not allow pre-content marks (use ext4, xfs or btrfs for --cache-dir)")])
            case .failure(let e):
                return Finding(id, title(for: id), .unknown, value: fsValue, evidence: ev + [.init("fanotify_mark(FAN_PRE_ACCESS) on \(what)", "\(e)")])
            }
        }
        if let file = try? ctx.temporaryFile() {
            defer { Sys.close(file.rawValue) }
            let r = Result { try Fanotify.mark(group, flags: Fanotify.markAdd, mask: Fanotify.preAccess, fd: file.rawValue, path: nil) }
            if case .success = r { try? Fanotify.mark(group, flags: Fanotify.markRemove, mask: Fanotify.preAccess, fd: file.rawValue, path: nil) }
            return verdict(r, what: "a temporary file in \(ctx.trialDir)")
        }
        // No O_TMPFILE here (read-only or unsupported): mark the directory inode itself.
        let r = Result { try Fanotify.mark(group, flags: Fanotify.markAdd, mask: Fanotify.preAccess, path: ctx.trialDir) }
        if case .success = r { try? Fanotify.mark(group, flags: Fanotify.markRemove, mask: Fanotify.preAccess, path: ctx.trialDir) }
        return verdict(r, what: "directory \(ctx.trialDir)")
    }

    /// A real FAN_PRE_ACCESS event: a second thread reads 10 bytes at 5000 of a sparse 8 KiB temporary
    /// file; this thread reads the event, parses its range record and answers FAN_ALLOW.
    static func rangeRoundTrip(_ ctx: ProbeContext) -> Finding {
        let id = "fanotify.range_info"
        do {
            let file = try ctx.temporaryFile()
            defer { Sys.close(file.rawValue) }
            try Sys.ftruncate(file.rawValue, 8192)
            let group = try Fanotify.initGroup(Fanotify.classPreContent | Fanotify.cloexec | Fanotify.nonblock)
            defer { Sys.close(group.rawValue) }
            try Fanotify.mark(group, flags: Fanotify.markAdd, mask: Fanotify.preAccess, fd: file.rawValue, path: nil)
            defer { try? Fanotify.mark(group, flags: Fanotify.markRemove, mask: Fanotify.preAccess, fd: file.rawValue, path: nil) }
            // Only descriptors opened after the mark raise pre-content events.
            let reader = try Sys.reopen(file, O_RDONLY)
            defer { Sys.close(reader.rawValue) }
            let done = DispatchSemaphore(value: 0)
            let readResult = Locked<Result<Int, Error>?>(nil)
            Threads.detach {
                var buf = [UInt8](repeating: 0xFF, count: 10)
                let r = Result { try buf.withUnsafeMutableBytes { try Sys.pread(reader.rawValue, into: $0, at: 5000) } }
                readResult.set(r)
                done.signal()
            }
            var event: Fanotify.Event?
            let deadline = DispatchTime.now() + .seconds(2)
            while event == nil, DispatchTime.now() < deadline {
                guard try Sys.poll(group.rawValue, timeoutMs: 200) else { continue }
                var buf = [UInt8](repeating: 0, count: 4096)
                let n = try buf.withUnsafeMutableBytes { try Sys.read(group.rawValue, into: $0) }
                for ev in try buf.withUnsafeBytes({ try Fanotify.decode(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }) {
                    try Fanotify.respond(group, fd: ev.fd, response: Fanotify.allow)
                    if ev.fd >= 0 { Sys.close(ev.fd) }
                    if ev.mask & Fanotify.preAccess != 0 { event = ev }
                }
            }
            guard let event else {
                Sys.close(group.rawValue) // releases the reader if it is still blocked
                _ = done.wait(timeout: .now() + 2)
                return Finding(id, title(for: id), .unknown, evidence: [.init("FAN_PRE_ACCESS round trip", "no event within 2 s")])
            }
            _ = done.wait(timeout: .now() + 2)
            let readText: String
            switch readResult.get() {
            case .success(let n)?: readText = "reader got \(n) bytes after FAN_ALLOW"
            case .failure(let e)?: readText = "reader failed: \(e)"
            case nil: readText = "reader still blocked"
            }
            guard let range = event.range else {
                return Finding(id, title(for: id), .absent, evidence: [.init("FAN_PRE_ACCESS round trip", "event carried no FAN_EVENT_INFO_TYPE_RANGE record; \(readText)")])
            }
            return Finding(id, title(for: id), .present, value: "offset \(range.offset) count \(range.count)",
                           evidence: [.init("FAN_PRE_ACCESS round trip", "pread(10 bytes at 5000) → range record offset=\(range.offset) count=\(range.count) (page-aligned); \(readText)")])
        } catch {
            return Finding(id, title(for: id), .unknown, evidence: [.init("FAN_PRE_ACCESS round trip", "\(error)")])
        }
    }

    /// With no event pending, a FAN_DENY_ERRNO(EIO) response for fd INT_MAX is ENOENT when the kernel
    /// understands the response and EINVAL when it does not.
    static func denyErrno(group: FileDescriptor) -> Finding {
        let id = "fanotify.deny_errno"
        let src = "write {fd=INT_MAX, FAN_DENY_ERRNO(EIO)} to a pre-content group"
        switch Result(catching: { try Fanotify.respond(group, fd: Int32.max, response: Fanotify.denyErrno(.ioError)) }) {
        case .failure(let e as Errno) where e == .noSuchFileOrDirectory:
            return Finding(id, title(for: id), .present, evidence: [.init(src, "ENOENT (response format accepted, no such event)")])
        case .failure(let e as Errno) where e == .invalidArgument:
            return Finding(id, title(for: id), .absent, evidence: [.init(src, "EINVAL (needs Linux 6.13)")])
        case .failure(let e):
            return Finding(id, title(for: id), .unknown, evidence: [.init(src, "\(e)")])
        case .success:
            return Finding(id, title(for: id), .unknown, evidence: [.init(src, "unexpectedly accepted")])
        }
    }

    /// Restartable events are posted upstream but in no release: try both posted flag values.
    static func restartable() -> Finding {
        let id = "fanotify.restartable"
        var ev: [Finding.Evidence] = []
        for flag in Fanotify.restartableFlagCandidates {
            let src = "fanotify_init(FAN_CLASS_PRE_CONTENT|0x\(String(flag, radix: 16)))"
            do {
                let g = try Fanotify.initGroup(Fanotify.classPreContent | Fanotify.cloexec | flag)
                defer { Sys.close(g.rawValue) }
                do {
                    let q = try Sys.ioctl(g.rawValue, Fanotify.openQueueFdIoctl, value: 0)
                    Sys.close(q)
                    return Finding(id, title(for: id), .present, value: "flag 0x\(String(flag, radix: 16))",
                                   evidence: ev + [.init(src, "ok"), .init("ioctl(FAN_IOC_OPEN_QUEUE_FD)", "returned a queue fd")])
                } catch {
                    ev.append(.init(src + " + ioctl(FAN_IOC_OPEN_QUEUE_FD)", "init ok, ioctl \(errnoName(error as! Errno))"))
                }
            } catch {
                ev.append(.init(src, errnoName(error as! Errno)))
            }
        }
        return Finding(id, title(for: id), .absent, evidence: ev + [.init("upstream", "not merged in any released kernel; flag values are provisional")])
    }
}

