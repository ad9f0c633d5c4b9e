// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "hashify",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "hashify", targets: ["hashify"]),
        .library(name: "HashifyEngine", targets: ["HashifyEngine"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
    ],
    targets: [
        // Thin C layer for the Linux calls Glibc's Swift overlay does not expose.
        .target(name: "CHashifyShim"),
        // Syscall wrappers: dirfd-relative, EINTR-safe, throwing Errno.
        .target(
            name: "HashifySystem",
            dependencies: [
                "CHashifyShim",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // EROFS images: a tree described in memory, written as an image, read back.
        .target(
            name: "ErofsImage",
            dependencies: ["HashifySystem"]
        ),
        // The engine: walk, plan, hash, store, link, report.
        .target(
            name: "HashifyEngine",
            dependencies: [
                "ErofsImage",
                "HashifySystem",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "TOMLKit", package: "TOMLKit"),
            ]
        ),
        // The command line: a thin layer over HashifyEngine.
        .executableTarget(
            name: "hashify",
            dependencies: [
                "HashifyEngine",
                "HashifySystem",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "HashifyTests",
            dependencies: [
                "ErofsImage", "HashifyEngine", "HashifySystem", "CHashifyShim",
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
