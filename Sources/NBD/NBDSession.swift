/// One NBD connection's protocol, server side, without sockets: bytes in, actions out (the
/// socket layer performs them). Fixed newstyle negotiation with EXPORT_NAME, ABORT, LIST, INFO,
/// GO and STRUCTURED_REPLY; then transmission: READ and CACHE go to the caller, FLUSH and DISC are
/// answered here, writes, trims and anything else get the error the protocol asks for. Memory is
/// bounded: an option's data is at most `maxOptionLength`, and a write's payload is discarded as it
/// arrives, never buffered.
public final class NBDSession {
    /// What the socket layer does next.
    public enum Action: Equatable {
        /// Write these bytes (in this order relative to other sends of this session).
        case send([UInt8])
        /// Read the export's bytes and answer with `reply(to:)`.
        case read(handle: UInt64, offset: UInt64, length: UInt32)
        /// Prefetch the range and answer with `reply(to:)` (no data).
        case cache(handle: UInt64, offset: UInt64, length: UInt32)
        /// Close the connection (after the sends before it).
        case close(reason: String)
    }

    enum Phase { case clientFlags, options, transmission, closed }

    public static let maxOptionLength = 64 << 10
    let exports: [NBDExport]
    private(set) var phase = Phase.clientFlags
    private var buffer: [UInt8] = []
    private var discard = 0
    private var noZeroes = false
    /// Set by STRUCTURED_REPLY: READ replies are then structured chunks.
    public private(set) var structured = false
    /// The export chosen by EXPORT_NAME or GO.
    public private(set) var export: NBDExport?

    /// `exports`: the first one is also the default ("" names it).
    public init(exports: [NBDExport]) {
        precondition(!exports.isEmpty, "an NBD server exports something")
        self.exports = exports
    }

    /// A session already in transmission (the kernel's NBD driver attached over netlink: it never
    /// negotiates; the device's size and flags were given to the kernel directly).
    public init(transmissionOf export: NBDExport) {
        exports = [export]
        self.export = export
        phase = .transmission
    }

    /// The server's greeting: magic, IHAVEOPT, fixed newstyle with no zeroes (none in transmission).
    public func start() -> [Action] {
        guard phase == .clientFlags else { return [] }
        var w = WireWriter()
        w.u64(NBD.magic)
        w.u64(NBD.optionMagic)
        w.u16(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        return [.send(w.bytes)]
    }

    /// Feeds received bytes; returns what to do, in order.
    public func receive(_ bytes: [UInt8]) -> [Action] {
        var bytes = bytes[...]
        if discard > 0 {
            let n = min(discard, bytes.count)
            discard -= n
            bytes = bytes.dropFirst(n)
        }
        buffer += bytes
        var out: [Action] = []
        while phase != .closed, let step = next() {
            out += step
            if case .close = step.last { phase = .closed }
        }
        return out
    }

    /// One complete message's actions, or nil when more bytes are needed.
    private func next() -> [Action]? {
        switch phase {
        case .clientFlags: return clientFlags()
        case .options: return option()
        case .transmission: return request()
        case .closed: return nil
        }
    }

    private func consume(_ n: Int) -> ArraySlice<UInt8> {
        let head = buffer[0..<n]
        buffer.removeFirst(n)
        return head
    }

    private func clientFlags() -> [Action]? {
        guard buffer.count >= 4 else { return nil }
        let flags = consume(4).be32(0)
        guard flags & UInt32(NBD.flagFixedNewstyle) != 0 else { return [.close(reason: "the client does not speak fixed newstyle")] }
        guard flags & ~UInt32(NBD.flagFixedNewstyle | NBD.flagNoZeroes) == 0 else {
            return [.close(reason: "unknown client flags 0x\(String(flags, radix: 16))")]
        }
        noZeroes = flags & UInt32(NBD.flagNoZeroes) != 0
        phase = .options
        return []
    }
}

// MARK: negotiation

extension NBDSession {
    private func option() -> [Action]? {
        guard buffer.count >= 16 else { return nil }
        let head = buffer[0..<16]
        guard head.be64(0) == NBD.optionMagic else { return [.close(reason: "bad option magic")] }
        let code = head.be32(8), length = Int(head.be32(12))
        guard length <= Self.maxOptionLength else { return [.close(reason: "option \(code) of \(length) bytes")] }
        guard buffer.count >= 16 + length else { return nil }
        _ = consume(16)
        let data = consume(length)
        guard let opt = NBD.Option(rawValue: code) else { return [optionReply(code, NBD.repErrUnsupported, message: "unknown option")] }
        switch opt {
        case .exportName: return exportName(data)
        case .abort:
            return [optionReply(code, NBD.repAck), .close(reason: "the client aborted")]
        case .list:
            guard data.isEmpty else { return [optionReply(code, NBD.repErrInvalid, message: "LIST takes no data")] }
            return exports.map { e in
                var w = WireWriter()
                w.u32(UInt32(e.name.utf8.count))
                w.append(Array(e.name.utf8) + Array(e.description.utf8))
                return optionReply(code, NBD.repServer, w.bytes)
            } + [optionReply(code, NBD.repAck)]
        case .info, .go: return infoOrGo(opt, data)
        case .structuredReply:
            guard data.isEmpty else { return [optionReply(code, NBD.repErrInvalid, message: "STRUCTURED_REPLY takes no data")] }
            structured = true
            return [optionReply(code, NBD.repAck)]
        default:
            return [optionReply(code, NBD.repErrUnsupported, message: "not supported by this server")]
        }
    }

    /// NBD_OPT_EXPORT_NAME: no option reply; the export's size and flags, then transmission
    /// (an unknown name can only be answered by closing).
    private func exportName(_ data: ArraySlice<UInt8>) -> [Action] {
        guard let e = lookup(String(decoding: data, as: UTF8.self)) else { return [.close(reason: "no export named so")] }
        export = e
        phase = .transmission
        var w = WireWriter()
        w.u64(e.size)
        w.u16(e.transmissionFlags)
        if !noZeroes { w.append([UInt8](repeating: 0, count: 124)) }
        return [.send(w.bytes)]
    }

    /// NBD_OPT_INFO / NBD_OPT_GO: name length, name, requested info types.
    private func infoOrGo(_ opt: NBD.Option, _ data: ArraySlice<UInt8>) -> [Action] {
        let code = opt.rawValue
        guard data.count >= 6 else { return [optionReply(code, NBD.repErrInvalid, message: "short request")] }
        let nameLength = Int(data.be32(0))
        guard data.count >= 4 + nameLength + 2 else { return [optionReply(code, NBD.repErrInvalid, message: "short request")] }
        let name = String(decoding: data[(data.startIndex + 4)..<(data.startIndex + 4 + nameLength)], as: UTF8.self)
        let count = Int(data.be16(4 + nameLength))
        guard data.count == 4 + nameLength + 2 + 2 * count else {
            return [optionReply(code, NBD.repErrInvalid, message: "request length does not match its info count")]
        }
        guard let e = lookup(name) else { return [optionReply(code, NBD.repErrUnknown, message: "no export named '\(name)'")] }
        let requested = (0..<count).map { data.be16(4 + nameLength + 2 + 2 * $0) }
        var out = [infoReply(code, export: e)]
        // Block sizes are always sent: the maximum bounds what a client may ask for.
        out.append(infoReply(code, blockSizeOf: e))
        if requested.contains(NBD.infoName) {
            var w = WireWriter()
            w.u16(NBD.infoName)
            w.append(Array(e.name.utf8))
            out.append(optionReply(code, NBD.repInfo, w.bytes))
        }
        if requested.contains(NBD.infoDescription), !e.description.isEmpty {
            var w = WireWriter()
            w.u16(NBD.infoDescription)
            w.append(Array(e.description.utf8))
            out.append(optionReply(code, NBD.repInfo, w.bytes))
        }
        out.append(optionReply(code, NBD.repAck))
        if opt == .go {
            export = e
            phase = .transmission
        }
        return out
    }

    private func lookup(_ name: String) -> NBDExport? {
        name.isEmpty ? exports.first : exports.first { $0.name == name }
    }

    private func infoReply(_ code: UInt32, export e: NBDExport) -> Action {
        var w = WireWriter()
        w.u16(NBD.infoExport)
        w.u64(e.size)
        w.u16(e.transmissionFlags)
        return optionReply(code, NBD.repInfo, w.bytes)
    }

    private func infoReply(_ code: UInt32, blockSizeOf e: NBDExport) -> Action {
        var w = WireWriter()
        w.u16(NBD.infoBlockSize)
        w.u32(e.minimumBlock)
        w.u32(e.preferredBlock)
        w.u32(e.maximumBlock)
        return optionReply(code, NBD.repInfo, w.bytes)
    }

    private func optionReply(_ option: UInt32, _ type: UInt32, _ data: [UInt8] = [], message: String? = nil) -> Action {
        let payload = message.map { Array($0.utf8) } ?? data
        var w = WireWriter()
        w.u64(NBD.optionReplyMagic)
        w.u32(option)
        w.u32(type)
        w.u32(UInt32(payload.count))
        w.append(payload)
        return .send(w.bytes)
    }
}

// MARK: transmission

extension NBDSession {
    private func request() -> [Action]? {
        guard buffer.count >= 28, let e = export else { return nil }
        let r = consume(28)
        guard r.be32(0) == NBD.requestMagic else { return [.close(reason: "bad request magic")] }
        let type = r.be16(6), handle = r.be64(8), offset = r.be64(16), length = r.be32(24)
        guard let cmd = NBD.Command(rawValue: type) else { return [.send(simpleReply(handle, .invalid))] }
        switch cmd {
        case .read, .cache:
            if let err = rangeError(e, offset: offset, length: length) { return [.send(errorReply(handle, err, read: cmd == .read))] }
            return [cmd == .read ? .read(handle: handle, offset: offset, length: length) : .cache(handle: handle, offset: offset, length: length)]
        case .write:
            // The payload follows: discarded as it arrives (up to the maximum block; more is hostile).
            guard length <= e.maximumBlock else { return [.close(reason: "a write of \(length) bytes")] }
            let have = min(buffer.count, Int(length))
            buffer.removeFirst(have)
            discard = Int(length) - have
            return [.send(simpleReply(handle, .permission))]
        case .flush: return [.send(simpleReply(handle, nil))]
        case .disconnect: return [.close(reason: "the client disconnected")]
        case .trim, .writeZeroes, .resize: return [.send(simpleReply(handle, .permission))]
        case .blockStatus: return [.send(simpleReply(handle, .invalid))]
        }
    }

    /// EINVAL past the end (or an empty range), EOVERFLOW above the maximum block size.
    private func rangeError(_ e: NBDExport, offset: UInt64, length: UInt32) -> NBD.Error? {
        if length == 0 { return .invalid }
        if length > e.maximumBlock { return .overflow }
        let (end, over) = offset.addingReportingOverflow(UInt64(length))
        return over || end > e.size ? .invalid : nil
    }

    /// The reply to a `.read` or `.cache` action: its data (structured chunk or simple reply
    /// followed by the bytes), or the error. A read's reply is only ever built from the whole range.
    public func reply(to action: Action, result: Result<[UInt8], NBD.Error>) -> [UInt8] {
        let (head, data) = replyParts(to: action, result: result)
        return head + data
    }

    /// The same as header and data apart, so the data can be sent without copying it.
    public func replyParts(to action: Action, result: Result<[UInt8], NBD.Error>) -> (head: [UInt8], data: [UInt8]) {
        if case .read(_, _, let length) = action, case .success(let data) = result, data.count == Int(length),
           let head = readReplyHead(to: action) {
            return (head, data)
        }
        return (errorOrAck(to: action, result: result), [])
    }

    /// What precedes the data of a successful, complete read reply (the data follows as is).
    public func readReplyHead(to action: Action) -> [UInt8]? {
        guard case .read(let handle, let offset, let length) = action else { return nil }
        guard structured else { return simpleReply(handle, nil) }
        var w = WireWriter()
        w.u32(NBD.structuredReplyMagic)
        w.u16(NBD.replyFlagDone)
        w.u16(NBD.replyTypeOffsetData)
        w.u64(handle)
        w.u32(8 + length)
        w.u64(offset)
        return w.bytes
    }

    private func errorOrAck(to action: Action, result: Result<[UInt8], NBD.Error>) -> [UInt8] {
        switch (action, result) {
        case (.read(let handle, _, _), .success): return errorReply(handle, .io, read: true)
        case (.read(let handle, _, _), .failure(let e)): return errorReply(handle, e, read: true)
        case (.cache(let handle, _, _), .success): return simpleReply(handle, nil)
        case (.cache(let handle, _, _), .failure(let e)): return simpleReply(handle, e)
        default: preconditionFailure("reply(to:) answers reads and caches")
        }
    }

    private func errorReply(_ handle: UInt64, _ e: NBD.Error, read: Bool) -> [UInt8] {
        guard read, structured else { return simpleReply(handle, e) }
        let message = Array("\(e)".utf8)
        var w = WireWriter()
        w.u32(NBD.structuredReplyMagic)
        w.u16(NBD.replyFlagDone)
        w.u16(NBD.replyTypeError)
        w.u64(handle)
        w.u32(UInt32(4 + 2 + message.count))
        w.u32(e.rawValue)
        w.u16(UInt16(message.count))
        w.append(message)
        return w.bytes
    }

    private func simpleReply(_ handle: UInt64, _ e: NBD.Error?) -> [UInt8] {
        var w = WireWriter()
        w.u32(NBD.simpleReplyMagic)
        w.u32(e?.rawValue ?? 0)
        w.u64(handle)
        return w.bytes
    }
}
