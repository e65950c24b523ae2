import Glibc
@testable import Syscall
import Testing

@Suite struct OwnedDescriptorTests {
    /// A second close (or the last reference going after one) never closes the number the kernel
    /// gave to the next open; the last reference going closes a descriptor nobody closed.
    @Test func closesExactlyOnce() throws {
        let first = open("/dev/null", O_RDONLY | O_CLOEXEC)
        try #require(first >= 0)
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

        let other = open("/dev/null", O_RDONLY | O_CLOEXEC)
        try #require(other >= 0)
        do { _ = OwnedDescriptor(other) }
        #expect(fcntl(other, F_GETFD) == -1, "the last reference did not close it")
    }
}
