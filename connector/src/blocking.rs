//! Synchronous work on the async runtimes: an fsync (the ledger, the audit
//! log), a policy check over a large plan, optimising a plan, a long
//! function call.

/// Runs synchronous work (an fsync, optimising a plan, a long function
/// call) so that it does not hold a runtime worker: on the multi-threaded
/// query runtime, the worker's other tasks move to another thread first
/// (`block_in_place`), so other tenants' planning and execution go on.
/// Elsewhere (a current-thread runtime in tests, no runtime) it just runs.
pub fn blocking<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// [`blocking`] for a future whose polls do long synchronous work (SQL
/// planning): on the multi-threaded runtime it runs to completion on the
/// current thread after the worker's other tasks moved elsewhere.
pub async fn blocking_async<F: std::future::Future>(work: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(work))
        }
        _ => work.await,
    }
}
