import Glibc
import Probe
import Syscall
import SystemPackage

/// Kernel EROFS on a read-only, auto-clearing loop device over the image (LOOP_CONFIGURE, 5.8+).
struct LoopBackend: MountBackend {
    var kind: Backend { .loop }
    /// Direct I/O to the backing file (one copy of the image's pages in memory, not two).
    var directIO = true

    func attach(_ r: PreparedMount) throws -> Attachment {
        let backing: FileDescriptor
        do { backing = try Sys.open(r.source, O_RDONLY) } catch {
            throw BackendFailure(detail: "open \(r.source): \(error)", fallback: false)
        }
        defer { Sys.close(backing.rawValue) }
        let blockSize = UInt32(min(max(r.blockSize, 512), 4096))
        var lastError: Error?
        // GET_FREE and CONFIGURE race with other users of loop devices: retry on EBUSY.
        for _ in 0..<8 {
            let n: Int32
            let dev: FileDescriptor
            do {
                n = try Loop.getFree()
                dev = try Sys.open("/dev/loop\(n)", O_RDONLY)
            } catch {
                throw BackendFailure(detail: "allocating a loop device: \(error)", fallback: false)
            }
            defer { Sys.close(dev.rawValue) }
            do {
                do {
                    try Loop.configure(device: dev.rawValue, backing: backing.rawValue,
                                       flags: directIO ? [.readOnly, .autoClear, .directIO] : [.readOnly, .autoClear],
                                       blockSize: blockSize, offset: r.options.fsOffset)
                } catch let e as Errno where e == .invalidArgument {
                    // Direct I/O or this logical block size is not possible for the backing file.
                    try Loop.configure(device: dev.rawValue, backing: backing.rawValue, flags: [.readOnly, .autoClear],
                                       offset: r.options.fsOffset)
                }
            } catch let e as Errno where e == .resourceBusy {
                lastError = e
                continue
            } catch {
                throw BackendFailure(detail: "LOOP_CONFIGURE on /dev/loop\(n): \(error)",
                                     fallback: (error as? Errno) == .invalidArgument || (error as? Errno) == .inappropriateIOCTLForDevice)
            }
            do {
                try attachEROFS(source: "/dev/loop\(n)", at: r.target, options: r.options, passOffset: false)
            } catch {
                try? Loop.clear(device: dev.rawValue)
                throw error
            }
            // Closing our descriptor leaves the mount as the only user; autoclear detaches on umount.
            return Attachment(device: "/dev/loop\(n)")
        }
        throw BackendFailure(detail: "every free loop device was taken concurrently (\(lastError.map { "\($0)" } ?? "EBUSY"))", fallback: false)
    }

    /// Autoclear detaches the device when the mount goes; detach explicitly if it is still bound to
    /// this image (e.g. the mount was lazily detached while a file was open).
    func release(_ record: MountRecord) {
        guard let dev = record.device, let n = Self.index(dev) else { return }
        guard let backing = Loop.backingFile(n), backing == Self.backing(of: record) else { return }
        if let fd = try? Sys.open(dev, O_RDONLY) {
            try? Loop.clear(device: fd.rawValue)
            Sys.close(fd.rawValue)
        }
    }

    func deviceBound(_ r: MountRecord) -> Bool? { Self.bound(r) }

    /// N of /dev/loopN.
    static func index(_ device: String) -> Int32? {
        device.hasPrefix("/dev/loop") ? Int32(device.dropFirst("/dev/loop".count)) : nil
    }

    /// What a loop device of the record is backed by: the image, or fuse-blob's image file.
    static func backing(of r: MountRecord) -> String { r.fuseMount.map { $0 + "/image" } ?? r.cachePath ?? r.source }

    /// Whether the record's loop device is still backed by what it mounted (nil: not on a loop device).
    static func bound(_ r: MountRecord) -> Bool? {
        guard let dev = r.device, let n = index(dev) else { return nil }
        return Loop.backingFile(n) == backing(of: r)
    }
}
