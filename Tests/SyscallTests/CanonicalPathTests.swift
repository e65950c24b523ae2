import Foundation
import Testing
@testable import Syscall
import SystemPackage
import TestSupport

/// `Sys.canonical` takes a one-walk fast path for paths that are canonical already; whatever the
/// path looks like, it must agree with realpath(3).
@Suite struct CanonicalPathTests {
    @Test func lexicalNormality() {
        for p in ["/", "/a", "/a/b.c", "/a/.hidden", "/a/...", "/a/b..c"] { #expect(Sys.isLexicallyNormal(p), "\(p)") }
        for p in ["", "a", "a/b", "//a", "/a//b", "/a/", "/./a", "/a/.", "/a/..", "/a/../b", "/a/./b"] {
            #expect(!Sys.isLexicallyNormal(p), "\(p)")
        }
    }

    @Test func agreesWithRealpath() throws {
        let d = try ScratchDir("canon")
        defer { d.remove() }
        let real = try Sys.realpath(d.path)
        try FileManager.default.createDirectory(atPath: real + "/dir/sub", withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: real + "/dir/sub/file", contents: Data([1]))
        try FileManager.default.createSymbolicLink(atPath: real + "/link", withDestinationPath: "dir/sub")
        try FileManager.default.createSymbolicLink(atPath: real + "/dir/up", withDestinationPath: "..")
        for p in [real + "/dir/sub/file", real + "/link/file", real + "/dir/up/dir/sub", real + "/dir/sub/../sub/file",
                  real + "//dir/./sub/", real + "/dir/sub/file"] {
            let (c, st) = try Sys.canonical(p)
            #expect(c == (try Sys.realpath(p)), "\(p)")
            #expect(st.st_ino == (try Sys.stat(p)).st_ino, "\(p)")
        }
        // Relative paths take realpath's way (tests run in parallel: the working directory stays).
        let here = try Sys.realpath(".")
        #expect(try Sys.canonical(".").path == here)
        #expect(throws: Errno.noSuchFileOrDirectory) { try Sys.canonical(real + "/missing") }
        #expect(throws: Errno.noSuchFileOrDirectory) { try Sys.canonical(real + "/link/missing") }
    }
}
