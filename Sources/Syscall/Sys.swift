import CHeaders
import Glibc
import SystemPackage

/// The single syscall shim layer: every call into the kernel goes through here. A `-1` return becomes a
/// thrown `Errno`, and `EINTR` is retried.
package enum Sys {
    /// Runs `body` until it returns something other than `-1`/`EINTR`; `-1` with another errno throws.
    @inline(__always)
    package static func call<T: FixedWidthInteger>(_ body: () -> T) throws -> T {
        while true {
            let r = body()
            if r == -1 {
                let e = Errno(rawValue: ecx_errno())
                if e == .interrupted { continue }
                throw e
            }
            return r
        }
    }

    // MARK: files

    /// open(2). A call that may create the file never follows a symlink in its last component
    /// (O_NOFOLLOW): as root, a planted link would otherwise create or truncate whatever it names.
    package static func open(_ path: String, _ flags: Int32, mode: UInt32 = 0o600) throws -> FileDescriptor {
        let f = flags & O_CREAT != 0 ? flags | O_NOFOLLOW : flags
        return FileDescriptor(rawValue: try call { ecx_open(path, f | O_CLOEXEC, mode) })
    }

    /// Opens an absolute path in which no component may be a symlink (openat2 RESOLVE_NO_SYMLINKS;
    /// O_NOFOLLOW alone where the kernel has no openat2): for cache and state files, whose
    /// directories were canonicalised once, so any symlink found later was planted.
    package static func openNoSymlinks(_ path: String, _ flags: Int32, mode: UInt32 = 0o600) throws -> FileDescriptor {
        while true {
            let fd = ecx_open_no_symlinks_mode(path, flags | O_NOFOLLOW, mode)
            if fd >= 0 { return FileDescriptor(rawValue: fd) }
            let e = Errno(rawValue: ecx_errno())
            if e == .interrupted { continue }
            if e == .noFunction { return try open(path, flags | O_NOFOLLOW, mode: mode) }
            throw e
        }
    }

    /// Why `path` (an existing directory) is not safe for root to keep files in: not owned by this
    /// user, or writable by group or others — or one of its parents writable by others without the
    /// sticky bit (someone else could swap it). nil when it is safe. Checked without following
    /// symlinks.
    package static func unsafeDirectoryReason(_ path: String) -> String? {
        guard let st = try? lstat(path) else { return "\(path) does not exist" }
        if st.st_mode & S_IFMT == S_IFLNK { return "\(path) is a symlink" }
        guard st.st_mode & S_IFMT == S_IFDIR else { return "\(path) is not a directory" }
        if st.st_uid != effectiveUID { return "\(path) is owned by uid \(st.st_uid), not \(effectiveUID)" }
        if st.st_mode & 0o022 != 0 { return "\(path) is writable by group or others (mode \(String(st.st_mode & 0o7777, radix: 8)))" }
        var parent = path
        while let slash = parent.lastIndex(of: "/"), parent != "/" {
            parent = slash == parent.startIndex ? "/" : String(parent[..<slash])
            guard let p = try? lstat(parent) else { return "\(parent) cannot be examined" }
            if p.st_mode & S_IFMT == S_IFLNK { return "\(parent) is a symlink" }
            if p.st_uid != 0 && p.st_uid != effectiveUID { return "\(parent) is owned by uid \(p.st_uid)" }
            if p.st_mode & 0o002 != 0 && p.st_mode & S_ISVTX == 0 { return "\(parent) is writable by others" }
        }
        return nil
    }

    package static func openAt(_ dir: FileDescriptor, _ path: String, _ flags: Int32, mode: UInt32 = 0o600) throws -> FileDescriptor {
        FileDescriptor(rawValue: try call { ecx_openat(dir.rawValue, path, flags | O_CLOEXEC, mode) })
    }

    /// An unnamed temporary file in `directory` (O_TMPFILE): nothing can be left behind, even on a crash.
    package static func openTemporary(in directory: String) throws -> FileDescriptor {
        try open(directory, ecx_o_tmpfile | O_RDWR, mode: 0o600)
    }

    /// Re-opens a descriptor through /proc/self/fd, giving a fresh open file description.
    package static func reopen(_ fd: FileDescriptor, _ flags: Int32) throws -> FileDescriptor {
        try open("/proc/self/fd/\(fd.rawValue)", flags)
    }

    package static func close(_ fd: Int32) { _ = Glibc.close(fd) }

    package static func pread(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
        try call { Glibc.pread(fd, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    /// posix_fadvise(POSIX_FADV_WILLNEED): the kernel starts reading the range into the page cache
    /// and returns without waiting for it. (posix_fadvise returns its error instead of setting errno.)
    package static func adviseWillNeed(_ fd: Int32, offset: Int64, length: Int64) throws {
        let rc = posix_fadvise(fd, off_t(offset), off_t(length), POSIX_FADV_WILLNEED)
        if rc != 0 { throw Errno(rawValue: rc) }
    }

    package static func pwrite(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, at offset: Int64) throws -> Int {
        try call { Glibc.pwrite(fd, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    /// Writes all of `buffer` at `offset`, looping over short writes.
    package static func pwriteAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, at offset: Int64) throws {
        var done = 0
        while done < buffer.count {
            let n = try pwrite(fd, UnsafeRawBufferPointer(rebasing: buffer[done...]), at: offset + Int64(done))
            done += n
        }
    }

    /// Reads exactly `count` bytes at `offset` unless EOF comes first; returns what was read.
    package static func preadFully(_ fd: Int32, count: Int, at offset: Int64) throws -> [UInt8] {
        // Not zero-filled first: every byte returned was read.
        try [UInt8](unsafeUninitializedCapacity: count) { buf, initialized in
            var done = 0
            defer { initialized = done }
            while done < count {
                let n = try pread(fd, into: UnsafeMutableRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(buf)[done...]),
                                  at: offset + Int64(done))
                if n == 0 { break }
                done += n
            }
        }
    }

    /// The whole content of a small file (procfs, sysfs, state records): open, read to EOF, close.
    package static func readFile(_ path: String) throws -> [UInt8] {
        let fd = try open(path, O_RDONLY)
        defer { close(fd.rawValue) }
        return try readAll(fd.rawValue)
    }

    /// The content of a small regular file (a state record) in one read when it fits 16 KiB: a
    /// regular file's read comes back short only at EOF (procfs files do not promise that: `readFile`).
    package static func readRegularFile(_ path: String) throws -> [UInt8] {
        let fd = try open(path, O_RDONLY)
        defer { close(fd.rawValue) }
        let first = try [UInt8](unsafeUninitializedCapacity: 16384) { buf, count in
            count = try read(fd.rawValue, into: UnsafeMutableRawBufferPointer(buf))
        }
        if first.count < 16384 { return first }
        return try first + readAll(fd.rawValue)
    }

    /// Everything `fd` yields until EOF (a file, a pipe).
    package static func readAll(_ fd: Int32) throws -> [UInt8] {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = try chunk.withUnsafeMutableBytes { try read(fd, into: $0) }
            if n == 0 { return out }
            out.append(contentsOf: chunk[..<n])
            if n == chunk.count, chunk.count < 1 << 20 { chunk = [UInt8](repeating: 0, count: chunk.count * 4) }
        }
    }

    /// Replaces `path` with `bytes` atomically: a temporary file beside it, then rename (readers see
    /// the old or the new content, never a mix). The temporary file is removed on failure.
    package static func writeFileAtomically(_ path: String, _ bytes: [UInt8], mode: UInt32 = 0o644) throws {
        // A fresh name, created exclusively: a file or link planted under it is never written through.
        let tmp = path + ".tmp.\(processID).\(UInt32.random(in: 0...UInt32.max))"
        do {
            let fd = try open(tmp, O_WRONLY | O_CREAT | O_EXCL, mode: mode)
            defer { close(fd.rawValue) }
            try bytes.withUnsafeBytes { try pwriteAll(fd.rawValue, $0, at: 0) }
        } catch {
            try? unlink(tmp)
            throw error
        }
        do { try rename(tmp, path) } catch {
            try? unlink(tmp)
            throw error
        }
    }

    package static func read(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try call { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    package static func write(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) throws -> Int {
        try call { Glibc.write(fd, buffer.baseAddress, buffer.count) }
    }

    package static func ftruncate(_ fd: Int32, _ size: Int64) throws {
        _ = try call { Glibc.ftruncate(fd, off_t(size)) }
    }

    package static func fsync(_ fd: Int32) throws { _ = try call { Glibc.fsync(fd) } }

    package static func fstat(_ fd: Int32) throws -> FileStatus {
        var st = FileStatus()
        _ = try call { cFstat(fd, &st) }
        return st
    }

    package static func stat(_ path: String) throws -> FileStatus {
        var st = FileStatus()
        _ = try call { cFstatat(AT_FDCWD, path, &st, 0) }
        return st
    }

    package static func lstat(_ path: String) throws -> FileStatus {
        var st = FileStatus()
        _ = try call { cFstatat(AT_FDCWD, path, &st, AT_SYMLINK_NOFOLLOW) }
        return st
    }

    package static func statfs(_ path: String) throws -> FilesystemStatus {
        var st = FilesystemStatus()
        _ = try call { cStatfs(path, &st) }
        return st
    }

    package static func fstatfs(_ fd: Int32) throws -> FilesystemStatus {
        var st = FilesystemStatus()
        _ = try call { cFstatfs(fd, &st) }
        return st
    }

    /// True when `path` exists and is a directory (following symlinks).
    package static func isDirectory(_ path: String) -> Bool {
        guard let st = try? stat(path) else { return false }
        return st.st_mode & S_IFMT == S_IFDIR
    }

    /// True when `path` exists and is a regular file (following symlinks).
    package static func isRegularFile(_ path: String) -> Bool {
        guard let st = try? stat(path) else { return false }
        return st.st_mode & S_IFMT == S_IFREG
    }

    /// The statfs f_type of the filesystem holding `path`.
    package static func filesystemType(_ path: String) throws -> UInt64 {
        UInt64(bitPattern: Int64(try statfs(path).f_type))
    }

    /// `path` made absolute and canonical (as realpath(3)), with the stat of what it names.
    package static func canonical(_ path: String) throws -> (path: String, stat: FileStatus) {
        let (fd, p) = try openCanonical(path, ecx_o_path)
        defer { close(fd.rawValue) }
        return (p, try fstat(fd.rawValue))
    }

    /// Opens `path` with `flags` and returns the descriptor with the canonical path (as realpath(3))
    /// of what it opened. An absolute, lexically normal path with no symlink in it is canonical
    /// already; one openat2 walk with RESOLVE_NO_SYMLINKS proves that and opens it (realpath walks
    /// the path once per component, and opening after it walks once more).
    package static func openCanonical(_ path: String, _ flags: Int32) throws -> (fd: FileDescriptor, path: String) {
        if isLexicallyNormal(path) {
            let fd = ecx_open_no_symlinks(path, flags)
            if fd >= 0 { return (FileDescriptor(rawValue: fd), path) }
            let e = Errno(rawValue: ecx_errno())
            // ELOOP: a symlink on the way; ENOSYS/EPERM/EINVAL: no openat2 here. Both: realpath.
            if e != .tooManySymbolicLinkLevels && e != .noFunction && e != .notPermitted && e != .invalidArgument { throw e }
        }
        // Opened by the symlink-free path realpath found: a component swapped for a symlink since
        // is refused (ELOOP), never followed.
        let p = try realpath(path)
        return (try openNoSymlinks(p, flags), p)
    }

    /// Absolute, no empty, "." or ".." components, no trailing slash.
    static func isLexicallyNormal(_ path: String) -> Bool {
        var path = path
        return path.withUTF8 { b in
            guard let first = b.first, first == UInt8(ascii: "/") else { return false }
            if b.count == 1 { return true }
            // Each component: the bytes after a '/' up to the next '/' or the end.
            var start = 1
            for i in 1...b.count where i == b.count || b[i] == UInt8(ascii: "/") {
                let n = i - start
                if n == 0 || (n == 1 && b[start] == UInt8(ascii: ".")) || (n == 2 && b[start] == UInt8(ascii: ".") && b[start + 1] == UInt8(ascii: ".")) {
                    return false
                }
                start = i + 1
            }
            return true
        }
    }

    package static func realpath(_ path: String) throws -> String {
        guard let p = Glibc.realpath(path, nil) else { throw Errno(rawValue: ecx_errno()) }
        defer { free(p) }
        return String(cString: p)
    }

    package static func mkdir(_ path: String, mode: UInt32 = 0o755) throws {
        _ = try call { Glibc.mkdir(path, mode_t(mode)) }
    }

    package static func unlink(_ path: String) throws { _ = try call { Glibc.unlink(path) } }

    package static func rename(_ from: String, _ to: String) throws { _ = try call { Glibc.rename(from, to) } }

    /// flock(2); `nonBlocking` turns a held lock into `EWOULDBLOCK`.
    package static func flock(_ fd: Int32, exclusive: Bool, nonBlocking: Bool = false) throws {
        let op = (exclusive ? ecx_lock_ex : ecx_lock_sh) | (nonBlocking ? ecx_lock_nb : 0)
        _ = try call { ecx_flock(fd, op) }
    }

    package static func unlock(_ fd: Int32) { _ = ecx_flock(fd, ecx_lock_un) }

    // MARK: process & identity

    package static func uname() -> (release: String, machine: String) {
        func field(_ which: Int32) -> String {
            var buf = [CChar](repeating: 0, count: 65)
            _ = ecx_uname_field(which, &buf, buf.count)
            return String(cString: buf)
        }
        return (field(0), field(1))
    }

    package static var effectiveUID: UInt32 { geteuid() }
    package static var processID: Int32 { getpid() }
    package static var threadID: Int { Int(ecx_gettid()) }

    /// Gives the calling thread its own mount namespace (mounts made afterwards vanish with the thread)
    /// and makes every mount in it private so nothing propagates to the host.
    package static func unshareMountNamespace() throws {
        _ = try call { ecx_unshare(ecx_clone_newns) }
        _ = try call { Glibc.mount(nil, "/", nil, ecx_ms_rec | ecx_ms_private, nil) }
    }

    package static func kill(_ pid: Int32, _ signal: Int32) throws { _ = try call { Glibc.kill(pid, signal) } }

    /// Whether a process exists (kill with signal 0; EPERM still means it exists).
    package static func processExists(_ pid: Int32) -> Bool {
        if Glibc.kill(pid, 0) == 0 { return true }
        return ecx_errno() == EPERM
    }

    // MARK: fs-verity

    /// FS_IOC_ENABLE_VERITY (SHA-256, 4 KiB blocks, no salt) on a descriptor opened read-only: the
    /// kernel builds the tree and from then on checks every page read from disk and refuses writes.
    /// EEXIST: already enabled; ETXTBSY: a writer is open; EOPNOTSUPP/ENOTTY: not on this filesystem
    /// or kernel.
    package static func enableVerity(_ fd: Int32) throws {
        _ = try call { ecx_fsverity_enable(fd) }
    }

    /// FS_IOC_MEASURE_VERITY: the file's fs-verity digest as the kernel measured it.
    package static func measureVerity(_ fd: Int32) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        _ = try out.withUnsafeMutableBufferPointer { b in try call { ecx_fsverity_measure(fd, b.baseAddress) } }
        return out
    }

    // MARK: inotify

    /// Whether a file is open elsewhere than through `fd` — by another process or by the kernel (a
    /// file-backed superblock holds its backing file open until it is shut down). Decided with a
    /// write lease, taken and dropped at once; `fd` must be the caller's only open of the file.
    package static func fileIsShared(_ fd: Int32) throws -> Bool {
        try call { ecx_file_shared(fd) } == 1
    }

    /// A non-blocking, close-on-exec inotify instance.
    package static func inotifyInit() throws -> FileDescriptor {
        FileDescriptor(rawValue: try call { ecx_inotify_init() })
    }

    /// Watches the directory at `path` for its filesystem's shutdown (IN_UNMOUNT); returns the watch,
    /// or nil when `path` no longer shows the filesystem on `device` ("MAJOR:MINOR", as mountinfo
    /// has it): a mount gone between reading mountinfo and adding the watch would otherwise leave a
    /// watch on the directory beneath, which never sees an unmount.
    package static func inotifyWatchUnmount(_ fd: FileDescriptor, _ path: String, device: String) throws -> Int32? {
        let wd = try call { ecx_inotify_add_watch(fd.rawValue, path, ecx_in_unmount | ecx_in_onlydir) }
        if let st = try? stat(path), "\(major(st.st_dev)):\(minor(st.st_dev))" == device { return wd }
        _ = inotify_rm_watch(fd.rawValue, wd)
        return nil
    }

    /// Watches whose filesystem went away (IN_UNMOUNT or IN_IGNORED) among the pending events.
    package static func inotifyEndedWatches(_ fd: FileDescriptor) -> Set<Int32> {
        var ended = Set<Int32>()
        var buf = [UInt8](repeating: 0, count: 4096)
        while let n = try? buf.withUnsafeMutableBytes({ try read(fd.rawValue, into: $0) }), n > 0 {
            // struct inotify_event: wd, mask, cookie, len, then len bytes of name.
            buf.withUnsafeBytes { b in
                var off = 0
                while off + 16 <= n {
                    let wd = b.loadUnaligned(fromByteOffset: off, as: Int32.self)
                    let mask = b.loadUnaligned(fromByteOffset: off + 4, as: UInt32.self)
                    let len = Int(b.loadUnaligned(fromByteOffset: off + 12, as: UInt32.self))
                    if mask & (ecx_in_unmount | ecx_in_ignored) != 0 { ended.insert(wd) }
                    off += 16 + len
                }
            }
        }
        return ended
    }

    // MARK: poll

    /// poll(2) on one descriptor; true when `events` are ready before `timeoutMs`.
    package static func poll(_ fd: Int32, events: Int16 = Int16(POLLIN), timeoutMs: Int32) throws -> Bool {
        var p = pollfd(fd: fd, events: events, revents: 0)
        return try call { Glibc.poll(&p, 1, timeoutMs) } > 0
    }

    /// poll(2) over several descriptors; their `revents` are filled in. Returns how many are ready.
    package static func poll(_ fds: inout [pollfd], timeoutMs: Int32) throws -> Int {
        let n = fds.count
        let ready = try fds.withUnsafeMutableBufferPointer { b in
            try call { Glibc.poll(b.baseAddress, nfds_t(n), timeoutMs) }
        }
        return Int(ready)
    }

    // MARK: ioctl

    package static func ioctl(_ fd: Int32, _ request: UInt, _ arg: UnsafeMutableRawPointer?) throws -> Int32 {
        try call { ecx_ioctl_ptr(fd, request, arg) }
    }

    package static func ioctl(_ fd: Int32, _ request: UInt, value: UInt) throws -> Int32 {
        try call { ecx_ioctl_val(fd, request, value) }
    }

    // MARK: sockets (netlink)

    package static func socket(_ domain: Int32, _ type: Int32, _ proto: Int32) throws -> FileDescriptor {
        FileDescriptor(rawValue: try call { Glibc.socket(domain, type | Int32(SOCK_CLOEXEC.rawValue), proto) })
    }

    package static func send(_ fd: Int32, _ bytes: [UInt8]) throws -> Int {
        try bytes.withUnsafeBytes { b in try call { Glibc.send(fd, b.baseAddress, b.count, 0) } }
    }

    package static func recv(_ fd: Int32, maxBytes: Int) throws -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: maxBytes)
        let n = try buf.withUnsafeMutableBytes { b in try call { Glibc.recv(fd, b.baseAddress, b.count, 0) } }
        return Array(buf.prefix(n))
    }
}

/// struct stat and struct statfs under names that do not collide with the functions.
package typealias FileStatus = CHeaders.stat
package typealias FilesystemStatus = CHeaders.statfs

private func cFstat(_ fd: Int32, _ st: UnsafeMutablePointer<FileStatus>) -> Int32 { fstat(fd, st) }
private func cFstatat(_ dir: Int32, _ path: String, _ st: UnsafeMutablePointer<FileStatus>, _ flags: Int32) -> Int32 {
    fstatat(dir, path, st, flags)
}
private func cStatfs(_ path: String, _ st: UnsafeMutablePointer<FilesystemStatus>) -> Int32 { statfs(path, st) }
private func cFstatfs(_ fd: Int32, _ st: UnsafeMutablePointer<FilesystemStatus>) -> Int32 { fstatfs(fd, st) }
