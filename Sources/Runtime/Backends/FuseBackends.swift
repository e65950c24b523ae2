#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Probe
import Remote
import Syscall
import SystemPackage

/// A FUSE filesystem served by a supervisor process (FuseWorker): the mount is built detached,
/// the supervisor answers INIT and starts a server, and only then is the mount attached, so a
/// failure leaves nothing mounted. What the supervisor serves is described by a `ServeSpec`.
struct FuseMounter {
    /// The filesystem type in mountinfo: `fuse.erofs-compat`.
    static let subtype = "erofs-compat"
    static let fsType = "fuse." + subtype

    var stateRoot: String
    /// Where the server runs: the daemon's host, or (nil) a supervisor process of its own.
    var host: InProcessServing?
    /// The mount's fetcher, for a hosted server.
    var fetcher: HTTPBlob?

    init(_ request: PreparedMount) { (stateRoot, host, fetcher) = (request.stateRoot, request.host, request.fetcher) }

    /// Builds the FUSE superblock for `spec`, starts its server (hosted, or a supervisor process),
    /// waits until it serves, and attaches the mount to `target`. Returns the server's pid.
    func mount(_ spec: ServeSpec, source: String, at target: FileDescriptor, attributes: MountAPI.Attributes,
               allowOther: Bool) throws -> FuseWorker.Ready {
        let dev: FileDescriptor
        do { dev = try Sys.open("/dev/fuse", O_RDWR | O_CLOEXEC) } catch {
            throw BackendFailure(detail: "open /dev/fuse: \(error)", fallback: true)
        }
        defer { Sys.close(dev.rawValue) }
        let fc = try context(source: source, fuseFD: dev.rawValue, allowOther: allowOther)
        let mnt: FileDescriptor
        do {
            try MountAPI.create(fc)
            mnt = try MountAPI.fsmount(fc, attributes: attributes.union(.readOnly))
        } catch {
            throw BackendFailure(detail: "creating the FUSE mount: \(error)", fallback: true)
        }
        defer { Sys.close(mnt.rawValue) }
        let ready = try host.map { try $0.hostFuse(spec, fuseFD: dev.rawValue, fetcher: fetcher) }
            ?? startSupervisor(spec, fuseFD: dev.rawValue)
        do {
            try MountAPI.move(mnt, to: target)
        } catch {
            if let host { host.abandon(spec.mountpoint) } else { try? Sys.kill(ready.pid, SIGKILL) }
            throw BackendFailure(detail: "move_mount of the FUSE mount: \(error)", fallback: false)
        }
        return ready
    }

    /// A FUSE filesystem context on the device: read-only superblock, root's, kernel permission checks.
    func context(source: String, fuseFD: Int32, allowOther: Bool) throws -> MountAPI.Context {
        let fc: MountAPI.Context
        do { fc = try MountAPI.fsopen("fuse") } catch {
            throw BackendFailure(detail: "fsopen(fuse): \(error)", fallback: true)
        }
        var options = [("source", source), ("subtype", Self.subtype), ("fd", String(fuseFD)),
                       ("rootmode", "40000"), ("user_id", "0"), ("group_id", "0")]
        // A read-only superblock (not only a read-only mount): FUSE then never invalidates atime
        // after a read, which would cost a GETATTR per file on every later stat.
        options += [("ro", ""), ("default_permissions", "")] + (allowOther ? [("allow_other", "")] : [])
        for (key, value) in options {
            do {
                if value.isEmpty, key != "source" {
                    try MountAPI.setFlag(fc, key)
                } else {
                    try MountAPI.setString(fc, key, value)
                }
            } catch {
                throw BackendFailure(detail: "fsconfig(\(key)) for fuse: \(error)", fallback: false)
            }
        }
        return fc
    }

    /// An unprivileged mount: Debian's setuid fusermount3 mounts at `target` and hands back the
    /// /dev/fuse descriptor over a socket (`_FUSE_COMMFD`, as libfuse does); nosuid and nodev are
    /// forced by fusermount3. The mount exists before the server answers (requests wait for INIT).
    func mountWithFusermount(_ spec: ServeSpec, source: String, at target: String) throws -> Int32 {
        guard let helper = Self.fusermount else {
            throw BackendFailure(detail: "fusermount3 not found (Debian: fuse3)", fallback: false)
        }
        let (mine, theirs) = try Sys.socketPair()
        defer { Sys.close(mine) }
        var env = ProcessInfo.processInfo.environment
        env["_FUSE_COMMFD"] = String(theirs)
        // fusermount3 splits its options at commas; a backslash escapes one.
        let fsname = source.map { $0 == "," || $0 == "\\" ? "\\\($0)" : String($0) }.joined()
        let options = "ro,nosuid,nodev,default_permissions,subtype=\(Self.subtype),fsname=\(fsname)"
        let helperPID: Int32
        do {
            defer { Sys.close(theirs) }
            helperPID = try Sys.spawnChild(helper, ["-o", options, "--", target], keep: [theirs], environment: env)
        } catch {
            throw BackendFailure(detail: "cannot run \(helper): \(error)", fallback: false)
        }
        let received = try? Sys.receive(mine)
        let (code, _) = Sys.wait(helperPID)
        guard code == 0, let dev = received?.fds.first else {
            received?.fds.forEach(Sys.close)
            let why = "\(helper) could not mount \(target) (exit \(code ?? -1); its message is above)"
            throw BackendFailure(detail: why, fallback: false)
        }
        defer { Sys.close(dev) }
        do {
            return try startSupervisor(spec, fuseFD: dev).pid
        } catch {
            Self.fusermountUnmount(target, lazy: true)
            throw error
        }
    }

    static var fusermount: String? {
        ["/usr/bin/fusermount3", "/bin/fusermount3", "/usr/local/bin/fusermount3"].first { access($0, X_OK) == 0 }
    }

    /// `fusermount3 -u [-z] MOUNTPOINT`: how an unprivileged user unmounts a FUSE mount.
    @discardableResult
    static func fusermountUnmount(_ mountpoint: String, lazy: Bool) -> Bool {
        guard let helper = fusermount,
              let r = try? Sys.run(helper, ["-u"] + (lazy ? ["-z"] : []) + ["--", mountpoint], input: [],
                                   environment: ProcessInfo.processInfo.environment, timeoutMs: 30_000)
        else { return false }
        return r.status == 0
    }

    /// Starts `__fuse-serve` with the device and the spec, and waits for its "ready".
    func startSupervisor(_ spec: ServeSpec, fuseFD: Int32) throws -> FuseWorker.Ready {
        let server = ServedProcess.fuse
        let (pid, line) = try server.start(spec, args: ["--fuse-fd", String(fuseFD)], keeping: [fuseFD])
        guard let ready = FuseWorker.Ready(line, pid: pid) else {
            server.kill(pid)
            throw BackendFailure(detail: "the FUSE server answered '\(line)'", fallback: false)
        }
        return ready
    }

    func statsPath(for mountpoint: String) -> String {
        ServedProcess.statsPath(stateRoot: stateRoot, mountpoint: mountpoint)
    }
}

/// fuse-erofs: the image's files served by the user-space EROFS reader.
struct FuseErofsBackend: MountBackend {
    var kind: Backend { .fuseErofs }

    func attach(_ request: PreparedMount) throws -> Attachment {
        let mounter = FuseMounter(request)
        let stats = mounter.statsPath(for: request.mountpoint)
        let spec = request.serveSpec(.fuse, .erofs, statsPath: stats)
        guard Sys.hasCapSysAdmin() else {
            let pid = try mounter.mountWithFusermount(spec, source: request.source, at: request.target.path)
            return Attachment(device: nil, workerPID: pid, statsPath: stats)
        }
        let pid = try mounter.mount(spec, source: request.source, at: request.target.fd,
                                    attributes: request.options.attributes, allowOther: true).pid
        return Attachment(device: nil, workerPID: pid, statsPath: stats, servedByDaemon: request.host != nil)
    }

    func release(_ record: MountRecord) { release(record, lazy: false) }

    /// After a lazy umount the server keeps answering for open files; it exits when the superblock goes.
    func release(_ record: MountRecord, lazy: Bool) {
        if !lazy { ServedProcess.fuse.awaitExit(record) }
    }

    func recognises(_ m: MountInfoEntry, as r: MountRecord) -> Bool {
        m.fsType == FuseMounter.fsType && m.source == r.source
    }
}

/// fuse-blob: the image as one file in a private FUSE mount under the state directory, with kernel
/// EROFS mounted on that file (file-backed, or a loop device where the kernel has no file-backed
/// mounts).
struct FuseBlobBackend: MountBackend {
    var kind: Backend { .fuseBlob }

    func attach(_ request: PreparedMount) throws -> Attachment {
        let mounter = FuseMounter(request)
        let stats = mounter.statsPath(for: request.mountpoint)
        let dir = request.stateRoot + "/fuse/" + StateStore.sibling(of: StateStore.key(for: request.mountpoint), "")
        try? Sys.mkdir(request.stateRoot + "/fuse", mode: 0o700)
        do { try Sys.mkdir(dir, mode: 0o700) } catch let e as Errno where e == .fileExists {} catch {
            throw BackendFailure(detail: "mkdir \(dir): \(error)", fallback: false)
        }
        let fuseTarget: MountTarget
        do { fuseTarget = try MountTarget(dir) } catch { throw BackendFailure(detail: "\(error)", fallback: false) }
        let spec = request.serveSpec(.fuse, .blob, statsPath: stats)
        let ready: FuseWorker.Ready
        do {
            ready = try mounter.mount(spec, source: request.source, at: fuseTarget.fd,
                                      attributes: [.readOnly, .noSuid, .noDev, .noExec], allowOther: false)
        } catch {
            _ = Glibc.rmdir(dir)
            throw error
        }
        var inner = request
        inner.source = dir + "/" + String(decoding: BlobFilesystem.fileName, as: UTF8.self)
        do {
            let attached = try attachKernelEROFS(inner, passthrough: ready.passthrough)
            return Attachment(device: attached.device, workerPID: ready.pid, statsPath: stats, fuseMount: dir,
                              servedByDaemon: request.host != nil)
        } catch {
            try? MountAPI.umount(dir, detach: true)
            request.host?.abandon(request.mountpoint)
            _ = Glibc.rmdir(dir)
            throw error
        }
    }

    /// File-backed where the kernel has it (FUSE files can back an EROFS mount on 6.12+), else a
    /// loop device over the file. A passed-through file is stacked (its FUSE superblock has a stack
    /// depth), which file-backed EROFS refuses ("cannot be applied to stacked fses", 6.18): a loop
    /// device then, with buffered I/O. Direct I/O through a passed-through file fails on 6.12 (the
    /// loop device's reads end in "invalid error"; the VM tier), and on 6.18 measured 1.16-1.19x a
    /// local mount against buffered 0.90-1.65x (its second page cache suffers most from this VM's
    /// memory reporting).
    func attachKernelEROFS(_ inner: PreparedMount, passthrough: Bool) throws -> Attachment {
        if passthrough { return try LoopBackend(directIO: false).attach(inner) }
        do { return try attachFileBacked(inner) } catch let f as BackendFailure where f.fallback {
            return try LoopBackend().attach(inner)
        }
    }

    /// File-backed with EROFS's `directio` where the kernel has the option: EROFS then reads the
    /// FUSE file without filling its page cache, a copy of what EROFS's own page cache and the
    /// server's cache file already hold. Warm re-reads of the mount that filled the cache (page
    /// cache dropped, 256 MiB of 16 MiB files, 15 passes each): median 193 -> 150 ms against a local
    /// file-backed mount's ~135 ms; cold lazy reads 593 -> 521 ms (5 alternating runs). A kernel that
    /// lacks the option refuses it at fsconfig: then the mount is made without it.
    func attachFileBacked(_ inner: PreparedMount) throws -> Attachment {
        guard !inner.options.erofs.contains("directio") else { return try FileBackend().attach(inner) }
        var direct = inner
        direct.options.erofs.append("directio")
        do { return try FileBackend().attach(direct) } catch let f as BackendFailure
            where f.detail.hasPrefix("fsconfig(directio)") {
            return try FileBackend().attach(inner)
        }
    }

    /// After the EROFS mount: the loop device (if any), then the FUSE mount, whose server exits
    /// when its connection ends.
    func release(_ record: MountRecord) { release(record, lazy: false) }

    func release(_ record: MountRecord, lazy: Bool) {
        guard let dir = record.fuseMount else { return }
        var inner = record
        inner.source = dir + "/" + String(decoding: BlobFilesystem.fileName, as: UTF8.self)
        if record.device != nil { LoopBackend().release(inner) }
        try? MountAPI.umount(dir, detach: true)
        _ = Glibc.rmdir(dir)
        if !lazy { ServedProcess.fuse.awaitExit(record) }
    }

    /// Where the kernel has no file-backed mounts, the image file is on a loop device.
    func deviceBound(_ r: MountRecord) -> Bool? { LoopBackend.bound(r) }

    func recognises(_ m: MountInfoEntry, as r: MountRecord) -> Bool {
        m.fsType == "erofs" && (m.source == r.device || r.fuseMount.map { m.source == $0 + "/image" } == true)
    }
}
