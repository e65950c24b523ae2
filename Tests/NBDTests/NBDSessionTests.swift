import Testing
@testable import NBD

/// The NBD protocol handler without sockets: bytes in, actions out.
@Suite struct NBDSessionTests {
    static let export = NBDExport(name: "img", description: "an image", size: 1 << 20)

    static func be(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).reversed().map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
    static func option(_ code: UInt32, _ data: [UInt8] = []) -> [UInt8] {
        be(NBD.optionMagic, 8) + be(UInt64(code), 4) + be(UInt64(data.count), 4) + data
    }
    static func request(_ type: UInt16, handle: UInt64 = 7, offset: UInt64 = 0, length: UInt32 = 512) -> [UInt8] {
        be(UInt64(NBD.requestMagic), 4) + be(0, 2) + be(UInt64(type), 2) + be(handle, 8) + be(offset, 8) + be(UInt64(length), 4)
    }
    static func goData(_ name: String, infos: [UInt16] = []) -> [UInt8] {
        be(UInt64(name.utf8.count), 4) + Array(name.utf8) + be(UInt64(infos.count), 2) + infos.flatMap { be(UInt64($0), 2) }
    }
    /// Option replies in `actions`: (option, type, payload).
    static func replies(_ actions: [NBDSession.Action]) -> [(UInt32, UInt32, [UInt8])] {
        actions.compactMap { a -> (UInt32, UInt32, [UInt8])? in
            guard case .send(let b) = a, b.count >= 20, b[...].be64(0) == NBD.optionReplyMagic else { return nil }
            return (b[...].be32(8), b[...].be32(12), Array(b[20...]))
        }
    }

    /// A session past negotiation (GO, structured replies when asked).
    static func transmitting(structured: Bool = false) -> NBDSession {
        let s = NBDSession(exports: [export])
        _ = s.start()
        _ = s.receive(be(3, 4))
        if structured { _ = s.receive(option(NBD.Option.structuredReply.rawValue)) }
        _ = s.receive(option(NBD.Option.go.rawValue, goData("img")))
        return s
    }

    @Test func greetingIsFixedNewstyleWithoutZeroes() {
        let s = NBDSession(exports: [Self.export])
        #expect(s.start() == [.send(Self.be(NBD.magic, 8) + Self.be(NBD.optionMagic, 8) + [0, 3])])
        #expect(s.receive(Self.be(0, 4)).first.map { if case .close = $0 { true } else { false } } == true, "oldstyle clients are refused")
    }

    @Test func goAnswersExportBlockSizesAndAck() {
        let s = NBDSession(exports: [Self.export])
        _ = s.start()
        _ = s.receive(Self.be(3, 4))
        let r = Self.replies(s.receive(Self.option(NBD.Option.go.rawValue, Self.goData("img", infos: [NBD.infoBlockSize, NBD.infoName]))))
        #expect(r.map(\.1) == [NBD.repInfo, NBD.repInfo, NBD.repInfo, NBD.repAck])
        #expect(r[0].2 == [0, 0] + Self.be(1 << 20, 8) + Self.be(UInt64(Self.export.transmissionFlags), 2))
        #expect(r[1].2 == [0, 3] + Self.be(1, 4) + Self.be(64 << 10, 4) + Self.be(32 << 20, 4))
        #expect(r[2].2 == [0, 1] + Array("img".utf8))
        #expect(s.export?.name == "img")
    }

    @Test func unknownExportsAndOptionsAreErrorsNotHangs() {
        let s = NBDSession(exports: [Self.export])
        _ = s.start()
        _ = s.receive(Self.be(1, 4))
        #expect(Self.replies(s.receive(Self.option(NBD.Option.go.rawValue, Self.goData("nope")))).map(\.1) == [NBD.repErrUnknown])
        #expect(Self.replies(s.receive(Self.option(99))).map(\.1) == [NBD.repErrUnsupported])
        #expect(Self.replies(s.receive(Self.option(NBD.Option.startTLS.rawValue))).map(\.1) == [NBD.repErrUnsupported])
        #expect(Self.replies(s.receive(Self.option(NBD.Option.go.rawValue, [1, 2]))).map(\.1) == [NBD.repErrInvalid])
        let list = Self.replies(s.receive(Self.option(NBD.Option.list.rawValue)))
        #expect(list.map(\.1) == [NBD.repServer, NBD.repAck])
        #expect(list[0].2 == Self.be(3, 4) + Array("img".utf8) + Array("an image".utf8))
        #expect(s.export == nil)
        let abort = s.receive(Self.option(NBD.Option.abort.rawValue))
        #expect(abort.count == 2 && abort.last.map { if case .close = $0 { true } else { false } } == true)
    }

    @Test func messagesSplitAnywhereAreReassembled() {
        let s = NBDSession(exports: [Self.export])
        _ = s.start()
        var actions: [NBDSession.Action] = []
        for b in Self.be(3, 4) + Self.option(NBD.Option.go.rawValue, Self.goData("")) + Self.request(0, offset: 4096) { actions += s.receive([b]) }
        #expect(actions.last == .read(handle: 7, offset: 4096, length: 512))
    }

    @Test func oversizedOptionsCloseInsteadOfBuffering() {
        let s = NBDSession(exports: [Self.export])
        _ = s.start()
        _ = s.receive(Self.be(3, 4))
        let huge = Self.be(NBD.optionMagic, 8) + Self.be(7, 4) + Self.be(UInt64(UInt32.max), 4)
        #expect(s.receive(huge).last.map { if case .close = $0 { true } else { false } } == true)
    }

    @Test func exportNameEntersTransmissionWithSizeAndFlags() {
        let s = NBDSession(exports: [Self.export])
        _ = s.start()
        _ = s.receive(Self.be(1, 4))  // fixed newstyle, zeroes wanted
        let a = s.receive(Self.option(NBD.Option.exportName.rawValue, Array("img".utf8)))
        #expect(a == [.send(Self.be(1 << 20, 8) + Self.be(UInt64(Self.export.transmissionFlags), 2) + [UInt8](repeating: 0, count: 124))])
    }

    @Test func readsWritesAndBoundsInTransmission() {
        let s = Self.transmitting()
        #expect(s.receive(Self.request(0, offset: 1 << 19, length: 4096)) == [.read(handle: 7, offset: 1 << 19, length: 4096)])
        // Past the end, empty, above the maximum block.
        func error(_ a: [NBDSession.Action]) -> UInt32? {
            guard case .send(let b)? = a.first, b.count == 16 else { return nil }
            return b[...].be32(4)
        }
        #expect(error(s.receive(Self.request(0, offset: (1 << 20) - 100, length: 4096))) == NBD.Error.invalid.rawValue)
        #expect(error(s.receive(Self.request(0, offset: UInt64.max - 10, length: 4096))) == NBD.Error.invalid.rawValue)
        #expect(error(s.receive(Self.request(0, length: 0))) == NBD.Error.invalid.rawValue)
        #expect(error(s.receive(Self.request(0, length: 64 << 20))) == NBD.Error.overflow.rawValue)
        // A write's payload is consumed and refused; the next request parses.
        var w = s.receive(Self.request(1, length: 8) + [1, 2, 3])
        #expect(error(w) == NBD.Error.permission.rawValue)
        w = s.receive([4, 5, 6, 7, 8] + Self.request(3))
        #expect(error(w) == 0, "FLUSH succeeds")
        #expect(error(s.receive(Self.request(4))) == NBD.Error.permission.rawValue, "TRIM")
        #expect(error(s.receive(Self.request(42))) == NBD.Error.invalid.rawValue, "unknown command")
        #expect(s.receive(Self.request(5, offset: 0, length: 65536)) == [.cache(handle: 7, offset: 0, length: 65536)])
        #expect(s.receive(Self.request(2)).first.map { if case .close = $0 { true } else { false } } == true)
    }

    @Test func repliesCarryTheWholeRangeOrAnError() {
        let simple = Self.transmitting()
        let read = NBDSession.Action.read(handle: 9, offset: 4096, length: 4)
        #expect(simple.reply(to: read, result: .success([1, 2, 3, 4])) == Self.be(UInt64(NBD.simpleReplyMagic), 4) + Self.be(0, 4) + Self.be(9, 8) + [1, 2, 3, 4])
        #expect(simple.reply(to: read, result: .failure(.io)) == Self.be(UInt64(NBD.simpleReplyMagic), 4) + Self.be(5, 4) + Self.be(9, 8))
        // A short result is never passed off as the range: EIO.
        #expect(simple.reply(to: read, result: .success([1, 2])).count == 16)
        let structured = Self.transmitting(structured: true)
        let ok = structured.reply(to: read, result: .success([1, 2, 3, 4]))
        #expect(ok == Self.be(UInt64(NBD.structuredReplyMagic), 4) + [0, 1, 0, 1] + Self.be(9, 8) + Self.be(12, 4) + Self.be(4096, 8) + [1, 2, 3, 4])
        let failed = structured.reply(to: read, result: .failure(.io))
        #expect(failed[...].be16(6) == NBD.replyTypeError && failed[...].be32(20) == 5)
    }
}
