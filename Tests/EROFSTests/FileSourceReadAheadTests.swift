import Foundation
import Glibc
import Testing
@testable import EROFS
import TestSupport

/// A server reading forward through two parts of an image at once — a directory's inodes in one,
/// its files' data in another — gets both read ahead in large requests: the kernel's readahead
/// keys on one position per open file, sees a random reader there, and reads only the pages asked
/// for (a cold tree read through fuse-erofs made 6 627 disk requests, 311 with the hints).
@Suite struct FileSourceReadAheadTests {
    @Test func interleavedForwardReadsAreReadAhead() throws {
        let dir = try ScratchDir("readahead")
        defer { dir.remove() }
        let path = dir.file("image")
        #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: 0xa5, count: 48 << 20)))
        try #require(try evict(path), "the file's pages must leave the page cache for the test to mean anything")
        let source = try FileSource(path: path)
        let data: UInt64 = 24 << 20
        for k: UInt64 in 0..<4 {
            _ = try source.read(at: k * 32768, count: 64)  // inodes, a few apart
            _ = try source.read(at: data + k * 65536, count: 16384)  // their files' data
        }
        for (what, start) in [("inodes", UInt64(4 << 20)), ("data", data + (4 << 20))] {
            #expect(try waitResident(path, start, 1 << 20), "nothing of \(what) 4 MiB ahead was read ahead")
        }
        // A few reads here and there make no stream: nothing ahead of them is read.
        for k: UInt64 in 0..<3 { _ = try source.read(at: (40 << 20) + k * (3 << 20) % (8 << 20), count: 4096) }
        #expect(try resident(path, 47 << 20, 1 << 20) == 0)
    }

    /// The stream bookkeeping alone: a stream is hinted from its third read, a window at a time, and
    /// not again until its reads come within half a window of the hinted end; a fifth stream
    /// replaces the least recently used; a step back of less than the gap stays in the stream.
    @Test func streamsAreHintedFromTheirThirdRead() {
        var s = ReadStreams()
        let w: UInt64 = 8 << 20, size: UInt64 = 1 << 30
        #expect(s.note(0, 64, window: w, fileSize: size) == nil)
        #expect(s.note(32768, 32832, window: w, fileSize: size) == nil)
        #expect(s.note(65536, 65600, window: w, fileSize: size) == 65536..<(65536 + w))
        #expect(s.note(131072, 135168, window: w, fileSize: size) == nil, "well inside the hinted window")
        #expect(s.note(4 << 20, (4 << 20) + 4096, window: w, fileSize: size) == nil, "gap over 1 MiB: a new stream")
        let back = (4 << 20) - 4096 as UInt64
        #expect(s.note(back, back + 4096, window: w, fileSize: size) == nil, "a step back stays in that stream")
        #expect(s.note((4 << 20) + 4096, (4 << 20) + 8192, window: w, fileSize: size) != nil, "its third read")
        for k: UInt64 in 1...3 { _ = s.note(k << 28, (k << 28) + 64, window: w, fileSize: size) }
        // The first stream was the least recently used: it starts over (had it stayed, the third read
        // would fall inside its hinted window and make no hint).
        #expect(s.note(196608, 196672, window: w, fileSize: size) == nil)
        #expect(s.note(200704, 200768, window: w, fileSize: size) == nil)
        #expect(s.note(204800, 204864, window: w, fileSize: size) == 204800..<(204800 + w))
        #expect(s.note(size - 8192, size - 4096, window: w, fileSize: size) == nil)
        #expect(s.note(size - 4096, size, window: w, fileSize: size) == nil)
        #expect(s.note(size - 4096, size, window: w, fileSize: size) == (size - 4096)..<size, "up to the end")
        #expect(s.note(size - 4096, size, window: w, fileSize: size) == nil, "nothing past the end to read")
    }

    /// Writes back and drops the file's pages; true when none is left cached.
    private func evict(_ path: String) throws -> Bool {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw POSIXError(.ENOENT) }
        defer { close(fd) }
        fsync(fd)
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        return try resident(path, 0, 48 << 20) == 0
    }

    /// Pages of `path` in [start, start + length) that are in the page cache (mincore).
    private func resident(_ path: String, _ start: UInt64, _ length: Int) throws -> Int {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw POSIXError(.ENOENT) }
        defer { close(fd) }
        guard let map = mmap(nil, length, PROT_READ, MAP_SHARED, fd, off_t(start)), map != MAP_FAILED else {
            throw POSIXError(.ENOMEM)
        }
        defer { munmap(map, length) }
        var vec = [UInt8](repeating: 0, count: length / 4096)
        guard mincore(map, length, &vec) == 0 else { throw POSIXError(.EINVAL) }
        return vec.filter { $0 & 1 != 0 }.count
    }

    /// The kernel starts the hinted reads without waiting for them: allow it a moment.
    private func waitResident(_ path: String, _ start: UInt64, _ length: Int) throws -> Bool {
        for _ in 0..<100 {
            if try resident(path, start, length) > 0 { return true }
            usleep(10_000)
        }
        return false
    }
}
