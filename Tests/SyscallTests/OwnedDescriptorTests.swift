import Glibc
@testable import Syscall
import Testing

@Suite struct OwnedDescriptorTests {
    /// A second close (or the last reference going after one) never closes the number the kernel
    /// gave to the next open; the last reference going closes a descriptor nobody closed.
    @Test func closesExactlyOnce() throws {
        // Numbers near the descriptor limit: other tests run in this process at the same time, and an open
        // there takes the lowest free number, so it can neither get these numbers nor be replaced by dup2.
        let first = try highDescriptor(below: 1)
        var owned: OwnedDescriptor? = OwnedDescriptor(first)
        owned?.close()
        #expect(owned?.rawValue == -1)
        // The number given to another open meanwhile (dup2 places it exactly there).
        let source = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { close(source) }
        let reused = dup2(source, first)
        defer { close(reused) }
        try #require(reused == first)
        owned?.close()
        owned = nil
        #expect(fcntl(reused, F_GETFD) >= 0, "the reused number was closed")

        let other = try highDescriptor(below: 2)
        do { _ = OwnedDescriptor(other) }
        #expect(fcntl(other, F_GETFD) == -1, "the last reference did not close it")
    }

    /// /dev/null opened at the `slot`-th number below the soft descriptor limit.
    private func highDescriptor(below slot: Int32) throws -> Int32 {
        var limit = rlimit()
        try #require(getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0)
        let target = Int32(min(limit.rlim_cur, 65_536)) - slot
        try #require(target > 256, "the descriptor limit \(limit.rlim_cur) leaves no room above other tests")
        let opened = open("/dev/null", O_RDONLY | O_CLOEXEC)
        try #require(opened >= 0)
        defer { close(opened) }
        let placed = fcntl(opened, F_DUPFD_CLOEXEC, target)
        try #require(placed == target, "no free descriptor at \(target)")
        return placed
    }
}
