import Foundation
import Glibc
import Syscall
import TestSupport
import Testing
@testable import FUSE

/// A two-node filesystem: the root directory and one file "f" of 10 000 bytes (byte i is i % 251).
final class TinyFS: FUSEFilesystem, @unchecked Sendable {
    func attr(_ node: UInt64) -> FUSEAttr {
        node == 1 ? FUSEAttr(ino: 1, size: 0, blocks: 0, mtime: 7, mtimeNsec: 9, mode: 0o40755, nlink: 2, uid: 0, gid: 0, rdev: 0, blockSize: 4096)
            : FUSEAttr(ino: 5, size: 10_000, blocks: 24, mtime: 7, mtimeNsec: 9, mode: 0o100644, nlink: 1, uid: 1, gid: 2, rdev: 0, blockSize: 4096)
    }
    func lookup(parent: UInt64, name: [UInt8]) throws(FUSEError) -> FUSEEntry {
        guard name == Array("f".utf8) else { throw .noEntry }
        return FUSEEntry(node: 2, attr: attr(2))
    }
    func getattr(_ node: UInt64) throws(FUSEError) -> FUSEAttr { attr(node) }
    func readlink(_ node: UInt64) throws(FUSEError) -> [UInt8] { throw .invalid }
    func open(_ node: UInt64, directory: Bool) throws(FUSEError) {}
    func read(_ node: UInt64, offset: UInt64, size: Int) throws(FUSEError) -> [UInt8] {
        guard offset < 10_000 else { return [] }
        if offset == 4096 { throw .io }
        return (offset..<min(10_000, offset + UInt64(size))).map { UInt8($0 % 251) }
    }
    func readdir(_ node: UInt64, after: UInt64, plus: Bool) throws(FUSEError) -> [FUSEDirEntry] {
        let all = [FUSEDirEntry(name: [0x2e], ino: 1, type: 4, cookie: 1, entry: nil),
                   FUSEDirEntry(name: [0x2e, 0x2e], ino: 1, type: 4, cookie: 2, entry: nil),
                   FUSEDirEntry(name: Array("f".utf8), ino: 5, type: 8, cookie: 3, entry: FUSEEntry(node: 2, attr: attr(2)))]
        return Array(all.dropFirst(Int(after)))
    }
    func getxattr(_ node: UInt64, name: [UInt8]) throws(FUSEError) -> [UInt8] {
        guard name == Array("user.k".utf8) else { throw .noData }
        return Array("value".utf8)
    }
    func listxattr(_ node: UInt64) throws(FUSEError) -> [[UInt8]] { [Array("user.k".utf8), Array("user.j".utf8)] }
    func statfs() -> FUSEStatfs { FUSEStatfs(blocks: 100, files: 2, blockSize: 4096) }
}

/// A request as the kernel frames it: fuse_in_header then the arguments.
func request(_ opcode: FUSEOpcode, unique: UInt64, node: UInt64 = 1, _ args: [UInt8] = []) -> ArraySlice<UInt8> {
    var w = WireWriter()
    w.u32(UInt32(40 + args.count))
    w.u32(opcode.rawValue)
    w.u64(unique)
    w.u64(node)
    for v: UInt32 in [1000, 1000, 42, 0] { w.u32(v) }
    w.append(args)
    return w.bytes[...]
}

func u32s(_ values: [UInt32]) -> [UInt8] {
    var w = WireWriter()
    values.forEach { w.u32($0) }
    return w.bytes
}

/// fuse_read_in: file handle, offset, size, then flags the session ignores.
func readArgs(offset: UInt64, size: UInt32) -> [UInt8] {
    var w = WireWriter()
    w.u64(0)
    w.u64(offset)
    w.u32(size)
    w.zeros(20)
    return w.bytes
}

/// The out header's (length, error, unique) and the payload.
func parse(_ reply: [UInt8]?) throws -> (len: UInt32, error: Int32, unique: UInt64, payload: [UInt8]) {
    let r = try #require(reply)
    let rd = WireReader(r[...])
    return (rd.u32(0), Int32(bitPattern: rd.u32(4)), rd.u64(8), Array(r.dropFirst(16)))
}

/// The session, driven with byte buffers shaped like the kernel's (no /dev/fuse, no root).
struct FUSESessionTests {
    func initialized(minor: UInt32 = 45, flags: UInt64 = 0xffff_ffff_ffff) throws -> FUSESession {
        let s = FUSESession(filesystem: TinyFS())
        let lo = UInt32(truncatingIfNeeded: flags), hi = UInt32(flags >> 32)
        let reply = try parse(s.handle(request(.initialize, unique: 1, u32s([7, minor, 131_072, lo, hi] + Array(repeating: 0, count: 11)))))
        #expect(reply.error == 0)
        return s
    }

    /// INIT: our major, the lower minor, the kernel's readahead, and only flags both sides have.
    @Test func initNegotiatesFlagsAndSizes() throws {
        let s = FUSESession(filesystem: TinyFS())
        let offered: UInt64 = 1 << 0 | 1 << 13 | 1 << 22 | 1 << 30 | 1 << 39
        let r = try parse(s.handle(request(.initialize, unique: 9, u32s([7, 45, 65536, UInt32(offered & 0xffff_ffff), UInt32(offered >> 32)]))))
        #expect(r.len == 16 + 64 && r.unique == 9 && r.error == 0)
        let p = WireReader(r.payload[...])
        #expect(p.u32(0) == 7 && p.u32(4) == FUSELayout.protocolMinor && p.u32(8) == 65536)
        let flags = UInt64(p.u32(12)) | UInt64(p.u32(32)) << 32
        #expect(flags == 1 << 0 | 1 << 13 | 1 << 22 | 1 << 30, "resend is the kernel's capability, not requested")
        #expect(p.u32(28) & 0xffff == UInt32(FUSESession.maxPages))
        #expect(s.kernelFlags.contains(.hasResend))
    }

    @Test func requestsBeforeInitFailAndOldProtocolsAreRefused() throws {
        let s = FUSESession(filesystem: TinyFS())
        #expect(try parse(s.handle(request(.getattr, unique: 2))).error == -5)
        #expect(try parse(s.handle(request(.initialize, unique: 3, u32s([7, 22, 0, 0])))).error == -22)
    }

    @Test func lookupAnswersEntriesAndCachesMisses() throws {
        let s = try initialized()
        let hit = try parse(s.handle(request(.lookup, unique: 4, Array("f".utf8) + [0])))
        #expect(hit.error == 0 && hit.payload.count == FUSELayout.entryOut)
        let e = WireReader(hit.payload[...])
        #expect(e.u64(0) == 2 && e.u64(16) == s.validSeconds)
        #expect(e.u64(40) == 5 && e.u64(48) == 10_000, "ino and size of fuse_attr")
        #expect(e.u32(40 + 60) == 0o100644 && e.u32(40 + 72) == 2, "mode and gid")
        let miss = try parse(s.handle(request(.lookup, unique: 5, Array("nope".utf8) + [0])))
        #expect(miss.error == 0 && WireReader(miss.payload[...]).u64(0) == 0, "a negative entry, node 0")
    }

    @Test func getattrAndStatfsHaveTheirSizes() throws {
        let s = try initialized()
        let a = try parse(s.handle(request(.getattr, unique: 6, node: 2, [UInt8](repeating: 0, count: 16))))
        #expect(a.payload.count == FUSELayout.attrOut && WireReader(a.payload[...]).u64(16 + 8) == 10_000)
        let st = try parse(s.handle(request(.statfs, unique: 7)))
        #expect(st.payload.count == FUSELayout.statfsOut && WireReader(st.payload[...]).u64(0) == 100)
    }


    /// Reads answer exactly the bytes asked for (short only at the end), a failing source is EIO.
    @Test func readReturnsBytesOrEIO() throws {
        let s = try initialized()
        let r = try parse(s.handle(request(.read, unique: 8, node: 2, readArgs(offset: 9000, size: 4096))))
        #expect(r.payload == (9000..<10_000).map { UInt8($0 % 251) })
        #expect(try parse(s.handle(request(.read, unique: 9, node: 2, readArgs(offset: 4096, size: 4096)))).error == -5)
        #expect(s.stats.reads == 1 && s.stats.readBytes == 1000 && s.stats.errors == 1)
    }

    @Test func openForWritingIsReadOnly() throws {
        let s = try initialized(flags: 0xffff_ffff_ffff & ~(1 << 17 | 1 << 24))
        #expect(try parse(s.handle(request(.open, unique: 10, node: 2, u32s([2, 0])))).error == -30)
        let ok = try parse(s.handle(request(.open, unique: 11, node: 2, u32s([0, 0]))))
        #expect(ok.error == 0 && WireReader(ok.payload[...]).u32(8) & FUSEOpenFlags.keepCache.rawValue != 0)
        #expect(try parse(s.handle(request(.mkdir, unique: 12, u32s([0o755, 0]) + Array("d".utf8) + [0]))).error == -30)
    }

    /// With FUSE_NO_OPEN(DIR)_SUPPORT offered, a read-only open answers ENOSYS: the kernel then opens
    /// by itself with the page cache kept; a write open is still EROFS.
    @Test func zeroMessageOpenWhereTheKernelSupportsIt() throws {
        let s = try initialized()
        #expect(try parse(s.handle(request(.open, unique: 30, node: 2, u32s([0, 0])))).error == -38)
        #expect(try parse(s.handle(request(.opendir, unique: 31, node: 1, u32s([0, 0])))).error == -38)
        #expect(try parse(s.handle(request(.open, unique: 32, node: 2, u32s([2, 0])))).error == -30)
        #expect(s.stats.errors == 1, "only the write open counts as an error")
    }

    /// Passthrough is asked for only when wanted and offered, with a stacking depth of one; max_write
    /// is the reply size, not 4 KiB.
    @Test func initAsksForPassthroughOnlyWhenWantedAndOffered() throws {
        func initOut(wanted: Bool, offered: UInt64) throws -> WireReader {
            let s = FUSESession(filesystem: TinyFS(), passthrough: wanted)
            let args = u32s([7, 45, 65536, UInt32(offered & 0xffff_ffff), UInt32(offered >> 32)])
            return WireReader(try parse(s.handle(request(.initialize, unique: 1, args))).payload[...])
        }
        let offered: UInt64 = 1 << 30 | 1 << 37
        let yes = try initOut(wanted: true, offered: offered)
        #expect(UInt64(yes.u32(32)) << 32 & FUSEInitFlags.passthrough.rawValue != 0 && yes.u32(36) == 1)
        #expect(yes.u32(20) == FUSESession.maxWrite)
        for (wanted, kernel) in [(false, offered), (true, UInt64(1 << 30))] {
            let no = try initOut(wanted: wanted, offered: kernel)
            #expect(no.u32(32) == 0 && no.u32(36) == 0, "wanted \(wanted), offered \(kernel)")
        }
    }

    /// A node with a backing file is opened with FOPEN_PASSTHROUGH and its id, even where the kernel
    /// could open without asking (the reply must name the backing file); other nodes as before.
    @Test func aBackedFileIsOpenedForPassthrough() throws {
        let s = FUSESession(filesystem: WalkFS(backing: 7), passthrough: true)
        _ = try parse(s.handle(request(.initialize, unique: 1, u32s([7, 45, 65536, 0xffff_ffff, 0xffff]))))
        let r = try parse(s.handle(request(.open, unique: 2, node: 2, u32s([0, 0]))))
        let open = WireReader(r.payload[...])
        #expect(r.error == 0 && open.u32(8) & FUSEOpenFlags.passthrough.rawValue != 0 && open.u32(12) == 7)
        #expect(open.u32(8) & FUSEOpenFlags.keepCache.rawValue == 0)
        #expect(try parse(s.handle(request(.opendir, unique: 3, node: 1, u32s([0, 0])))).error == -38)
        #expect(s.stats.passthroughOpens == 1)
    }

    /// A READ from the start of a file pushes the files that follow it as FUSE_NOTIFY_STORE
    /// messages (whole bytes, unique 0, code 4), once each; a READ further in pushes nothing.
    @Test func aReadFromAFilesStartPushesTheNextFiles() throws {
        let s = FUSESession(filesystem: WalkFS())
        _ = try parse(s.handle(request(.initialize, unique: 1, u32s([7, 45, 65536, 0, 0]))))
        #expect(s.pushAhead(request(.read, unique: 2, node: 2, readArgs(offset: 4096, size: 4096))).isEmpty)
        let pushed = s.pushAhead(request(.read, unique: 3, node: 2, readArgs(offset: 0, size: 4096)))
        #expect(pushed.count == 2)
        for (k, node) in [UInt64(3), 4].enumerated() {
            let m = WireReader(pushed[k][...])
            #expect(m.u32(0) == UInt32(16 + 24 + 100) && Int32(bitPattern: m.u32(4)) == 4 && m.u64(8) == 0)
            #expect(m.u64(16) == node && m.u64(24) == 0 && m.u32(32) == 100)
            #expect(Array(pushed[k].dropFirst(40)) == [UInt8](repeating: UInt8(node), count: 100))
        }
        #expect(s.pushAhead(request(.read, unique: 4, node: 2, readArgs(offset: 0, size: 4096))).isEmpty, "once each")
    }

    /// Each pushed file is handed on before the next is read: the reader wants the first of them
    /// first, and waiting for the last one's bytes before sending any made it overtake the pushes.
    @Test func pushedFilesAreSentAsTheyAreRead() throws {
        let fs = WalkFS()
        let s = FUSESession(filesystem: fs)
        _ = try parse(s.handle(request(.initialize, unique: 1, u32s([7, 45, 65536, 0, 0]))))
        s.pushAhead(request(.read, unique: 2, node: 2, readArgs(offset: 0, size: 4096))) { message in
            fs.log.append("send \(WireReader(message[...]).u64(16))")
        }
        #expect(fs.log == ["read 3", "send 3", "read 4", "send 4"])
    }

    /// Entries are 8-byte aligned, stop before overflowing the buffer, and continue from a cookie.
    @Test func readdirPagesWithStableCookies() throws {
        let s = try initialized()
        let all = try parse(s.handle(request(.readdir, unique: 13, readArgs(offset: 0, size: 4096))))
        #expect(all.payload.count == 3 * 32)
        let one = try parse(s.handle(request(.readdir, unique: 14, readArgs(offset: 0, size: 40))))
        #expect(one.payload.count == 32 && WireReader(one.payload[...]).u64(8) == 1)
        let rest = try parse(s.handle(request(.readdir, unique: 15, readArgs(offset: 2, size: 4096))))
        #expect(rest.payload.count == 32 && rest.payload[24] == UInt8(ascii: "f"))
        let plus = try parse(s.handle(request(.readdirplus, unique: 16, readArgs(offset: 0, size: 4096))))
        #expect(plus.payload.count == 3 * (128 + 32))
        #expect(WireReader(plus.payload[...]).u64(0) == 0, "\".\" carries no entry")
        #expect(WireReader(plus.payload[...]).u64(2 * 160) == 2, "\"f\" carries its node")
    }

    /// size 0 asks for the length; a short buffer is ERANGE; a missing name ENODATA.
    @Test func xattrsFollowTheSizeProtocol() throws {
        let s = try initialized()
        let name = Array("user.k".utf8) + [0]
        #expect(WireReader(try parse(s.handle(request(.getxattr, unique: 17, u32s([0, 0]) + name))).payload[...]).u32(0) == 5)
        #expect(try parse(s.handle(request(.getxattr, unique: 18, u32s([3, 0]) + name))).error == -34)
        #expect(try parse(s.handle(request(.getxattr, unique: 19, u32s([64, 0]) + name))).payload == Array("value".utf8))
        #expect(try parse(s.handle(request(.getxattr, unique: 20, u32s([64, 0]) + Array("user.z".utf8) + [0]))).error == -61)
        let list = try parse(s.handle(request(.listxattr, unique: 21, u32s([64, 0]))))
        #expect(list.payload == Array("user.k\0user.j\0".utf8))
    }

    @Test func forgetsGetNoReplyAndUnknownOpcodesAreENOSYS() throws {
        let s = try initialized()
        #expect(s.handle(request(.forget, unique: 22, node: 2, [1, 0, 0, 0, 0, 0, 0, 0])) == nil)
        #expect(s.handle(request(.interrupt, unique: 23, [0, 0, 0, 0, 0, 0, 0, 0])) == nil)
        #expect(try parse(s.handle(request(.lseek, unique: 24, node: 2))).error == -38)
        #expect(s.handle(request(.getattr, unique: 25).dropLast(1)) == nil, "a truncated request is dropped")
    }

    @Test func resendNotificationIsFramedAsTheKernelExpects() throws {
        let n = try parse(FUSEReply.notify(FUSELayout.notifyResend))
        #expect(n.len == 16 && n.error == 7 && n.unique == 0)
    }
}

extension FUSESession {
    /// The messages `pushAhead` sends, collected.
    func pushAhead(_ bytes: ArraySlice<UInt8>) -> [[UInt8]] {
        var out: [[UInt8]] = []
        pushAhead(bytes) { out.append($0) }
        return out
    }
}

/// Three files of 100 bytes (node n holds n), read in the order 2, 3, 4; node 2 has passthrough
/// backing id `backingID` when one is given.
final class WalkFS: FUSEFilesystem, @unchecked Sendable {
    let tiny = TinyFS()
    let backingID: Int32?
    /// "read N" for every read, in order (tests add what they observe between reads).
    var log: [String] = []
    init(backing: Int32? = nil) { backingID = backing }
    func lookup(parent: UInt64, name: [UInt8]) throws(FUSEError) -> FUSEEntry { try tiny.lookup(parent: parent, name: name) }
    func getattr(_ node: UInt64) throws(FUSEError) -> FUSEAttr { try tiny.getattr(node) }
    func readlink(_ node: UInt64) throws(FUSEError) -> [UInt8] { throw .invalid }
    func open(_ node: UInt64, directory: Bool) throws(FUSEError) {}
    func read(_ node: UInt64, offset: UInt64, size: Int) throws(FUSEError) -> [UInt8] {
        log.append("read \(node)")
        return [UInt8](repeating: UInt8(node), count: max(0, min(size, 100 - Int(offset))))
    }
    func readdir(_ node: UInt64, after: UInt64, plus: Bool) throws(FUSEError) -> [FUSEDirEntry] { [] }
    func getxattr(_ node: UInt64, name: [UInt8]) throws(FUSEError) -> [UInt8] { throw .noData }
    func listxattr(_ node: UInt64) throws(FUSEError) -> [[UInt8]] { [] }
    func statfs() -> FUSEStatfs { tiny.statfs() }
    func readRegion(_ node: UInt64, offset: UInt64, size: Int) throws(FUSEError) -> FUSEFileRegion? { nil }
    func backing(_ node: UInt64) -> Int32? { node == 2 ? backingID : nil }
    func following(_ node: UInt64, limit: Int) -> [(node: UInt64, size: UInt64)] {
        (node + 1...4).prefix(limit).map { ($0, 100) }
    }
}

/// TinyFS whose file's bytes also lie in a real file, as a flat image's data does.
final class RegionFS: FUSEFilesystem, @unchecked Sendable {
    let tiny = TinyFS()
    let fd: Int32
    init(fd: Int32) { self.fd = fd }
    func lookup(parent: UInt64, name: [UInt8]) throws(FUSEError) -> FUSEEntry {
        try tiny.lookup(parent: parent, name: name)
    }
    func getattr(_ node: UInt64) throws(FUSEError) -> FUSEAttr { try tiny.getattr(node) }
    func readlink(_ node: UInt64) throws(FUSEError) -> [UInt8] { throw .invalid }
    func open(_ node: UInt64, directory: Bool) throws(FUSEError) {}
    func read(_ node: UInt64, offset: UInt64, size: Int) throws(FUSEError) -> [UInt8] {
        try tiny.read(node, offset: offset, size: size)
    }
    func readRegion(_ node: UInt64, offset: UInt64, size: Int) throws(FUSEError) -> FUSEFileRegion? {
        guard offset < 10_000 else { return nil }
        return FUSEFileRegion(fd: fd, offset: offset, length: Int(min(UInt64(size), 10_000 - offset)))
    }
    func readdir(_ node: UInt64, after: UInt64, plus: Bool) throws(FUSEError) -> [FUSEDirEntry] { [] }
    func getxattr(_ node: UInt64, name: [UInt8]) throws(FUSEError) -> [UInt8] { throw .noData }
    func listxattr(_ node: UInt64) throws(FUSEError) -> [[UInt8]] { [] }
    func statfs() -> FUSEStatfs { tiny.statfs() }
}

/// READ replies spliced from a file: `respond` gives the header and the region, and the splicer
/// delivers exactly header + bytes as one message (here into a socket, as into /dev/fuse).
struct FUSESpliceTests {
    @Test func readRepliesAreSplicedFromTheFile() throws {
        let dir = try ScratchDir("fuse-splice")
        defer { dir.remove() }
        let path = dir.file("data")
        let bytes = (0..<10_000).map { UInt8($0 % 251) }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        defer { Glibc.close(fd) }
        let s = FUSESession(filesystem: RegionFS(fd: fd))
        s.resume(kernelFlags: [], kernelMinor: 45)
        let out = try #require(s.respond(request(.read, unique: 77, node: 2, readArgs(offset: 9000, size: 4096))))
        guard case .file(let header, let region) = out else {
            Issue.record("not spliced: \(out)")
            return
        }
        #expect(region == FUSEFileRegion(fd: fd, offset: 9000, length: 1000))
        let (a, b) = try Sys.socketPair()
        defer { Sys.close(a); Sys.close(b) }
        #expect(FUSESplicer().send(header, region, to: a) == .sent)
        var got = [UInt8](repeating: 0, count: 2000)
        let n = got.withUnsafeMutableBytes { Glibc.read(b, $0.baseAddress, $0.count) }
        let reply = try parse(Array(got[0..<max(0, n)]))
        #expect(n == 1016 && reply.len == 1016 && reply.unique == 77 && reply.error == 0)
        #expect(reply.payload == Array(bytes[9000...]))
        #expect(s.stats.reads == 1 && s.stats.readBytes == 1000)
        // A region past what the pipe can hold is refused, for the caller's ordinary path.
        let huge = FUSEFileRegion(fd: fd, offset: 0, length: 64 << 20)
        #expect(FUSESplicer().send(header, huge, to: a) == .failed)
    }
}

/// The request journal: what a server read and did not answer is found by a successor on the same
/// memfd and answered by it (here into a socket standing for /dev/fuse); answered ones are not.
struct FUSEJournalTests {
    @Test func aSuccessorAnswersWhatItsPredecessorRead() throws {
        let fd = try FUSEJournal.create()
        defer { Glibc.close(fd) }
        let dead = try FUSEJournal(fd: fd)
        let answered = try #require(dead.record(request(.getattr, unique: 40, node: 2)))
        dead.clear(answered)
        _ = try #require(dead.record(request(.read, unique: 41, node: 2, readArgs(offset: 0, size: 100))))
        _ = try #require(dead.record(request(.getattr, unique: 42, node: 1)))
        #expect(dead.record(request(.lookup, unique: 43, node: 1, [UInt8](repeating: 0x61, count: 600))) == nil)

        let (a, b) = try Sys.socketPair()
        defer { Sys.close(a); Sys.close(b) }
        let session = FUSESession(filesystem: TinyFS())
        session.resume(kernelFlags: [], kernelMinor: 45)
        let successor = FUSEServer(session: session, fd: a, journal: try FUSEJournal(fd: fd))
        #expect(successor.answerJournaled() == 2)
        // The socket is a stream: the replies arrive back to back, each framed by its length.
        var stream: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while (try? Sys.poll(b, timeoutMs: 200)) == true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(b, $0.baseAddress, $0.count) }
            guard n > 0 else { break }
            stream += buf[0..<n]
        }
        var uniques: [UInt64] = []
        while stream.count >= 16 {
            let reply = try parse(stream)
            #expect(reply.error == 0 && Int(reply.len) <= stream.count)
            uniques.append(reply.unique)
            stream.removeFirst(min(Int(reply.len), stream.count))
        }
        #expect(Set(uniques) == [41, 42])
        #expect(try FUSEJournal(fd: fd).pending().isEmpty)
    }
}
