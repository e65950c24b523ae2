#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import EROFS
import Remote
import Glibc
import Syscall

/// What `push` did.
public struct PushOutcome: Sendable {
    public var reference: String
    public var result: PushResult
    public var platform: String
}

extension Runtime {
    /// Uploads a local EROFS image to `reference` (`oci://HOST[:PORT]/REPO[:TAG]`) as the one layer of
    /// an image for the platform the options name (default: this host), with its fs-verity digest
    /// and tree (see `OCIPusher`). The same credential and TLS rules as `mount`.
    public func push(image: String, to reference: String, options o: OCIOptions) throws -> PushOutcome {
        let ref: OCIReference
        do { ref = try OCIReference(parsing: reference) } catch let e as RemoteError {
            throw RuntimeError.badOptionValue("REFERENCE", detail: e.description)
        }
        guard ref.digest == nil else {
            throw RuntimeError.badOptionValue("REFERENCE", detail: "push to a tag (oci://HOST/REPO:TAG), not a digest")
        }
        let (canonical, _) = try canonicalSource(image)
        let file: FileSource
        do { file = try FileSource(path: canonical) } catch {
            throw RuntimeError.sourceUnreadable(image, detail: "\(error)")
        }
        do { _ = try EROFSImage.superblock(of: file) } catch {
            throw RuntimeError.notEROFS(canonical, detail: "\(error)")
        }
        do {
            let platform = try o.platform.map(OCIPlatform.init(parsing:))
                ?? OCIPlatform.host(machine: Sys.uname().machine)
            let tree = try FsVerityTree(size: file.size) { try file.read(at: $0, count: $1) }
            let pusher = OCIPusher(client: try registryClient(ref, o))
            // The bytes checked and hashed above are the bytes uploaded: one open of the image (kept
            // open for the whole upload).
            let result = try withExtendedLifetime(file) {
                try pusher.push(image: file.descriptor, size: file.size, tree: tree, platform: platform)
            }
            return PushOutcome(reference: ref.description, result: result, platform: platform.description)
        } catch let e as RemoteError {
            if case .badPlatform = e { throw RuntimeError.badOptionValue("--platform", detail: e.description) }
            throw RuntimeError.pushFailed(e.description)
        }
    }
}
