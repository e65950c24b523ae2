// swift-tools-version:6.0
import PackageDescription

/// A Debian C library's headers (its -dev package, named for `swift build` to suggest). The library
/// itself is not linked: CHeaders/shim.c dlopens it by SONAME the first time one of its functions is
/// called, so a command that needs none of them (a mount handed to the daemon, status, umount) does
/// not load libcurl and its ~30 dependencies or the others at start — most of a cold start's time.
/// (pkg-config is not named: it would add -l flags, and the headers are on the default include path.)
func systemHeaders(_ name: String, dir: String, apt: String) -> Target {
    .systemLibrary(name: name, path: "Sources/CHeaders/system/\(dir)", providers: [.apt([apt])])
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
        systemHeaders("CKmod", dir: "kmod", apt: "libkmod-dev"),
        systemHeaders("CBlkid", dir: "blkid", apt: "libblkid-dev"),
        systemHeaders("CCurl", dir: "curl", apt: "libcurl4-openssl-dev"),
        systemHeaders("CFuse3", dir: "fuse3", apt: "libfuse3-dev"),
        systemHeaders("CLz4", dir: "lz4", apt: "liblz4-dev"),
        systemHeaders("CLzma", dir: "lzma", apt: "liblzma-dev"),
        systemHeaders("CZstd", dir: "zstd", apt: "libzstd-dev"),
        systemHeaders("CZlib", dir: "zlib", apt: "zlib1g-dev"),
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
        .target(name: "NBD", dependencies: ["Syscall"]),
        // The FUSE wire protocol and session (testable without /dev/fuse) and its server loop.
        .target(name: "FUSE", dependencies: ["Syscall"], swiftSettings: [.swiftLanguageMode(.v6)]),
        .target(
            name: "Runtime",
            dependencies: ["Probe", "Syscall", "EROFS", "Remote", "NBD", "FUSE", .product(name: "SystemPackage", package: "swift-system"),
                           .product(name: "Crypto", package: "swift-crypto")],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "ErofsCompatCLI",
            dependencies: [
                "Probe", "EROFS", "Runtime", "Installer", "Syscall", "NBD", "Remote", "FUSE",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            path: "Sources/erofs-compat"
        ),
        .executableTarget(name: "Bench", dependencies: ["EROFS", "Probe", "Runtime", "Syscall", .product(name: "SystemPackage", package: "swift-system")], path: "Sources/Bench"),
        .target(name: "TestSupport", dependencies: ["Syscall", "EROFS", .product(name: "Crypto", package: "swift-crypto")], path: "Tests/TestSupport"),
        .testTarget(name: "SyscallTests", dependencies: ["Syscall", "TestSupport", .product(name: "SystemPackage", package: "swift-system")]),
        .testTarget(name: "EROFSTests", dependencies: ["EROFS", "TestSupport"]),
        .testTarget(name: "ProbeTests", dependencies: ["Probe", "EROFS", "Syscall", "TestSupport", .product(name: "SystemPackage", package: "swift-system")]),
        .testTarget(name: "RemoteTests", dependencies: ["Remote", "EROFS", "Syscall", "TestSupport"]),
        .testTarget(name: "RuntimeTests", dependencies: ["Runtime", "Probe", "EROFS", "Syscall", "Remote", "TestSupport"]),
        .testTarget(name: "CLITests", dependencies: ["TestSupport"]),
        .testTarget(name: "InstallerTests", dependencies: ["Installer", "TestSupport"]),
        .testTarget(name: "NBDTests", dependencies: ["NBD", "Syscall", "TestSupport"]),
        .testTarget(name: "FUSETests", dependencies: ["FUSE", "TestSupport"]),
    ],
    swiftLanguageModes: [.v5]
)
