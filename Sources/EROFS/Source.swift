import Glibc
import Syscall
import SystemPackage

/// Random access to the bytes of an image. Implementations never assume the whole image is present
/// (the lazy cache of a remote image is one).
public protocol ImageSource: AnyObject {
    /// The image size in bytes.
    var size: UInt64 { get }
    /// Exactly `count` bytes at `offset`; fewer only at the end of the image.
    func read(at offset: UInt64, count: Int) throws -> [UInt8]
    /// A hint that these ranges are about to be read (a remote source fetches them in parallel).
    func prefetch(_ ranges: [ByteRange]) throws
    /// Up to `buffer.count` bytes at `offset` straight into `buffer` (fewer only at the end of the
    /// image); the count written.
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// Where exactly the bytes of [offset, offset+count) lie in a file this source keeps open, once
    /// they are there (a lazy source fetches and checks them first): for sendfile(2). nil when the
    /// source has no such file or the range runs past the end.
    func fileRegion(at offset: UInt64, count: Int) throws -> FileRegion?
}

/// A byte range of an open file: what a server can send with sendfile(2) instead of reading it.
public struct FileRegion: Sendable, Equatable {
    public var fd: Int32
    public var offset: UInt64
    public init(fd: Int32, offset: UInt64) { (self.fd, self.offset) = (fd, offset) }
}

extension ImageSource {
    public func prefetch(_ ranges: [ByteRange]) throws {}

    public func fileRegion(at offset: UInt64, count: Int) throws -> FileRegion? { nil }

    /// Through `read(at:count:)` and a copy, for sources without a direct path.
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let bytes = try read(at: offset, count: buffer.count)
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
        return bytes.count
    }
}

/// An image file read with pread(2).
public final class FileSource: ImageSource {
    public let path: String
    public let size: UInt64
    private let fd: Int32
    /// The open image, for a caller that must read exactly the file that was checked (an upload).
    public var descriptor: Int32 { fd }

    public init(path: String) throws {
        self.path = path
        let f = try Sys.open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY)
        fd = f.rawValue
        do {
            let st = try Sys.fstat(fd)
            guard st.st_mode & S_IFMT == S_IFREG || st.st_mode & S_IFMT == S_IFBLK else {
                throw EROFSError.notAnImageFile(st.st_mode & S_IFMT == S_IFDIR ? "a directory" : "not a regular file or block device")
            }
            size = UInt64(st.st_size)
        } catch { Sys.close(fd); throw error }
    }

    deinit { Sys.close(fd) }

    public func fileRegion(at offset: UInt64, count: Int) throws -> FileRegion? {
        offset + UInt64(count) <= size ? FileRegion(fd: fd, offset: offset) : nil
    }

    /// The streams being read ahead (see `readAhead`).
    private let streams = Locked(ReadStreams())
    /// How far ahead of a forward-moving reader the file is read.
    static let readAheadWindow: UInt64 = 8 << 20

    /// A reader moving forward through the file (a server walking a tree) gets the next window
    /// read in large requests. The kernel's own readahead keys on one position per open file, and
    /// a server's reads of inodes, indexes and data in different places, by several threads, make
    /// it see a random reader: it read an image in 41 KiB requests on average (1 473 single pages:
    /// a directory's inodes, spread among its files' data, read before the data) where the kernel's
    /// EROFS makes 1.3 MiB requests of the same image. A stream is read ahead from its third read
    /// on, so scattered reads make no hints.
    private func readAhead(_ offset: UInt64, _ count: Int) {
        let size = size
        guard let hint = streams.withLock({ $0.note(offset, offset + UInt64(count), window: Self.readAheadWindow,
                                                    fileSize: size) }) else { return }
        // A hint only: a file system without readahead makes plain preads of the same bytes.
        try? Sys.adviseWillNeed(fd, offset: Int64(hint.lowerBound), length: Int64(hint.count))
    }

    /// pread(2) straight into the caller's buffer (the FUSE server's reply).
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard buffer.count > 0, offset < size else { return 0 }
        let want = Int(min(UInt64(buffer.count), size - offset))
        readAhead(offset, want)
        var done = 0
        while done < want {
            let n: Int
            do {
                n = try Sys.pread(fd, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<want]), at: Int64(offset) + Int64(done))
            } catch {
                throw EROFSError.io(offset: offset + UInt64(done), length: want - done, errno: (error as? Errno)?.rawValue ?? -1)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard count > 0, offset < size else { return [] }
        let want = Int(min(UInt64(count), size - offset))
        readAhead(offset, want)
        do {
            return try Sys.preadFully(fd, count: want, at: Int64(offset))
        } catch {
            throw EROFSError.io(offset: offset, length: count, errno: (error as? Errno)?.rawValue ?? -1)
        }
    }
}

/// A few forward streams of reads in one file (a server reads one directory's inodes in one part of
/// an image while it reads another's file data), each with where its last read ended, how far
/// ahead the kernel was asked to read, how many reads followed one another, and when it was used.
struct ReadStreams {
    private struct Stream { var end, hinted, reads, used: UInt64 }
    private var list: [Stream] = []
    private var clock: UInt64 = 0
    static let maxStreams = 4
    /// The largest gap (or step back: threads race) between reads of one stream.
    static let gap: UInt64 = 1 << 20

    /// Records a read of [offset, end); the range to read ahead, if the read carries a stream of
    /// three or more reads to within half a window of what was hinted.
    mutating func note(_ offset: UInt64, _ end: UInt64, window: UInt64, fileSize: UInt64) -> Range<UInt64>? {
        clock += 1
        guard let i = list.firstIndex(where: { offset &+ Self.gap >= $0.end && offset <= $0.end &+ Self.gap }) else {
            if list.count >= Self.maxStreams, let lru = list.indices.min(by: { list[$0].used < list[$1].used }) {
                list.remove(at: lru)
            }
            list.append(Stream(end: end, hinted: end, reads: 1, used: clock))
            return nil
        }
        list[i].end = max(list[i].end, end)
        list[i].used = clock
        list[i].reads += 1
        guard list[i].reads >= 3, end + window / 2 > list[i].hinted else { return nil }
        let from = max(list[i].hinted, offset)
        list[i].hinted = min(fileSize, offset + window)
        return from < list[i].hinted ? from..<list[i].hinted : nil
    }
}

/// An in-memory image (tests, fuzzing).
public final class MemorySource: ImageSource {
    public let bytes: [UInt8]
    public var size: UInt64 { UInt64(bytes.count) }
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard count > 0, offset < size else { return [] }
        let end = Int(min(offset + UInt64(count), size))
        return Array(bytes[Int(offset)..<end])
    }
}

/// A byte range of the image.
public struct ByteRange: Sendable, Equatable, Hashable, Codable, Comparable {
    public var offset: UInt64
    public var length: UInt64
    public var end: UInt64 { offset + length }

    public init(offset: UInt64, length: UInt64) {
        self.offset = offset
        self.length = length
    }

    public static func < (a: ByteRange, b: ByteRange) -> Bool { (a.offset, a.length) < (b.offset, b.length) }

    /// Sorted, block-aligned and merged (touching or overlapping ranges become one).
    public static func normalize(_ ranges: [ByteRange], blockSize: UInt64, limit: UInt64) -> [ByteRange] {
        var aligned = ranges.filter { $0.length > 0 }.map { r -> ByteRange in
            let s = r.offset / blockSize * blockSize
            let e = min((r.end + blockSize - 1) / blockSize * blockSize, max(limit, s))
            return ByteRange(offset: s, length: e - s)
        }.filter { $0.length > 0 }
        aligned.sort()
        var out: [ByteRange] = []
        for r in aligned {
            if let last = out.last, r.offset <= last.end {
                out[out.count - 1].length = max(last.end, r.end) - last.offset
            } else {
                out.append(r)
            }
        }
        return out
    }
}

/// Wraps a source and records every range read through it.
public final class RecordingSource: ImageSource {
    public let base: ImageSource
    public private(set) var ranges: [ByteRange] = []
    public var size: UInt64 { base.size }
    public init(_ base: ImageSource) { self.base = base }
    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        ranges.append(ByteRange(offset: offset, length: UInt64(count)))
        return try base.read(at: offset, count: count)
    }
}
