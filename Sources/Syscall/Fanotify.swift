import CHeaders
import Glibc
import SystemPackage

/// fanotify(7) constants and calls, with the pre-content additions of Linux 6.14.
package enum Fanotify {
    package static let classNotif = ecx_fan_class_notif
    package static let classContent = ecx_fan_class_content
    package static let classPreContent = ecx_fan_class_pre_content
    package static let cloexec = ecx_fan_cloexec
    package static let nonblock = ecx_fan_nonblock
    package static let preAccess = ecx_fan_pre_access
    package static let openPerm = ecx_fan_open_perm
    package static let accessPerm = ecx_fan_access_perm
    package static let onDir = ecx_fan_ondir
    package static let markAdd = ecx_fan_mark_add
    package static let markRemove = ecx_fan_mark_remove
    package static let allow = ecx_fan_allow
    package static let deny = ecx_fan_deny
    package static let restartableFlagCandidates: [UInt32] = [ecx_fan_restartable_events_v1, ecx_fan_restartable_events_v2]
    package static let openQueueFdIoctl = ecx_fan_ioc_open_queue_fd

    package static func denyErrno(_ e: Errno) -> UInt32 { ecx_fan_deny_errno(e.rawValue) }

    package static func initGroup(_ flags: UInt32, eventFlags: Int32 = O_RDONLY | ecx_o_largefile | O_CLOEXEC) throws -> FileDescriptor {
        FileDescriptor(rawValue: try Sys.call { ecx_fanotify_init(flags, UInt32(bitPattern: eventFlags)) })
    }

    /// Marks the inode behind `fd` (path nil) or `path`.
    package static func mark(_ group: FileDescriptor, flags: UInt32, mask: UInt64, fd: Int32 = AT_FDCWD, path: String?) throws {
        _ = try Sys.call {
            if let path { return ecx_fanotify_mark(group.rawValue, flags, mask, fd, path) }
            return ecx_fanotify_mark(group.rawValue, flags, mask, fd, nil)
        }
    }

    /// Writes one response for the event whose descriptor number is `fd`.
    package static func respond(_ group: FileDescriptor, fd: Int32, response: UInt32) throws {
        var r = ecx_fanotify_response(fd: fd, response: response)
        _ = try withUnsafeBytes(of: &r) { try Sys.write(group.rawValue, $0) }
    }

    /// One decoded permission/notification event.
    package struct Event: Sendable, Equatable {
        package var mask: UInt64
        package var fd: Int32
        package var pid: Int32
        /// The FAN_EVENT_INFO_TYPE_RANGE record, if the event carried one.
        package var range: (offset: UInt64, count: UInt64)?

        package init(mask: UInt64, fd: Int32, pid: Int32, range: (offset: UInt64, count: UInt64)?) {
            self.mask = mask
            self.fd = fd
            self.pid = pid
            self.range = range
        }

        package static func == (a: Event, b: Event) -> Bool {
            a.mask == b.mask && a.fd == b.fd && a.pid == b.pid && a.range?.offset == b.range?.offset && a.range?.count == b.range?.count
        }
    }

    /// Errors in the event stream itself.
    package enum DecodeError: Error, Equatable {
        case versionMismatch(UInt8)
        case truncated(at: Int)
    }

    /// Parses a buffer returned by read(2) on a group descriptor.
    package static func decode(_ bytes: UnsafeRawBufferPointer) throws -> [Event] {
        var events: [Event] = []
        var off = 0
        let metaSize = MemoryLayout<ecx_fanotify_event_metadata>.size
        while off + metaSize <= bytes.count {
            let eventLen = Int(bytes.loadUnaligned(fromByteOffset: off, as: UInt32.self))
            let vers = bytes[off + 4]
            guard vers == ecx_fanotify_metadata_version else { throw DecodeError.versionMismatch(vers) }
            let metaLen = Int(bytes.loadUnaligned(fromByteOffset: off + 6, as: UInt16.self))
            guard eventLen >= metaLen, metaLen >= metaSize, off + eventLen <= bytes.count else { throw DecodeError.truncated(at: off) }
            var ev = Event(
                mask: bytes.loadUnaligned(fromByteOffset: off + 8, as: UInt64.self),
                fd: bytes.loadUnaligned(fromByteOffset: off + 16, as: Int32.self),
                pid: bytes.loadUnaligned(fromByteOffset: off + 20, as: Int32.self),
                range: nil)
            var info = off + metaLen
            while info + 4 <= off + eventLen {
                let type = bytes[info]
                let len = Int(bytes.loadUnaligned(fromByteOffset: info + 2, as: UInt16.self))
                guard len >= 4, info + len <= off + eventLen else { throw DecodeError.truncated(at: info) }
                if type == ecx_fan_event_info_type_range, len >= 24 {
                    ev.range = (bytes.loadUnaligned(fromByteOffset: info + 8, as: UInt64.self),
                                bytes.loadUnaligned(fromByteOffset: info + 16, as: UInt64.self))
                }
                info += len
            }
            events.append(ev)
            off += eventLen
        }
        return events
    }
}
