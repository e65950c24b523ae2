import Glibc
import Synchronization
import Syscall
import SystemPackage

/// Sends READ replies whose data lies in a file with splice(2): the header and the file's pages go
/// through a pipe into /dev/fuse without passing through the server, two copies fewer than
/// pread(2) + write(2). A pipe per concurrent sender, kept for reuse; a reply the pipes cannot hold
/// (or any failure before the device took it) is left to the caller's ordinary path.
public final class FUSESplicer: Sendable {
    public enum Outcome { case sent, failed }
    private let pipes = Mutex<[(r: Int32, w: Int32, capacity: Int)]>([])

    public init() {}

    deinit {
        for p in pipes.withLock({ $0 }) {
            Sys.close(p.r)
            Sys.close(p.w)
        }
    }

    /// Writes `header` and then `region`'s bytes to `device` as one message.
    public func send(_ header: [UInt8], _ region: FUSEFileRegion, to device: Int32) -> Outcome {
        guard let pipe = borrow() else { return .failed }
        let total = header.count + region.length
        // The header takes a pipe buffer of its own, the data one per page.
        guard region.length + 4096 <= pipe.capacity,
              header.withUnsafeBytes({ Glibc.write(pipe.w, $0.baseAddress, $0.count) }) == header.count else {
            return giveBack(pipe, drained: false)
        }
        var offset = Int64(region.offset)
        var moved = 0
        while moved < region.length {
            guard let n = try? Sys.splice(from: region.fd, offset: &offset, to: pipe.w, count: region.length - moved),
                  n > 0 else { return giveBack(pipe, drained: false) }
            moved += n
        }
        do {
            if try Sys.splice(from: pipe.r, offset: nil, to: device, count: total) == total {
                return giveBack(pipe, drained: true, .sent)
            }
        } catch let e as Errno where e == .noSuchFileOrDirectory {
            // The request was interrupted meanwhile: it needs no answer.
            return giveBack(pipe, drained: false, .sent)
        } catch {}
        return giveBack(pipe, drained: false)
    }

    private func borrow() -> (r: Int32, w: Int32, capacity: Int)? {
        if let p = pipes.withLock({ $0.popLast() }) { return p }
        guard let (r, w) = try? Sys.pipe() else { return nil }
        // 2 MiB holds the largest READ reply (1 MiB) and its header; unprivileged callers get less.
        let capacity = (try? Sys.setPipeSize(w, 2 << 20)) ?? (try? Sys.setPipeSize(w, 1 << 20)) ?? 65_536
        _ = fcntl(r, F_SETFL, fcntl(r, F_GETFL) | O_NONBLOCK)
        return (r, w, capacity)
    }

    /// Returns the pipe for reuse once empty (what a failed reply left in it is read out).
    private func giveBack(_ pipe: (r: Int32, w: Int32, capacity: Int), drained: Bool,
                          _ outcome: Outcome = .failed) -> Outcome {
        if !drained {
            var sink = [UInt8](repeating: 0, count: 65_536)
            while sink.withUnsafeMutableBytes({ Glibc.read(pipe.r, $0.baseAddress, $0.count) }) > 0 {}
        }
        pipes.withLock { $0.append(pipe) }
        return outcome
    }
}
