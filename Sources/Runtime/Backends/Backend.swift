import Probe
import Syscall
import SystemPackage

/// A validated request, ready for a backend.
struct PreparedMount {
    var source: String
    var mountpoint: String
    var options: MountOptions
    var blockSize: Int
}

/// What a backend attached.
struct Attachment {
    var device: String?
    var workerPID: Int32?
}

/// A backend failure; `fallback` marks failures the planner could not foresee (ENOTBLK, ENODEV,
/// EOPNOTSUPP) after which `auto` may try the next candidate.
struct BackendFailure: Error {
    var detail: String
    var fallback: Bool
}

/// A way to attach an image at a mountpoint.
protocol MountBackend {
    var kind: Backend { get }
    func attach(_ request: PreparedMount) throws -> Attachment
    /// Releases what `attach` set up beyond the mount itself, after the mount is gone.
    func release(_ record: MountRecord)
}

enum Backends {
    static let all: [Backend: any MountBackend] = [.file: FileBackend(), .loop: LoopBackend()]
}

/// Builds and attaches an EROFS superblock from `source` with the new mount API, passing the EROFS
/// options; falls back to mount(2) when the kernel has no fsopen.
func attachEROFS(source: String, at mountpoint: String, options: MountOptions, passOffset: Bool) throws {
    let fc: MountAPI.Context
    do {
        fc = try MountAPI.fsopen("erofs")
    } catch let e as Errno where e == .noFunction {
        var data = options.erofs
        if passOffset, options.fsOffset > 0 { data.append("fsoffset=\(options.fsOffset)") }
        do {
            try MountAPI.mount(source: source, target: mountpoint, type: "erofs", flags: options.attributes.msFlags,
                               data: data.isEmpty ? nil : data.joined(separator: ","))
        } catch let e as Errno {
            throw BackendFailure(detail: "mount(2): \(e)", fallback: [.notBlockDevice, .operationNotSupportedByDevice, .notSupported].contains(e))
        }
        return
    } catch let e as Errno {
        throw BackendFailure(detail: "fsopen(erofs): \(e)", fallback: e == .operationNotSupportedByDevice)
    }
    func step(_ what: String, _ body: () throws -> Void) throws {
        do { try body() } catch let e as Errno {
            let log = MountAPI.log(fc).map { $0.hasPrefix("e ") || $0.hasPrefix("w ") ? String($0.dropFirst(2)) : $0 }
            let detail = "\(what): \(e)" + (log.isEmpty ? "" : " (kernel: \(log.joined(separator: "; ")))")
            throw BackendFailure(detail: detail, fallback: [.notBlockDevice, .operationNotSupportedByDevice, .notSupported].contains(e))
        }
    }
    try step("fsconfig(source)") { try MountAPI.setString(fc, "source", source) }
    // A read-only superblock: a block device source is then opened read-only too.
    try step("fsconfig(ro)") { try MountAPI.setFlag(fc, "ro") }
    for opt in options.erofs {
        if let eq = opt.firstIndex(of: "=") {
            try step("fsconfig(\(opt))") { try MountAPI.setString(fc, String(opt[..<eq]), String(opt[opt.index(after: eq)...])) }
        } else {
            try step("fsconfig(\(opt))") { try MountAPI.setFlag(fc, opt) }
        }
    }
    if passOffset, options.fsOffset > 0 {
        try step("fsconfig(fsoffset) (Linux 6.16+)") { try MountAPI.setString(fc, "fsoffset", String(options.fsOffset)) }
    }
    try step("FSCONFIG_CMD_CREATE") { try MountAPI.create(fc) }
    try step("fsmount/move_mount") { try MountAPI.attach(fc, attributes: options.attributes, at: mountpoint) }
}
