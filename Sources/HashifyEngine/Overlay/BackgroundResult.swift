import Dispatch

/// A value computed on another thread while the caller goes on (the fold
/// reads its old upper layer's protection flags while it builds): `value()`
/// waits for it and rethrows what the work threw.
final class BackgroundResult<Value>: @unchecked Sendable {
    private let done = DispatchGroup()
    // Written once by the work before `done` is left; read only after waiting on `done`.
    private var result: Result<Value, any Error>?

    init(_ work: @escaping @Sendable () throws -> Value) {
        done.enter()
        DispatchQueue.global().async { [self] in
            result = Result(catching: work)
            done.leave()
        }
    }

    /// Waits for the work to end; its value, or what it threw.
    func value() throws -> Value {
        done.wait()
        return try result!.get()
    }
}
