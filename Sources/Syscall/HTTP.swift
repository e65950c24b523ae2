import CHeaders
import Glibc

/// One HTTP response as libcurl delivered it.
package struct HTTPResponse: Sendable {
    package var status: Int
    /// Header names lower-cased; the last response's headers only (after redirects).
    package var headers: [String: String]
    package var body: [UInt8]
    /// Bytes of body received (also when they were written to a file).
    package var bodyLength: Int
    package var bodyTruncated: Bool
    package var bodyWriteFailed: Bool
    /// CURLE_* (0 = the transfer itself worked).
    package var curlCode: Int32
    package var error: String

    package func header(_ name: String) -> String? { headers[name.lowercased()] }
}

/// Sees a response body kept in memory grow, so work on it can start while the rest arrives.
package protocol HTTPBodyObserver: AnyObject {
    /// An attempt at the request starts (a retry starts over): what was seen before is gone.
    func begin()
    /// The body so far (it only grows within one attempt).
    func received(_ body: UnsafeRawBufferPointer)
}

/// libcurl could not be loaded.
package struct HTTPUnavailable: Error, CustomStringConvertible {
    package var reason: String
    package var description: String { "libcurl cannot be loaded (\(reason.isEmpty ? "curl_easy_init failed" : reason)): install Debian's libcurl4" }
}

/// A reusable libcurl easy handle: reusing it keeps the connection alive between requests.
/// Not thread-safe; use one per thread.
package final class HTTPHandle {
    private let handle: UnsafeMutableRawPointer

    /// Loads libcurl now (a resident process does it at start, not during its first request); the
    /// reason when it cannot be loaded.
    package static func preload() -> String? {
        ecx_curl_load() == 0 ? nil : String(cString: ecx_curl_load_error())
    }

    /// Loads libcurl on first use; throws when it cannot be loaded (not installed).
    package init() throws {
        guard let h = ecx_curl_easy_init() else { throw HTTPUnavailable(reason: String(cString: ecx_curl_load_error())) }
        handle = h
    }

    deinit { ecx_curl_easy_cleanup(handle) }

    /// Performs one request. `range` is "first-last" (inclusive); `bodyLimit` bounds the body kept
    /// (the transfer is cut beyond it and `bodyTruncated` set). The whole transfer ends after
    /// `deadlineMs` (0: only the low-speed limit of `timeoutMs`). With `into` the body is written to
    /// that file from offset `at` on instead of being kept (`body` stays empty; its length is
    /// `bodyLength`): whatever the response, so the caller must not use those bytes until it has
    /// checked status and headers.
    /// `observer` sees a body kept in memory grow.
    package func request(_ url: String, range: String? = nil, headOnly: Bool = false, headers: [String] = [],
                         bodyLimit: Int, timeoutMs: Int = 30_000, deadlineMs: Int = 0, into fd: Int32? = nil,
                         at offset: Int64 = 0, observer: (any HTTPBodyObserver)? = nil) -> HTTPResponse {
        observer?.begin()
        let box = observer.map { Unmanaged.passRetained(ObserverBox($0)) }
        defer { box?.release() }
        let thunk: ecx_body_observer? = box == nil ? nil : { ctx, body, received in
            Unmanaged<ObserverBox>.fromOpaque(ctx!).takeUnretainedValue().observer
                .received(UnsafeRawBufferPointer(start: body, count: received))
        }
        return perform(headers: headers, bodyCapacity: fd == nil ? bodyLimit : 0, keepBody: fd == nil) { h, b, cap, result in
            ecx_http_request(handle, url, range, headOnly ? 1 : 0, h, headers.count, b, bodyLimit, timeoutMs, deadlineMs,
                             fd ?? -1, offset, thunk, box?.toOpaque(), result)
        }
    }

    /// An observer behind one pointer, for the C callback.
    private final class ObserverBox {
        let observer: any HTTPBodyObserver
        init(_ observer: any HTTPBodyObserver) { self.observer = observer }
    }

    /// A request with `method` and as body `length` bytes of `fd` from offset 0 (nil: no body);
    /// the response's body is kept up to `bodyLimit`.
    package func send(_ url: String, method: String, headers: [String] = [], body fd: Int32? = nil, length: Int64 = 0,
                      bodyLimit: Int = 64 << 10, timeoutMs: Int = 30_000) -> HTTPResponse {
        perform(headers: headers, bodyCapacity: bodyLimit, keepBody: true) { h, b, cap, result in
            ecx_http_send(handle, url, method, h, headers.count, fd ?? -1, length, b, cap, timeoutMs, result)
        }
    }

    /// Runs one transfer through `call` (C headers, a body buffer of `bodyCapacity`, its capacity,
    /// the result) and turns what it left in the result into a response.
    private func perform(headers: [String], bodyCapacity: Int, keepBody: Bool,
                         _ call: (UnsafePointer<UnsafePointer<CChar>?>?, UnsafeMutablePointer<UInt8>?, Int,
                                  UnsafeMutablePointer<ecx_http_result>) -> Int32) -> HTTPResponse {
        var result = ecx_http_result()
        let cHeaders = headers.map { strdup($0) }
        defer { cHeaders.forEach { free($0) } }
        let ptrs: [UnsafePointer<CChar>?] = cHeaders.map { UnsafePointer($0) }
        // Not zero-filled first: a range read's buffer is MiBs, and only what libcurl wrote is kept.
        let body = [UInt8](unsafeUninitializedCapacity: max(bodyCapacity, 1)) { b, kept in
            _ = ptrs.withUnsafeBufferPointer { hp in call(hp.baseAddress, b.baseAddress, bodyCapacity, &result) }
            kept = keepBody ? min(result.body_len, bodyCapacity) : 0
        }
        defer { ecx_http_result_free(&result) }
        let raw = result.headers.map { String(cString: $0) } ?? ""
        let error = withUnsafeBytes(of: result.error) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        return HTTPResponse(status: result.status, headers: Self.parseHeaders(raw), body: body, bodyLength: result.body_len,
                            bodyTruncated: result.body_truncated != 0, bodyWriteFailed: result.body_write_failed != 0,
                            curlCode: result.curl_code, error: error)
    }

    /// Headers of the last response block (redirects and 100-continue produce several).
    static func parseHeaders(_ raw: String) -> [String: String] {
        var out: [String: String] = [:]
        // "\r\n" is one Character in Swift: split on any newline.
        for l in raw.split(whereSeparator: { $0.isNewline }) {
            if l.hasPrefix("HTTP/") { out = [:]; continue }
            guard let colon = l.firstIndex(of: ":") else { continue }
            let name = l[..<colon].lowercased()
            let value = String(l[l.index(after: colon)...]).trimmed
            out[name] = out[name].map { $0 + ", " + value } ?? value
        }
        return out
    }

    package static var transferErrorsWorthRetrying: Set<Int32> {
        // couldn't connect, partial file, operation timed out, send/recv errors, got nothing
        [7, 18, 28, 52, 55, 56, 16, 92]
    }
}
