#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Glibc
import Syscall

/// Errors of remote sources, each naming the URL and what to do.
extension HTTPHandle {
    /// A handle, or `RemoteError.unreachable` naming `url` when libcurl cannot be loaded.
    static func make(for url: String) throws -> HTTPHandle {
        do { return try HTTPHandle() } catch { throw RemoteError.unreachable(url: url, detail: "\(error)") }
    }
}

public enum RemoteError: Error, Equatable, CustomStringConvertible {
    case unreachable(url: String, detail: String)
    case httpStatus(url: String, status: Int)
    case rangesUnsupported(url: String)
    case blobChanged(url: String, detail: String)
    case shortRead(url: String, offset: UInt64, got: Int, wanted: Int)
    case badRange(url: String, asked: String, got: String)
    case badURL(String)
    case cache(String)
    case digestMismatch(expected: String, actual: String)
    case badReference(String, String)
    case badPlatform(String)
    case credentials(String)
    case authRequired(registry: String)
    case auth(registry: String, detail: String)
    case registry(registry: String, detail: String)

    public var description: String {
        switch self {
        case .unreachable(let u, let d): return "cannot reach \(u): \(d); check the URL and the network"
        case .httpStatus(let u, let s): return "\(u) answered HTTP \(s)"
        case .rangesUnsupported(let u): return "\(u) ignores Range requests (answers 200 with the whole blob); pass --allow-full-download to download it whole"
        case .blobChanged(let u, let d): return "the blob at \(u) changed since it was first seen (\(d)); clear its cache entry and mount again"
        case .shortRead(let u, let o, let g, let w): return "\(u) returned \(g) of \(w) bytes at offset \(o)"
        case .badRange(let u, let a, let g): return "\(u) answered bytes \(g) when asked for \(a)"
        case .badURL(let u): return "'\(u)' is not an http(s) URL"
        case .cache(let d): return "cache: \(d)"
        case .digestMismatch(let e, let a): return "downloaded blob does not match its digest (expected sha256:\(e), got sha256:\(a)); the cache entry was discarded"
        case .badReference(let r, let why): return "'\(r)' is not an OCI reference: \(why) (expected oci://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST])"
        case .badPlatform(let p): return "'\(p)' is not a platform; use OS/ARCH[/VARIANT], e.g. linux/arm64/v8"
        case .credentials(let d): return d
        case .authRequired(let r): return "registry \(r) requires credentials; pass --username with --password-stdin, or --auth-file, or add them to $DOCKER_CONFIG/config.json"
        case .auth(let r, let d): return "registry \(r): \(d); check the credentials"
        case .registry(let r, let d): return "registry \(r): \(d)"
        }
    }
}

/// A blob served over HTTP(S) with Range support: size and validators from the first response,
/// range reads with retries (exponential backoff with jitter on 5xx, 429 and transport errors), and
/// detection of a blob that changes underneath (ETag / Last-Modified).
public final class HTTPBlob: @unchecked Sendable {  // settings and validators set before sharing; the rest behind locks
    public let url: String
    public private(set) var size: UInt64 = 0
    public private(set) var etag: String?
    public private(set) var lastModified: String?
    /// True when the server ignores Range and only whole downloads work.
    public private(set) var wholeOnly = false
    public var attempts = 5
    public var baseDelayMs = 100
    public var timeoutMs = 30_000
    /// Answers 401 challenges (OCI registries); nil for plain URLs.
    public var auth: RegistryAuth?
    private let pool = Locked<[HTTPHandle]>([])
    /// Requests made, for progress reports and tests.
    package let requestCount = Locked<Int>(0)
    package let bytesFetched = Locked<UInt64>(0)

    /// Userinfo in `url` is taken out of it and answers the server's Basic challenge (when no
    /// `auth` is given).
    public init(url: String, auth: RegistryAuth? = nil) throws {
        let (plain, credentials) = URLUserinfo.split(url)
        guard plain.hasPrefix("http://") || plain.hasPrefix("https://") else { throw RemoteError.badURL(plain) }
        self.url = plain
        self.auth = auth ?? credentials.map { RegistryAuth(registry: plain, repository: "", credentials: $0) }
    }

    /// The first bytes of the blob, when `open` was asked to keep them (until `dropHead()`).
    public private(set) var head: [UInt8] = []

    /// Learns size and validators: a Range GET of the first `head` bytes (at least 2: busybox httpd
    /// answers "bytes=0-0" with the whole file as if no end were given; 206 with
    /// Content-Range proves Range support). With `head` > 1 the bytes are kept in `head`: the probe
    /// then doubles as the fetch of the superblock area, saving a round trip before a lazy mount.
    public func open(allowFullDownload: Bool, head: Int = 1) throws {
        let want = max(head, 2)
        let r = try withRetries(length: UInt64(want)) { h, a, d in
            h.request(url, range: "0-\(want - 1)", headers: a, bodyLimit: want, timeoutMs: timeoutMs, deadlineMs: d)
        }
        switch r.status {
        case 206:
            guard let cr = r.header("content-range").flatMap(ContentRange.init(parsing:)), cr.start == 0,
                  cr.end == min(UInt64(want), cr.total) - 1 else {
                let got = r.header("content-range").map { "Content-Range \($0)" } ?? "no Content-Range"
                throw RemoteError.unreachable(url: url, detail: "206 with \(got) for bytes 0-\(want - 1)")
            }
            size = cr.total
            if want > 1, r.body.count == Int(min(UInt64(want), cr.total)) {
                self.head = r.body
                bytesFetched.withLock { $0 += UInt64(r.body.count) }
            }
        case 200:
            guard allowFullDownload else { throw RemoteError.rangesUnsupported(url: url) }
            wholeOnly = true
            // The 1-byte limit cut the transfer; ask HEAD for the length.
            let head = try withRetries { h, a, d in
                h.request(url, headOnly: true, headers: a, bodyLimit: 0, timeoutMs: timeoutMs, deadlineMs: d)
            }
            guard let len = head.header("content-length").flatMap({ UInt64($0) }), len <= UInt64(Int64.max) else {
                throw RemoteError.unreachable(url: url, detail: "no usable Content-Length for a server without Range support")
            }
            size = len
        default:
            throw RemoteError.httpStatus(url: url, status: r.status)
        }
        etag = r.header("etag")
        lastModified = r.header("last-modified")
    }

    public func dropHead() { head = [] }

    /// Takes size and validators learned by another process's `open` (a restarted worker must start
    /// even while the server is failing: its reads then fail with EIO, one by one, until it is back).
    public func adopt(size: UInt64, etag: String?, lastModified: String?) {
        self.size = size
        self.etag = etag
        self.lastModified = lastModified
    }


    /// Reads [offset, offset+length) with a Range GET; throws on anything but exactly those bytes.
    /// A 206 for another range or a short body is retried like a transport error.
    public func read(offset: UInt64, length: Int) throws -> [UInt8] {
        try retryingBadRanges { try rangeRequest(offset: offset, length: length, into: nil).body }
    }

    /// The same, with `observer` seeing the body arrive (each attempt from its start).
    package func read(offset: UInt64, length: Int, observer: any HTTPBodyObserver) throws -> [UInt8] {
        try retryingBadRanges { try rangeRequest(offset: offset, length: length, into: nil, observer: observer).body }
    }

    /// The same bytes written straight into `fd` at `offset` (never held in memory). Whatever a
    /// response carried is written there before it is checked, so the range's bytes in `fd` are
    /// meaningful only when this returns: a caller must not serve them before.
    public func read(offset: UInt64, length: Int, into fd: Int32) throws {
        try retryingBadRanges { _ = try rangeRequest(offset: offset, length: length, into: fd) }
    }

    private func retryingBadRanges<T>(_ body: () throws -> T) throws -> T {
        var attempt = 1
        while true {
            do { return try body() } catch let e as RemoteError {
                switch e {
                case .badRange where attempt < attempts, .shortRead where attempt < attempts:
                    attempt += 1
                    usleep(UInt32(baseDelayMs * attempt * 1000))
                default: throw e
                }
            }
        }
    }

    private func rangeRequest(offset: UInt64, length: Int, into fd: Int32?,
                              observer: (any HTTPBodyObserver)? = nil) throws -> HTTPResponse {
        precondition(!wholeOnly, "range read on a whole-only blob")
        let last = offset + UInt64(length) - 1
        let r = try withRetries(length: UInt64(length)) { h, a, d in
            h.request(url, range: "\(offset)-\(last)", headers: a, bodyLimit: length, timeoutMs: timeoutMs,
                      deadlineMs: d, into: fd, at: Int64(offset), observer: observer)
        }
        guard r.status == 206 else {
            if r.status == 200 { throw RemoteError.blobChanged(url: url, detail: "server stopped honouring Range") }
            throw RemoteError.httpStatus(url: url, status: r.status)
        }
        if let e = etag, let now = r.header("etag"), now != e { throw RemoteError.blobChanged(url: url, detail: "ETag \(e) → \(now)") }
        if let m = lastModified, let now = r.header("last-modified"), now != m {
            throw RemoteError.blobChanged(url: url, detail: "Last-Modified \(m) → \(now)")
        }
        // Every 206 must name exactly the range asked for: bytes of another range stored at this
        // offset would be served as this one.
        guard let cr = r.header("content-range").flatMap(ContentRange.init(parsing:)) else {
            throw RemoteError.badRange(url: url, asked: "\(offset)-\(last)", got: r.header("content-range") ?? "none")
        }
        if cr.total != size { throw RemoteError.blobChanged(url: url, detail: "size \(size) → \(cr.total)") }
        guard cr.start == offset, cr.end == last else {
            throw RemoteError.badRange(url: url, asked: "\(offset)-\(last)", got: "\(cr.start)-\(cr.end)")
        }
        if r.bodyWriteFailed {
            throw RemoteError.cache("cannot write bytes \(offset)-\(last) of \(url) to the cache file")
        }
        guard r.bodyLength == length else {
            throw RemoteError.shortRead(url: url, offset: offset, got: r.bodyLength, wanted: length)
        }
        bytesFetched.withLock { $0 += UInt64(length) }
        return r
    }

    /// Downloads everything (for servers without Range support) straight into `fd`, never more
    /// than the size learned first (a server that sends more is cut off), never held in memory.
    public func readAll(into fd: Int32) throws {
        let r = try withRetries(length: size) { h, a, deadline in
            h.request(url, headers: a, bodyLimit: Int(size), timeoutMs: timeoutMs, deadlineMs: deadline, into: fd)
        }
        if r.bodyWriteFailed { throw RemoteError.cache("cannot write the download of \(url) to the cache file") }
        guard r.status == 200 || r.status == 206, r.bodyLength == Int(size), !r.bodyTruncated else {
            throw RemoteError.shortRead(url: url, offset: 0, got: r.bodyLength, wanted: Int(size))
        }
        bytesFetched.withLock { $0 += size }
    }

    /// Runs a request on a pooled handle with retries and auth challenges answered. Each attempt
    /// gets a deadline for the whole transfer (30 s plus `length` at 64 KiB/s: a server trickling
    /// bytes cannot hold a reader forever), cut to what is left of `deadline` when one is set.
    func withRetries(length: UInt64 = 0, _ body: (HTTPHandle, [String], Int) -> HTTPResponse) throws -> HTTPResponse {
        let handle = try pool.withLock { $0.popLast() } ?? HTTPHandle.make(for: url)
        defer { pool.withLock { $0.append(handle) } }
        let perRequest = timeoutMs + Int(min(length / 64, UInt64(Int32.max)))
        return try performWithRetries(url: url, handle: handle, attempts: attempts, baseDelayMs: baseDelayMs, auth: auth,
                                      requests: requestCount, deadline: deadline.get()) { h, a in
            let left = deadline.get().map { Int((Int64(bitPattern: $0 &- DispatchTime.now().uptimeNanoseconds)) / 1_000_000) }
            return body(h, a, max(1, min(perRequest, left ?? perRequest)))
        }
    }

    /// An absolute end (DispatchTime uptime, ns) for every request of this blob, e.g. a mount's
    /// preparation; nil: none beyond each request's own.
    package let deadline = Locked<UInt64?>(nil)

    /// Sets `deadline` to `seconds` from now.
    public func setDeadline(seconds: Double?) {
        deadline.set(seconds.map { DispatchTime.now().uptimeNanoseconds + UInt64($0 * 1e9) })
    }
}

/// Runs `body` (given the handle and the Authorization headers to send), retrying transport errors,
/// 5xx and 429 with exponential backoff and jitter, and answering 401 challenges through `auth`.
func performWithRetries(url: String, handle: HTTPHandle, attempts: Int, baseDelayMs: Int, auth: RegistryAuth?,
                        requests: Locked<Int>?, deadline: UInt64? = nil,
                        _ body: (HTTPHandle, [String]) -> HTTPResponse) throws -> HTTPResponse {
    var last = ""
    var authRounds = 0
    var attempt = 0
    while attempt < attempts {
        if let deadline, DispatchTime.now().uptimeNanoseconds >= deadline {
            throw RemoteError.unreachable(url: url, detail: "deadline exceeded" + (last.isEmpty ? "" : " (last: \(last))"))
        }
        if attempt > 0 {
            let delay = baseDelayMs << min(attempt - 1, 6)
            usleep(UInt32((delay + Int.random(in: 0...delay)) * 1000))
        }
        requests?.withLock { $0 += 1 }
        let sent = auth?.headers ?? []
        let r = body(handle, sent)
        if r.curlCode == 0 || (r.curlCode == 23 && r.bodyTruncated) {
            if r.status == 401, let auth, authRounds < 3 {
                authRounds += 1
                try auth.authorize(challenge: r.header("www-authenticate"), sent: sent)
                continue
            }
            if r.status >= 500 || r.status == 429 {
                last = "HTTP \(r.status)"
                attempt += 1
                continue
            }
            return r
        }
        last = r.error
        guard HTTPHandle.transferErrorsWorthRetrying.contains(r.curlCode) else { break }
        attempt += 1
    }
    throw RemoteError.unreachable(url: url, detail: last)
}

extension Substring {
    var trimmingSpaces: String { String(self).trimmed }
}

/// A Content-Range header of a 206: "bytes START-END/TOTAL", each within Int64 (a total above it
/// cannot be a file), START <= END < TOTAL.
struct ContentRange: Equatable {
    var start: UInt64
    var end: UInt64
    var total: UInt64

    init?(parsing v: String) {
        let t = v.trimmed
        guard t.hasPrefix("bytes "), let dash = t.firstIndex(of: "-"), let slash = t.lastIndex(of: "/"), dash < slash,
              let s = UInt64(t[t.index(t.startIndex, offsetBy: 6)..<dash].trimmingSpaces),
              let e = UInt64(t[t.index(after: dash)..<slash].trimmingSpaces),
              let total = UInt64(t[t.index(after: slash)...].trimmingSpaces) else { return nil }
        guard total <= UInt64(Int64.max), s <= e, e < total else { return nil }
        (start, end, self.total) = (s, e, total)
    }
}

/// `user:password@` in an http(s) URL: taken out before the URL is stored, shown, or passed on (a
/// worker's argv is visible in `ps`), and handed on like any other credentials.
public enum URLUserinfo {
    /// The URL without userinfo, and the credentials it carried (percent-decoded).
    public static func split(_ url: String) -> (url: String, credentials: RegistryCredentials?) {
        let scheme = url.hasPrefix("https://") ? "https://" : url.hasPrefix("http://") ? "http://" : ""
        guard !scheme.isEmpty else { return (url, nil) }
        let rest = url.dropFirst(scheme.count)
        let authorityEnd = rest.firstIndex { $0 == "/" || $0 == "?" || $0 == "#" } ?? rest.endIndex
        guard let at = rest[..<authorityEnd].lastIndex(of: "@") else { return (url, nil) }
        let info = rest[..<at]
        let stripped: String = scheme + String(rest[rest.index(after: at)...])
        let parts = info.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
        let user = percentDecode(String(parts[0]))
        let password = parts.count > 1 ? percentDecode(String(parts[1])) : ""
        return (stripped, RegistryCredentials(username: user, password: password, origin: "the URL"))
    }

    /// The URL as it may be shown or stored.
    public static func strip(_ url: String) -> String { split(url).url }

    static func percentDecode(_ s: String) -> String {
        var out: [UInt8] = []
        var b = Array(s.utf8)[...]
        while let c = b.popFirst() {
            if c == UInt8(ascii: "%"), b.count >= 2, let v = UInt8(String(decoding: b.prefix(2), as: UTF8.self), radix: 16) {
                out.append(v)
                b = b.dropFirst(2)
            } else {
                out.append(c)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
