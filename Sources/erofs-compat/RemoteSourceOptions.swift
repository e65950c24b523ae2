import ArgumentParser
import Remote
import Runtime

/// The options of a remote source (http(s) URL or oci:// reference): the cache, the digest, the
/// registry's credentials and TLS rules. Shared by `mount` and `nbd serve`.
struct RemoteSourceOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Cache directory for remote images (ext4, xfs or btrfs for lazy mounts).", valueName: "DIR"))
    var cacheDir: String = "/var/cache/erofs-compat"

    @Flag(help: "Accept a server that ignores Range requests by downloading the whole image first.")
    var allowFullDownload = false

    @Option(help: ArgumentHelp("Expected sha256 of the remote image, checked when the cache is complete.", valueName: "sha256:HEX"))
    var digest: String?

    @Option(help: ArgumentHelp("http(s): check every block against this fs-verity digest before it is served (see 'image verity').",
                               valueName: "sha256:HEX"))
    var verity: String?

    @Option(help: ArgumentHelp("http(s): where the fs-verity tree is (default: the source URL + \".verity\").", valueName: "URL"))
    var verityTree: String?

    @Flag(help: "Remote: refuse a source without an fs-verity digest (an OCI layer pushed by 'push', or --verity).")
    var requireVerity = false

    @Option(help: ArgumentHelp("Remote: give up preparing (manifest, probe, metadata) after this many seconds.", valueName: "SECONDS"))
    var prepareTimeout: Double = 120

    @Option(help: ArgumentHelp("OCI: use layer N of the manifest (0 = first).", valueName: "N"))
    var layer: Int?

    @Option(help: ArgumentHelp("OCI: use this blob of the repository, skipping the manifest.", valueName: "sha256:HEX"))
    var blob: String?

    @Option(help: ArgumentHelp("OCI: the platform to pick from an image index (default: this host).", valueName: "OS/ARCH[/VARIANT]"))
    var platform: String?

    @Option(help: ArgumentHelp("OCI: registry credentials file (docker config.json format).", valueName: "FILE"))
    var authFile: String?

    @Option(help: ArgumentHelp("OCI: registry user name (the password is read with --password-stdin).", valueName: "USER"))
    var username: String?

    @Flag(help: "OCI: read the registry password from the first line of standard input.")
    var passwordStdin = false

    @Flag(help: "OCI: allow plain http to a registry outside 127.0.0.0/8.")
    var insecure = false

    /// Checks the combinations, given the source they apply to.
    func validate(source: String) throws {
        try validateCredentialFlags(username: username, passwordStdin: passwordStdin)
        if let layer, layer < 0 { throw ValidationError("--layer must be 0 or more") }
        if layer != nil, blob != nil { throw ValidationError("--layer and --blob exclude each other") }
        if !(prepareTimeout > 0 && prepareTimeout <= 86_400) { throw ValidationError("--prepare-timeout must be between 0 and 86400 seconds") }
        if verityTree != nil, verity == nil { throw ValidationError("--verity-tree needs --verity") }
        if verity != nil, !(source.hasPrefix("http://") || source.hasPrefix("https://")) {
            throw ValidationError("--verity applies to http(s) sources")
        }
        let ociOnly = layer != nil || blob != nil || platform != nil || authFile != nil || username != nil || insecure
        if ociOnly, !source.hasPrefix("oci://") {
            throw ValidationError("--layer, --blob, --platform, --auth-file, --username and --insecure apply to oci:// sources only")
        }
    }

    /// The runtime's options; reads the password from standard input when asked to.
    func make(prefetch: Prefetch = .none, recordProfile: String? = nil) throws -> RemoteOptions {
        let oci = OCIOptions(layer: layer, blob: blob, platform: platform, authFile: authFile, username: username,
                             password: try readPassword(passwordStdin), insecure: insecure)
        var remote = RemoteOptions(cacheDir: cacheDir, allowFullDownload: allowFullDownload,
                                   digest: digest.map { $0.hasPrefix("sha256:") ? String($0.dropFirst(7)) : $0 }, oci: oci,
                                   prefetch: prefetch, recordProfile: recordProfile)
        remote.prepareTimeout = prepareTimeout
        if requireVerity { remote.requireVerity = true }
        if let verity {
            remote.verity = VeritySource(digest: verity.hasPrefix("sha256:") ? String(verity.dropFirst(7)) : verity, treeURL: verityTree ?? "")
        }
        return remote
    }
}

/// --username and --password-stdin come together: a password is never taken as an argument.
func validateCredentialFlags(username: String?, passwordStdin: Bool) throws {
    if passwordStdin, username == nil { throw ValidationError("--password-stdin needs --username") }
    if username != nil, !passwordStdin {
        throw ValidationError("--username needs --password-stdin (passwords are never taken as arguments)")
    }
}

/// The registry password from the first line of standard input when --password-stdin asked for it.
func readPassword(_ asked: Bool) throws -> String? {
    guard asked else { return nil }
    guard let line = readLine(strippingNewline: true), !line.isEmpty else {
        throw CLIFailure(message: "--password-stdin: no password on standard input", code: 2)
    }
    return line
}
