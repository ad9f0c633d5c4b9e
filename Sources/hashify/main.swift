import ArgumentParser

#if canImport(Glibc)
import Glibc
#endif

// Entry point: argument errors exit with 2, not ArgumentParser's 64.
do {
    var command = try Hashify.parseAsRoot()
    try command.run()
} catch {
    let code = Hashify.exitCode(for: error)
    if code == .success {
        Hashify.exit(withError: error)
    }
    if error is ExitCode { Hashify.exit(withError: error) }
    printError(Hashify.fullMessage(for: error))
    exit(2)
}
