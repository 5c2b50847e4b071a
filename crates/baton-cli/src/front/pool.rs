//! Upstream connections to one listener's generation sockets, pooled per
//! epoch: a connection is reused only within the epoch it was opened in,
//! and the supervisor can wait until every connection of the earlier epochs
//! is idle before it stops the old generation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

/// The body baton sends upstream: the client's (cut at `--front-max-body`),
/// or an empty one when an idempotent request without a body is sent again.
pub type UpBody = http_body_util::Either<super::limits::Capped, http_body_util::Empty<Bytes>>;

/// The pool of one listener (cheap to clone).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    addr: SocketAddr,
    idle_limit: Duration,
    state: Mutex<State>,
    /// Woken when a connection of any epoch stops being busy.
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Connections between requests, newest last.
    idle: Vec<Idle>,
    /// Busy connections per epoch.
    busy: BTreeMap<u64, usize>,
    /// Connections of an earlier epoch are never reused.
    current: u64,
}

struct Idle {
    epoch: u64,
    since: Instant,
    sender: SendRequest<UpBody>,
}

/// A connection lent to one request. Give it back with [`Lease::release`]
/// once the response head arrived; dropped, it is closed.
pub struct Lease {
    busy: Busy,
    /// Whether the connection was reused (a reused connection may have been
    /// closed by the app in the meantime).
    pub reused: bool,
    pub sender: SendRequest<UpBody>,
}

/// One busy count of an epoch, given back exactly once: by
/// [`Busy::finish`], or on drop (a request whose client went away while
/// baton connected or waited for the answer).
struct Busy {
    pool: Pool,
    epoch: u64,
    finished: bool,
}

impl Busy {
    fn finish(mut self, sender: Option<SendRequest<UpBody>>) {
        self.finished = true;
        self.pool.done(self.epoch, sender);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if !self.finished {
            self.pool.done(self.epoch, None);
        }
    }
}

impl Pool {
    /// A pool of connections to `addr`.
    pub fn new(addr: SocketAddr, idle_limit: Duration) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                addr,
                idle_limit,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain counters behind:
        // still usable.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection of `epoch`: an idle one, or a new one.
    ///
    /// # Errors
    ///
    /// The connect or the HTTP/1 handshake failed (nothing was sent).
    pub async fn checkout(&self, epoch: u64) -> std::io::Result<Lease> {
        let reused = {
            let mut st = self.state();
            let limit = self.inner.idle_limit;
            // Closed and expired connections go; one of a later epoch (the
            // supervisor switched since this request read the epoch) stays
            // for the requests of its own.
            st.idle
                .retain(|c| !c.sender.is_closed() && c.since.elapsed() < limit);
            let found = st
                .idle
                .iter()
                .rposition(|c| c.epoch == epoch && c.sender.is_ready())
                .map(|i| st.idle.remove(i).sender);
            // Counted busy from now, a new connection too: the supervisor
            // must not stop a generation while a connection to it is being
            // opened for a request.
            *st.busy.entry(epoch).or_default() += 1;
            found
        };
        let busy = Busy {
            pool: self.clone(),
            epoch,
            finished: false,
        };
        if let Some(sender) = reused {
            return Ok(Lease {
                busy,
                reused: true,
                sender,
            });
        }
        // On an error or a cancel, `busy` gives its count back as it drops.
        let sender = self.connect().await?;
        Ok(Lease {
            busy,
            reused: false,
            sender,
        })
    }

    async fn connect(&self) -> std::io::Result<SendRequest<UpBody>> {
        let stream = tokio::net::TcpStream::connect(self.inner.addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        // With upgrades: a `101` hands the connection to a tunnel.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "front: upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Later requests use connections of `epoch` or later only; idle
    /// connections of earlier epochs are closed now.
    pub fn retire_before(&self, epoch: u64) {
        let mut st = self.state();
        st.current = epoch;
        st.idle.retain(|c| c.epoch >= epoch);
    }

    /// Wait until no connection of an epoch before the current one is busy,
    /// or `deadline`. Returns whether they are all idle (and closed).
    pub async fn wait_retired_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.state();
                let cur = st.current;
                if st.busy.range(..cur).all(|(_, n)| *n == 0) {
                    return true;
                }
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Connections carrying a request now, every epoch.
    pub fn busy(&self) -> usize {
        self.state().busy.values().sum()
    }

    fn done(&self, epoch: u64, sender: Option<SendRequest<UpBody>>) {
        let mut st = self.state();
        if let Some(n) = st.busy.get_mut(&epoch) {
            *n = n.saturating_sub(1);
            if *n == 0 && epoch < st.current {
                st.busy.remove(&epoch);
            }
        }
        if let Some(sender) = sender
            && epoch >= st.current
        {
            st.idle.push(Idle {
                epoch,
                since: Instant::now(),
                sender,
            });
        }
        drop(st);
        self.inner.changed.notify_waiters();
    }
}

impl Lease {
    /// The epoch the connection belongs to.
    pub fn epoch(&self) -> u64 {
        self.busy.epoch
    }

    /// The response head arrived: the connection goes back to the pool once
    /// the response body is read (hyper says so by being ready again), or
    /// is closed if it fails meanwhile or its epoch ended.
    pub fn release(self) {
        let Lease {
            busy, mut sender, ..
        } = self;
        tokio::spawn(async move {
            match sender.ready().await {
                Ok(()) => busy.finish(Some(sender)),
                Err(_) => busy.finish(None),
            }
        });
    }

    /// The request failed: the connection is closed.
    pub fn discard(self) {
        self.busy.finish(None);
    }
}
