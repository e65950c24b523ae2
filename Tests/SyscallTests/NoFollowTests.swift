import Foundation
import Glibc
import Testing
@testable import Syscall
import SystemPackage
import TestSupport

/// Files root creates are never created or truncated through a planted symlink (issue 13, item 4).
@Suite struct NoFollowTests {
    @Test func creatingNeverFollowsALink() throws {
        let d = try ScratchDir("nofollow")
        defer { d.remove() }
        try "precious\n".write(toFile: d.file("victim"), atomically: false, encoding: .utf8)
        try FileManager.default.createSymbolicLink(atPath: d.file("planted"), withDestinationPath: d.file("victim"))
        #expect(throws: Errno.tooManySymbolicLinkLevels) { _ = try Sys.open(d.file("planted"), O_RDWR | O_CREAT | O_TRUNC) }
        #expect(try String(contentsOfFile: d.file("victim"), encoding: .utf8) == "precious\n")
    }

    /// The temporary file of an atomic write has an unpredictable name, created exclusively: a link
    /// planted under the name it used to have (PATH.tmp.PID) is left alone.
    @Test func atomicWritesIgnorePlantedTemporaries() throws {
        let d = try ScratchDir("atomic")
        defer { d.remove() }
        try "precious\n".write(toFile: d.file("victim"), atomically: false, encoding: .utf8)
        try FileManager.default.createSymbolicLink(atPath: d.file("profile.tmp.\(getpid())"), withDestinationPath: d.file("victim"))
        try Sys.writeFileAtomically(d.file("profile"), Array("ranges\n".utf8))
        #expect(try String(contentsOfFile: d.file("victim"), encoding: .utf8) == "precious\n")
        #expect(try String(contentsOfFile: d.file("profile"), encoding: .utf8) == "ranges\n")
    }

    /// A path that has a symlink anywhere in it is refused by the no-symlinks open.
    @Test func noSymlinkAnywhere() throws {
        let d = try ScratchDir("nosym")
        defer { d.remove() }
        try FileManager.default.createDirectory(atPath: d.file("real"), withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: d.file("link"), withDestinationPath: d.file("real"))
        let real = try Sys.realpath(d.path)
        #expect(throws: Errno.tooManySymbolicLinkLevels) { _ = try Sys.openNoSymlinks(real + "/link/f", O_RDWR | O_CREAT) }
        let fd = try Sys.openNoSymlinks(real + "/real/f", O_RDWR | O_CREAT)
        Sys.close(fd.rawValue)
    }

    @Test func unsafeDirectories() throws {
        let d = try ScratchDir("unsafe")
        defer { d.remove() }
        let real = try Sys.realpath(d.path)
        try FileManager.default.createDirectory(atPath: real + "/mine", withIntermediateDirectories: true)
        chmod(real + "/mine", 0o700)
        #expect(Sys.unsafeDirectoryReason(real + "/mine") == nil)
        chmod(real + "/mine", 0o777)
        #expect(Sys.unsafeDirectoryReason(real + "/mine")?.contains("writable by group or others") == true)
        guard Sys.effectiveUID == 0 else { return }
        chmod(real + "/mine", 0o700)
        chown(real + "/mine", 65534, 65534)
        #expect(Sys.unsafeDirectoryReason(real + "/mine")?.contains("owned by uid 65534") == true)
    }
}
