// swift-tools-version:6.0
import PackageDescription

/// A pkg-config system library that only contributes link and compile flags;
/// its declarations are reached through `CHeaders`.
func systemLibrary(_ name: String, dir: String, pkg: String, apt: String) -> Target {
    .systemLibrary(name: name, path: "Sources/CHeaders/system/\(dir)", pkgConfig: pkg, providers: [.apt([apt])])
}

let package = Package(
    name: "erofs-compat",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "erofs-compat", targets: ["ErofsCompatCLI"]),
        .library(name: "Probe", targets: ["Probe"]),
        .library(name: "EROFS", targets: ["EROFS"]),
        .library(name: "Runtime", targets: ["Runtime"]),
        .library(name: "Installer", targets: ["Installer"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
    ],
    targets: [
        systemLibrary("CKmod", dir: "kmod", pkg: "libkmod", apt: "libkmod-dev"),
        systemLibrary("CBlkid", dir: "blkid", pkg: "blkid", apt: "libblkid-dev"),
        // libcurl's headers only: the library is dlopen'ed on first use (CHeaders/shim.c), so it and its
        // ~30 dependencies are not loaded at exec by commands that do no HTTP. pkg-config would add
        // -lcurl to the link; Debian installs the headers on the default include path.
        .systemLibrary(name: "CCurl", path: "Sources/CHeaders/system/curl", providers: [.apt(["libcurl4-openssl-dev"])]),
        systemLibrary("CFuse3", dir: "fuse3", pkg: "fuse3", apt: "libfuse3-dev"),
        systemLibrary("CLz4", dir: "lz4", pkg: "liblz4", apt: "liblz4-dev"),
        systemLibrary("CLzma", dir: "lzma", pkg: "liblzma", apt: "liblzma-dev"),
        systemLibrary("CZstd", dir: "zstd", pkg: "libzstd", apt: "libzstd-dev"),
        systemLibrary("CZlib", dir: "zlib", pkg: "zlib", apt: "zlib1g-dev"),
        .target(
            name: "CHeaders",
            dependencies: ["CKmod", "CBlkid", "CCurl", "CFuse3", "CLz4", "CLzma", "CZstd", "CZlib"],
            exclude: ["system"]
        ),
        .target(
            name: "Syscall",
            dependencies: ["CHeaders", .product(name: "SystemPackage", package: "swift-system")]
        ),
        .target(name: "EROFS", dependencies: ["Syscall", .product(name: "SystemPackage", package: "swift-system")]),
        .target(
            name: "Probe",
            dependencies: ["Syscall", "EROFS", .product(name: "SystemPackage", package: "swift-system")]
        ),
        .target(name: "Remote", dependencies: ["Syscall", "EROFS", .product(name: "Crypto", package: "swift-crypto")]),
        .target(name: "Installer"),
        .target(
            name: "Runtime",
            dependencies: ["Probe", "Syscall", "EROFS", "Remote", .product(name: "SystemPackage", package: "swift-system"),
                           .product(name: "Crypto", package: "swift-crypto")]
        ),
        .executableTarget(
            name: "ErofsCompatCLI",
            dependencies: [
                "Probe", "EROFS", "Runtime", "Installer",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            path: "Sources/erofs-compat"
        ),
        .executableTarget(name: "Bench", dependencies: ["Probe", "Runtime", "Syscall"], path: "Sources/Bench"),
        .target(name: "TestSupport", dependencies: ["Syscall", "EROFS", .product(name: "Crypto", package: "swift-crypto")], path: "Tests/TestSupport"),
        .testTarget(name: "SyscallTests", dependencies: ["Syscall", "TestSupport", .product(name: "SystemPackage", package: "swift-system")]),
        .testTarget(name: "EROFSTests", dependencies: ["EROFS", "TestSupport"]),
        .testTarget(name: "ProbeTests", dependencies: ["Probe", "EROFS", "Syscall", "TestSupport", .product(name: "SystemPackage", package: "swift-system")]),
        .testTarget(name: "RemoteTests", dependencies: ["Remote", "EROFS", "Syscall", "TestSupport"]),
        .testTarget(name: "RuntimeTests", dependencies: ["Runtime", "Probe", "EROFS", "Syscall", "TestSupport"]),
        .testTarget(name: "CLITests", dependencies: ["TestSupport"]),
        .testTarget(name: "InstallerTests", dependencies: ["Installer", "TestSupport"]),
    ],
    swiftLanguageModes: [.v5]
)
