import Probe

/// Kernel EROFS mounted straight from the image file (Linux 6.12+, no loop device).
struct FileBackend: MountBackend {
    var kind: Backend { .file }

    func attach(_ r: PreparedMount) throws -> Attachment {
        try attachEROFS(source: r.source, at: r.target, options: r.options, passOffset: true)
        return Attachment()
    }

    func release(_ record: MountRecord) {}
}
