//! The front's heap goes back to the kernel once its clients are gone.
//!
//! Under load the front allocates per connection (hyper's buffers, the
//! tasks) and frees it all when the connections close, but glibc keeps what
//! was freed for reuse: the supervisor's resident memory would stay at its
//! peak for ever. Once no client connection has been open, and none opened,
//! for a quiet period — long enough for the pool's sweeper to have closed
//! the idle upstream connections too — the front asks the allocator to
//! release its free memory (`malloc_trim`), once per busy period.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Front;

/// The shortest quiet period before a trim.
pub const QUIET: Duration = Duration::from_secs(2);

/// Spawn the task that trims after each busy period (on the current
/// runtime; it ends with the runtime). `upstream_idle`: the pool's idle
/// limit (the quiet period outlasts it).
pub fn spawn(front: Front, upstream_idle: Duration) {
    let quiet = QUIET.max(upstream_idle + Duration::from_millis(500));
    tokio::spawn(async move {
        let live = &front.inner.live;
        let opened = &front.inner.counters.connections;
        let mut trimmed_at = opened.load(Ordering::Relaxed);
        loop {
            let closing = live.closing();
            tokio::pin!(closing);
            closing.as_mut().enable();
            let seen = opened.load(Ordering::Relaxed);
            if live.count() == 0 && seen != trimmed_at {
                tokio::time::sleep(quiet).await;
                // None open and none opened meanwhile: quiet all along.
                if live.count() == 0 && opened.load(Ordering::Relaxed) == seen {
                    trimmed_at = seen;
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
