import Syscall

/// Checks the 4 KiB blocks of a response against the fs-verity tree while they arrive and writes
/// those that match into the cache file straight away: nothing unchecked is ever written, and a
/// fetch does not hash and write its MiBs only after the last byte came. The tree's leaves for the
/// range are fetched before the request. One per request, used on its thread.
final class CheckedWriter: HTTPBodyObserver {
    let verifier: VerityVerifier
    let fd: Int32
    /// Where the response starts in the blob (block-aligned).
    let offset: UInt64
    /// Blocks checked so far, and the first of them not yet written.
    private var checked = 0
    private var unwritten = 0
    /// Blocks (numbered from the blob's start) that did not match.
    private var bad: [UInt64] = []
    private var failure: (any Error)?

    static let block = FsVerityTree.blockSize
    /// Matching blocks go out in writes of this size: one multi-MiB write makes the page cache allocate
    /// large folios, which in a VM whose freed memory goes back to the host (virtio-balloon free page
    /// reporting) fault every page in afresh — measured here: 256 MiB in 4 MiB writes took 0.05-0.6 s
    /// of system time, in 64 KiB writes 0.05 s.
    static let piece = 64 << 10

    init(verifier: VerityVerifier, fd: Int32, offset: UInt64, length: UInt64) throws {
        precondition(offset % UInt64(Self.block) == 0, "verification works on whole blocks")
        (self.verifier, self.fd, self.offset) = (verifier, fd, offset)
        if !verifier.levelBlocks.isEmpty, length > 0 {
            let b = UInt64(Self.block)
            try verifier.prefetchLeaves(offset / b, (length + b - 1) / b)
        }
    }

    func begin() {
        (checked, unwritten, bad, failure) = (0, 0, [], nil)
    }

    func received(_ body: UnsafeRawBufferPointer) {
        guard failure == nil else { return }
        do {
            while (checked + 1) * Self.block <= body.count {
                try check(body, count: Self.block)
                if (checked - unwritten) * Self.block >= Self.piece { try write(body, upTo: checked) }
            }
        } catch {
            failure = error
        }
    }

    /// Once the response is in (whole and for the range asked): the last, short block at the blob's
    /// end and what is left to write. The blocks that did not match.
    func finish(_ body: [UInt8]) throws -> [UInt64] {
        if let failure { throw failure }
        try body.withUnsafeBytes { b in
            while checked * Self.block < b.count {
                try check(b, count: min(Self.block, b.count - checked * Self.block))
            }
            try write(b, upTo: checked)
        }
        return bad
    }

    /// Checks the next block; one that does not match is never written (those before it are, now).
    private func check(_ body: UnsafeRawBufferPointer, count: Int) throws {
        let at = checked * Self.block
        let n = offset / UInt64(Self.block) + UInt64(checked)
        if try !verifier.matches(block: n, UnsafeRawBufferPointer(rebasing: body[at..<(at + count)])) {
            try write(body, upTo: checked)
            bad.append(n)
            unwritten = checked + 1
        }
        checked += 1
    }

    /// Writes the matching blocks from `unwritten` up to (not including) block `end`.
    private func write(_ body: UnsafeRawBufferPointer, upTo end: Int) throws {
        guard end > unwritten else { return }
        let from = unwritten * Self.block, to = min(end * Self.block, body.count)
        try Sys.pwriteAll(fd, UnsafeRawBufferPointer(rebasing: body[from..<to]), at: Int64(offset) + Int64(from))
        unwritten = end
    }
}
