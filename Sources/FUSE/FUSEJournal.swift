import Glibc
import Synchronization
import Syscall

/// The requests read from /dev/fuse and not answered yet, in a memfd that outlives the server (the
/// supervisor or the daemon's fd store keeps it): a server started after a crash answers what its
/// predecessor had read. The kernel takes a reply to a request it is waiting on from any reader of
/// the connection, matched by the request's unique; uniques are never reused, so answering one the
/// dead server did answer fails harmlessly (ENOENT). Kernels from 6.9 can also be asked to resend
/// such requests; on older ones (6.1-6.8) a reader in flight at the crash would otherwise wait forever.
///
/// Slots of `slotSize` bytes: a state word (1: in flight), the length, the request. A request too
/// large for a slot (none a read-only filesystem answers is) or one arriving when all are taken is
/// served unrecorded.
public final class FUSEJournal: @unchecked Sendable {  // the mapping is shared memory; the free list behind its lock
    public static let slots = 1024
    public static let slotSize = 512
    public let fd: Int32
    private let base: UnsafeMutableRawPointer
    private let free: Mutex<[Int]>

    /// A new, empty journal's memfd.
    public static func create() throws -> Int32 {
        try Sys.memfd("erofs-compat-fuse-journal", holding: [UInt8](repeating: 0, count: slots * slotSize))
    }

    /// The journal in `fd` (this process's own descriptor: it stays open while the journal is used).
    public init(fd: Int32) throws {
        self.fd = fd
        base = try Sys.mapShared(fd, length: Self.slots * Self.slotSize)
        let start = base
        free = Mutex((0..<Self.slots).reversed().filter { Sys.loadAcquire(start + $0 * Self.slotSize) == 0 })
    }

    deinit { munmap(base, Self.slots * Self.slotSize) }

    /// Records a request just read; its slot, to clear once it is answered.
    public func record(_ request: ArraySlice<UInt8>) -> Int? {
        guard request.count <= Self.slotSize - 8, let slot = free.withLock({ $0.popLast() }) else { return nil }
        let p = base + slot * Self.slotSize
        request.withUnsafeBytes { (p + 8).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        p.advanced(by: 4).storeBytes(of: UInt32(request.count), as: UInt32.self)
        Sys.storeRelease(p, 1)
        return slot
    }

    /// The request in `slot` is answered.
    public func clear(_ slot: Int) {
        Sys.storeRelease(base + slot * Self.slotSize, 0)
        free.withLock { $0.append(slot) }
    }

    /// What a predecessor read and never answered: slots and requests (asked before serving, so
    /// none of them is this process's).
    public func pending() -> [(slot: Int, request: [UInt8])] {
        let taken = Set(free.withLock { $0 })
        return (0..<Self.slots).compactMap { slot in
            let p = base + slot * Self.slotSize
            guard !taken.contains(slot), Sys.loadAcquire(p) == 1 else { return nil }
            let n = Int(p.advanced(by: 4).load(as: UInt32.self))
            guard n <= Self.slotSize - 8 else { return nil }
            return (slot, Array(UnsafeRawBufferPointer(start: p + 8, count: n)))
        }
    }
}
