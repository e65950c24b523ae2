#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import EROFS
import FUSE
import Glibc
import Remote
import Syscall
import SystemPackage

/// The FUSE server processes. The supervisor owns the /dev/fuse descriptor for the mount's whole
/// life: it answers the kernel's INIT, then runs a serving child and restarts it if it dies. A
/// restarted child answers the requests its predecessor read but never answered, from the journal
/// the supervisor keeps (and where the kernel can, asks it to resend them: FUSE_NOTIFY_RESEND), so a
/// reader in flight at the crash gets its bytes from the successor.
public enum FuseWorker {
    public static func log(_ s: String) {
        let line = "\(Date()) erofs-compat fuse[\(Sys.processID)]: \(s)\n"
        _ = try? FileDescriptor.standardError.writeAll(Array(line.utf8))
    }

    /// The supervisor; `ready` gets "ready" once a child serves, or "error: …". `negotiated`: the
    /// connection is taken over (from the daemon) with what INIT negotiated and its request journal
    /// (`journalFD`), so its first child answers what the previous server had read. Returns the exit status.
    public static func supervise(spec: [UInt8], fuseFD: Int32, readyFD: Int32,
                                 negotiated: ServeSpec.Negotiated? = nil, journalFD: Int32? = nil) -> Int32 {
        func ready(_ line: String) {
            _ = try? FileDescriptor(rawValue: readyFD).writeAll(Array((line + "\n").utf8))
            Sys.close(readyFD)
        }
        let given = negotiated.map { (FUSEInitFlags(rawValue: $0.flags), $0.minor) }
        let whole = negotiated == nil ? (try? JSONDecoder().decode(ServeSpec.self, from: Data(spec)))?.openWholeBlobFile()
            : nil
        defer { whole.map { Sys.close($0.rawValue) } }
        guard let (flags, minor) = given ?? handshake(fuseFD, passthrough: whole != nil) else {
            ready("error: the kernel sent no FUSE INIT request")
            return 1
        }
        let backing = negotiated?.backing ?? whole.flatMap { registerBacking(fuseFD, $0, offered: flags, log: log) }
        guard let journal = journalFD ?? (try? FUSEJournal.create()) else {
            ready("error: cannot create the FUSE request journal")
            return 1
        }
        var readySent = false
        var restarts = negotiated == nil ? 0 : 1
        while true {
            let started = ContinuousClock.now
            let child = try? startChild(spec: spec, fuseFD: fuseFD, journalFD: journal, flags: flags, minor: minor,
                                        backing: backing, resend: restarts > 0)
            guard let (pid, status) = child else {
                if !readySent { ready("error: cannot start the FUSE server") }
                return 1
            }
            let first = Sys.readLine(status, timeoutMs: 120_000)
            Sys.close(status)
            if !readySent {
                guard first == "serving" else {
                    _ = try? Sys.kill(pid, SIGKILL)
                    _ = Sys.wait(pid)
                    ready(first.hasPrefix("error: ") ? first : "error: the FUSE server exited before it served")
                    return 1
                }
                ready(Ready.line(passthrough: backing != nil))
                readySent = true
            }
            let (code, signal) = Sys.wait(pid)
            if code == 0 {
                // The connection ended (the mount is gone, also after a lazy umount).
                (try? JSONDecoder().decode(ServeSpec.self, from: Data(spec)))?.servingEnded()
                return 0
            }
            if ContinuousClock.now - started > .seconds(60) { restarts = 0 }
            restarts += 1
            log("server \(pid) died (\(signal.map { "signal \($0)" } ?? "exit \(code ?? -1)")); restart \(restarts)")
            guard restarts <= 50 else {
                log("giving up after \(restarts) restarts; readers get ENOTCONN")
                return 1
            }
            usleep(UInt32(min(restarts, 10)) * 50_000)
        }
    }

    /// A supervisor's "ready" (or "ready passthrough": the blob file reads its backing file).
    public struct Ready: Sendable {
        public var pid: Int32
        public var passthrough: Bool

        init(pid: Int32, passthrough: Bool) { (self.pid, self.passthrough) = (pid, passthrough) }

        init?(_ line: String, pid: Int32 = 0) {
            guard line == "ready" || line == "ready passthrough" else { return nil }
            (self.pid, passthrough) = (pid, line == "ready passthrough")
        }

        static func line(passthrough: Bool) -> String { passthrough ? "ready passthrough" : "ready" }
    }

    /// Reads and answers INIT (within 10 s of the mount): the kernel's flags and minor version.
    /// `passthrough`: ask for FUSE passthrough (the blob file has a whole backing file).
    static func handshake(_ fd: Int32, passthrough: Bool = false) -> (FUSEInitFlags, UInt32)? {
        let session = FUSESession(filesystem: BlobFilesystem(size: 0, mtime: 0) { _, _ in [] }, passthrough: passthrough)
        var buffer = FUSELayout.newRequestBuffer()
        guard (try? Sys.poll(fd, timeoutMs: 10_000)) == true,
              let n = try? buffer.withUnsafeMutableBytes({ try Sys.read(fd, into: $0) }),
              let req = FUSERequest(buffer[0..<n]), req.opcode == FUSEOpcode.initialize.rawValue,
              let reply = session.handle(buffer[0..<n]),
              (try? FileDescriptor(rawValue: fd).writeAll(reply)) != nil else { return nil }
        return (session.kernelFlags, session.stats.kernelMinor)
    }

    /// Registers `file` as the connection's passthrough backing file once INIT negotiated passthrough
    /// (the kernel offered it): its id, or nil (said in the log) when the kernel refuses it.
    static func registerBacking(_ fuseFD: Int32, _ file: FileDescriptor, offered: FUSEInitFlags,
                                log: (String) -> Void) -> Int32? {
        guard offered.contains(.passthrough) else { return nil }
        do {
            return try Sys.fuseBackingOpen(device: fuseFD, file: file.rawValue)
        } catch {
            log("FUSE passthrough not used: FUSE_DEV_IOC_BACKING_OPEN: \(error); the server answers every read")
            return nil
        }
    }

    /// Spawns a serving child with the spec on a pipe; returns its pid and the read end of its status pipe.
    static func startChild(spec: [UInt8], fuseFD: Int32, journalFD: Int32, flags: FUSEInitFlags, minor: UInt32,
                           backing: Int32?, resend: Bool) throws -> (Int32, Int32) {
        try ServedProcess.startChild(spec: spec, keeping: [fuseFD, journalFD]) { specFD, statusFD in
            ["__fuse-serve", "--child", "--fuse-fd", String(fuseFD), "--spec-fd", String(specFD),
             "--status-fd", String(statusFD), "--kernel-flags", String(flags.rawValue), "--kernel-minor", String(minor),
             "--journal-fd", String(journalFD)] + (resend ? ["--resend"] : [])
                + (backing.map { ["--backing-id", String($0)] } ?? [])
        }
    }

    /// A serving child: opens what the spec names, says "serving" (or "error: …") on `statusFD`,
    /// and serves until the connection ends.
    public static func serve(spec specBytes: [UInt8], fuseFD: Int32, statusFD: Int32, kernelFlags: UInt64,
                             kernelMinor: UInt32, backing: Int32?, journalFD: Int32?, resend: Bool) -> Int32 {
        let status = FileDescriptor(rawValue: statusFD)
        let served: (FUSEFilesystem, ServedSource)
        let spec: ServeSpec
        do {
            spec = try JSONDecoder().decode(ServeSpec.self, from: Data(specBytes))
            served = try openFilesystem(spec, backing: backing)
        } catch {
            log("cannot serve: \(error)")
            _ = try? status.writeAll(Array("error: \(error)\n".utf8))
            return 2
        }
        defer { served.1.close() }
        let session = FUSESession(filesystem: served.0)
        session.resume(kernelFlags: FUSEInitFlags(rawValue: kernelFlags), kernelMinor: kernelMinor)
        let server = FUSEServer(session: session, fd: fuseFD, journal: journalFD.flatMap { try? FUSEJournal(fd: $0) })
        if resend { takeOver(server, log: log) }
        _ = try? status.writeAll(Array("serving\n".utf8))
        Sys.close(statusFD)
        let stop = Locked(false)
        Threads.detach { served.1.writeStatsWhileServing(to: spec.statsPath, until: stop) { session.stats } }
        server.run(threads: max(1, spec.threads))
        stop.set(true)
        log("the FUSE connection ended; exiting")
        return 0
    }

    /// A successor's first duty: answer what the dead server had read (its journal), and where the
    /// kernel can, have it resend such requests too (one read in the moment before it was journaled).
    static func takeOver(_ server: FUSEServer, log: (String) -> Void) {
        let answered = server.answerJournaled()
        let asked = server.requestResend()
        log("answered \(answered) requests the previous server had read, from its journal"
            + (asked ? "; asked the kernel to resend unanswered requests" : " (the kernel cannot resend requests)"))
    }

    /// The source opened and its filesystem made; `backing`: the blob file's passthrough backing id;
    /// `fetcher`: the mount's own (in the daemon).
    static func openFilesystem(_ spec: ServeSpec, backing: Int32? = nil, fetcher: HTTPBlob? = nil,
                               runtime: Runtime = Runtime()) throws -> (FUSEFilesystem, ServedSource) {
        let served = try runtime.openServedSource(spec, fetcher: fetcher)
        let mtime = UInt64(Date().timeIntervalSince1970)
        switch spec.filesystem {
        case .blob:
            let fs = BlobFilesystem(size: served.size, mtime: mtime, backing: backing,
                                    read: { try served.read(offset: $0, length: $1) },
                                    region: { try served.region(offset: $0, length: $1) })
            return (fs, served)
        case .erofs:
            do {
                return (ErofsFilesystem(image: try EROFSImage(source: ServedImageSource(served))), served)
            } catch {
                served.close()
                throw error
            }
        }
    }
}

/// A served source as the EROFS reader's image source (fuse-erofs over a lazy remote blob or a
/// local file).
final class ServedImageSource: ImageSource, @unchecked Sendable {  // immutable; ServedSource is thread-safe
    let served: ServedSource
    var size: UInt64 { served.size }
    init(_ served: ServedSource) { self.served = served }

    func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard offset < size else { return [] }
        return try served.read(offset: offset, length: Int(min(UInt64(count), size - offset)))
    }

    func fileRegion(at offset: UInt64, count: Int) throws -> FileRegion? {
        guard offset + UInt64(count) <= size else { return nil }
        return try served.region(offset: offset, length: count)
    }
}
