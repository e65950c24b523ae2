import Testing
@testable import Syscall
import SystemPackage

@Suite struct FanotifyDecodeTests {
    func event(mask: UInt64, fd: Int32, range: (UInt64, UInt64)?) -> [UInt8] {
        var b: [UInt8] = []
        func le<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { b += $0 } }
        let len = 24 + (range == nil ? 0 : 24)
        le(UInt32(len)); b += [3, 0]; le(UInt16(24)); le(mask); le(fd); le(Int32(42))
        if let r = range { b += [6, 0]; le(UInt16(24)); le(UInt32(0)); le(r.0); le(r.1) }
        return b
    }

    @Test func decodesMetadataAndRangeRecords() throws {
        let bytes = event(mask: 0x0010_0000, fd: 7, range: (4096, 8192)) + event(mask: 0x10000, fd: 8, range: nil)
        let events = try bytes.withUnsafeBytes { try Fanotify.decode($0) }
        #expect(events.count == 2)
        #expect(events[0].fd == 7 && events[0].pid == 42)
        #expect(events[0].range?.offset == 4096 && events[0].range?.count == 8192)
        #expect(events[1].range == nil)
    }

    @Test func rejectsTruncatedAndWrongVersion() {
        var bytes = event(mask: 1, fd: 3, range: (0, 4096))
        bytes.removeLast(4)
        #expect(throws: Fanotify.DecodeError.self) { try bytes.withUnsafeBytes { try Fanotify.decode($0) } }
        var v2 = event(mask: 1, fd: 3, range: nil)
        v2[4] = 2
        #expect(throws: Fanotify.DecodeError.versionMismatch(2)) { try v2.withUnsafeBytes { try Fanotify.decode($0) } }
    }

    @Test func denyErrnoEncoding() {
        #expect(Fanotify.denyErrno(.ioError) == 0x02 | (5 << 24))
    }

    @Test func retriesAndThrowsErrno() {
        #expect(throws: Errno.noSuchFileOrDirectory) { _ = try Sys.open("/nonexistent/erofs-compat", 0) }
    }
}
