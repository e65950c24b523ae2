import Dispatch
import Glibc
import Synchronization
import SystemPackage

/// Small concurrency helpers that avoid Foundation (which would pull ICU into every start-up).
package enum Threads {
    private final class Box: @unchecked Sendable {  // handed to exactly one new thread
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }

    /// Runs `body(0..<n)` on `n` threads of its own and waits for all: for blocking I/O, where
    /// DispatchQueue.concurrentPerform would run no more at once than there are CPUs.
    package static func parallel(_ n: Int, _ body: @escaping @Sendable (Int) -> Void) {
        guard n > 1 else { if n == 1 { body(0) }; return }
        let done = DispatchSemaphore(value: 0)
        for i in 1..<n {
            detach {
                body(i)
                done.signal()
            }
        }
        body(0)
        for _ in 1..<n { done.wait() }
    }

    /// Runs `body` on a new detached OS thread (its own kernel task, so per-thread state such as a
    /// private mount namespace stays with it).
    package static func detach(_ body: @escaping () -> Void) {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { arg in
            let b = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            b.body()
            return nil
        }, box)
        if rc == 0 {
            pthread_detach(tid)
        } else {
            Unmanaged<Box>.fromOpaque(box).release()
            body()
        }
    }
}

/// A value guarded by a mutex: a `Synchronization.Mutex` stored in a class, so the lock and the
/// value have one stable address however the box is shared.
package final class Locked<T>: @unchecked Sendable {  // the value is reached only through the mutex
    private let mutex: Mutex<T>

    package init(_ value: T) { mutex = Mutex(value) }

    package func withLock<R>(_ body: (inout T) throws -> R) rethrows -> R {
        try mutex.withLock { v in try body(&v) }
    }

    package func get() -> T { withLock { $0 } }
    package func set(_ v: T) { withLock { $0 = v } }
}

/// Text helpers that Foundation would otherwise provide.
package extension String {
    /// Without leading and trailing whitespace and newlines.
    var trimmed: String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s = s.dropFirst() }
        while let l = s.last, l.isWhitespace { s = s.dropLast() }
        return String(s)
    }

    /// Right-padded with spaces to `width` characters.
    func padded(to width: Int) -> String {
        count >= width ? self : self + String(repeating: " ", count: width - count)
    }

    /// Two lower-case hex digits.
    init(hexByte b: UInt8) {
        let digits = Array("0123456789abcdef".utf8)
        self = String(decoding: [digits[Int(b >> 4)], digits[Int(b & 0xf)]], as: UTF8.self)
    }

    /// The path without its last component ("/" for top-level paths).
    var parentPath: String {
        guard let i = lastIndex(of: "/") else { return "." }
        return i == startIndex ? "/" : String(self[..<i])
    }
}

/// "12.3" style formatting of a Double with `digits` decimals.
package func formatDecimal(_ v: Double, digits: Int = 1) -> String {
    var p = 1.0
    for _ in 0..<digits { p *= 10 }
    let r = (v * p).rounded() / p
    var s = "\(r)"
    if let dot = s.firstIndex(of: ".") {
        let decimals = s.distance(from: dot, to: s.endIndex) - 1
        if decimals < digits { s += String(repeating: "0", count: digits - decimals) }
    } else if digits > 0 {
        s += "." + String(repeating: "0", count: digits)
    }
    return s
}

/// A descriptor with one owner, for descriptors shared between threads or handed on: closed exactly
/// once — by `close()`, or when the last reference goes — so a second close can never hit a number
/// the kernel has given to another open meanwhile.
package final class OwnedDescriptor: @unchecked Sendable {  // the number is reached only through its lock
    private let number: Locked<Int32?>

    package init(_ fd: Int32) { number = Locked(fd) }
    package convenience init(_ fd: FileDescriptor) { self.init(fd.rawValue) }

    /// The descriptor while it is open (-1 after `close()`): for calls that use it, not keep it.
    package var rawValue: Int32 { number.get() ?? -1 }

    package func close() {
        if let fd = number.withLock({ n -> Int32? in defer { n = nil }; return n }) { Sys.close(fd) }
    }

    deinit { close() }
}
