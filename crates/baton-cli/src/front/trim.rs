//! The front's heap goes back to the kernel once its clients are gone.
//!
//! Under load the front allocates per connection (hyper's buffers, the
//! tasks) and frees it all when the connections close, but glibc keeps what
//! was freed for reuse: the supervisor's resident memory would stay at its
//! peak for ever. When the last client connection has closed and none came
//! for [`QUIET`], the front asks the allocator to release its free memory
//! (`malloc_trim`), once per busy period.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Front;

/// How long the front must have had no client connection before it trims.
pub const QUIET: Duration = Duration::from_secs(2);

/// Spawn the task that trims after each busy period (on the current
/// runtime; it ends with the runtime).
pub fn spawn(front: Front) {
    tokio::spawn(async move {
        let live = &front.inner.live;
        let connections = &front.inner.counters.connections;
        let mut trimmed_at = connections.load(Ordering::Relaxed);
        loop {
            let closing = live.closing();
            tokio::pin!(closing);
            closing.as_mut().enable();
            if live.count() == 0 && connections.load(Ordering::Relaxed) != trimmed_at {
                tokio::time::sleep(QUIET).await;
                if live.count() == 0 {
                    trimmed_at = connections.load(Ordering::Relaxed);
                    let released = baton_sys::process::release_free_heap();
                    tracing::debug!(
                        released,
                        "front: no client connection: free heap given back"
                    );
                }
                continue;
            }
            closing.await;
        }
    });
}
