import ArgumentParser
import Remote
import Runtime

/// The registry flags `push` takes (the same credential and TLS rules as `mount`'s oci:// sources).
struct RegistryOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The image's platform in its config (default: this host).",
                               valueName: "OS/ARCH[/VARIANT]"))
    var platform: String?

    @Option(help: ArgumentHelp("Registry credentials file (docker config.json format).", valueName: "FILE"))
    var authFile: String?

    @Option(help: ArgumentHelp("Registry user name (the password is read with --password-stdin).", valueName: "USER"))
    var username: String?

    @Flag(help: "Read the registry password from the first line of standard input.")
    var passwordStdin = false

    @Flag(help: "Allow plain http to a registry outside 127.0.0.0/8.")
    var insecure = false

    func validate() throws { try validateCredentialFlags(username: username, passwordStdin: passwordStdin) }

    func make() throws -> OCIOptions {
        OCIOptions(platform: platform, authFile: authFile, username: username, password: try readPassword(passwordStdin),
                   insecure: insecure)
    }
}

/// `erofs-compat push IMAGE oci://HOST[:PORT]/REPO:TAG`.
struct PushCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "push",
        abstract: "Upload an EROFS image to an OCI registry as a one-layer image with its fs-verity digest and tree.",
        discussion: """
            The layer (media type application/vnd.erofs.layer.v1, as containerd's EROFS differ names it) \
            carries the annotations org.erofs-compat.verity.digest (the image's fs-verity digest, as \
            'image verity' prints it) and org.erofs-compat.verity.tree (the digest of the tree blob); the \
            tree is kept alive by an OCI 1.1 referrer artifact whose subject is the image manifest, listed \
            by the registry's referrers API or, where it has none, in the sha256-<hex> fallback tag. \
            'mount' of the reference then checks every block against that digest before it is served. \
            Exit codes: 0 pushed, 1 the registry refused or could not be reached (named), 2 usage error, \
            3 IMAGE is missing or not EROFS.
            """)

    @Argument(help: "The EROFS image.") var image: String
    @Argument(help: ArgumentHelp("Where to push it.", valueName: "oci://HOST[:PORT]/REPO[:TAG]")) var reference: String
    @OptionGroup var registry: RegistryOptions

    func run() throws {
        let options = try registry.make()
        let out = try runtimeCall { try Runtime().push(image: image, to: reference, options: options) }
        let r = out.result
        print("pushed \(image) to \(out.reference) (\(out.platform))")
        print("  manifest \(r.manifest.digest)")
        let root = r.layer.annotations?[OCIPushTypes.verityDigestAnnotation] ?? "?"
        print("  layer    \(r.layer.digest) (\(r.layer.size) bytes), fs-verity \(root)")
        print("  tree     \(r.tree.digest) (\(r.tree.size) bytes), referrer \(r.referrer.digest)"
              + " via the \(r.referrersVia)")
        print("  \(r.uploaded) blobs uploaded, \(r.skipped) already there")
    }
}
