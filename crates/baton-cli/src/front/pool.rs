//! Upstream connections to one listener's generation sockets, pooled per
//! epoch: a connection is reused only within the epoch it was opened in,
//! and the supervisor can wait until every connection of the earlier epochs
//! is idle before it stops the old generation.

use std::collections::{BTreeMap, VecDeque};
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

/// The shortest time between two sweeps of the expired idle connections.
const SWEEP_MIN: Duration = Duration::from_millis(100);

/// Where a pool connects: the generations' shared loopback TCP address
/// (the kernel's steering picks the generation), or with `--front-upstream
/// unix` the serving generation's own Unix socket path, read at each
/// connect (the supervisor's steering sets it).
#[derive(Debug, Clone)]
pub enum Target {
    /// Loopback TCP.
    Tcp(SocketAddr),
    /// A Unix stream socket.
    Unix(crate::supervisor::UnixRoute),
}

/// The pool of one listener (cheap to clone).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    target: Target,
    idle_limit: Duration,
    state: Mutex<State>,
    /// Woken when a connection of any epoch stops being busy.
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Connections between requests, oldest first (their `since` in
    /// order): the newest is taken, the expired ones go from the front.
    idle: VecDeque<Idle>,
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
/// once the response body ended (`proxy::Upstream` does); dropped, it is
/// closed.
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
    /// A pool of connections to `target`.
    pub fn new(target: Target, idle_limit: Duration) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                target,
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
        let mut idle = {
            let mut st = self.state();
            // Counted busy from now, a new connection too: the supervisor
            // must not stop a generation while a connection to it is being
            // opened for a request.
            *st.busy.entry(epoch).or_default() += 1;
            self.take_idle(&mut st, epoch)
        };
        let busy = Busy {
            pool: self.clone(),
            epoch,
            finished: false,
        };
        // One that closed meanwhile is dropped, and the next tried.
        while let Some(mut sender) = idle {
            if std::future::poll_fn(|cx| sender.poll_ready(cx))
                .await
                .is_ok()
            {
                return Ok(Lease {
                    busy,
                    reused: true,
                    sender,
                });
            }
            idle = self.take_idle(&mut self.state(), epoch);
        }
        // On an error or a cancel, `busy` gives its count back as it drops.
        let sender = self.connect().await?;
        Ok(Lease {
            busy,
            reused: false,
            sender,
        })
    }

    /// The newest idle connection of `epoch` that is not closed.
    fn take_idle(&self, st: &mut State, epoch: u64) -> Option<SendRequest<UpBody>> {
        // Only the ends of the queue are looked at (this runs for every
        // request): the expired connections at the front go, and the newest
        // of this epoch is taken; a closed one on the way is dropped.
        // Connections of a later epoch (the supervisor switched since this
        // request read the epoch) stay for the requests of their own.
        self.drop_expired(st);
        while let Some(i) = st.idle.iter().rposition(|c| c.epoch == epoch) {
            let c = st.idle.remove(i)?;
            if !c.sender.is_closed() {
                return Some(c.sender);
            }
        }
        None
    }

    async fn connect(&self) -> std::io::Result<SendRequest<UpBody>> {
        match &self.inner.target {
            Target::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                handshake(stream).await
            }
            Target::Unix(route) => {
                let path = route.current();
                let stream = tokio::net::UnixStream::connect(&path).await?;
                handshake(stream).await
            }
        }
    }

    /// Close the idle connections past the idle limit; returns when the
    /// next one expires (`None`: none is idle).
    fn sweep(&self) -> Option<Instant> {
        let mut st = self.state();
        self.drop_expired(&mut st);
        st.idle.front().map(|c| c.since + self.inner.idle_limit)
    }

    /// Close the idle connections at the front of the queue that are past
    /// the idle limit (the queue is in idle order).
    fn drop_expired(&self, st: &mut State) {
        let limit = self.inner.idle_limit;
        let now = Instant::now();
        while st
            .idle
            .front()
            .is_some_and(|c| now.saturating_duration_since(c.since) >= limit)
        {
            st.idle.pop_front();
        }
    }

    /// Start the task that closes idle connections as they pass the idle
    /// limit, so that after a burst baton does not hold them (and the app
    /// its side of them) until the next request: without it, an expired
    /// connection goes only when a checkout passes it. It sleeps while no
    /// connection is idle, and wakes at most every [`SWEEP_MIN`].
    pub fn spawn_sweeper(&self) {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                let changed = pool.inner.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                match pool.sweep() {
                    Some(next) => {
                        let at = next.max(Instant::now() + SWEEP_MIN);
                        tokio::time::sleep_until(at.into()).await;
                    }
                    None => changed.await,
                }
            }
        });
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
            st.idle.push_back(Idle {
                epoch,
                since: Instant::now(),
                sender,
            });
        }
        drop(st);
        self.inner.changed.notify_waiters();
    }
}

/// HTTP/1 over a fresh upstream connection; its driver task is spawned.
async fn handshake<S>(stream: S) -> std::io::Result<SendRequest<UpBody>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // `writev(false)`: the head and a small body are copied into one
    // buffer and sent with one `write`; cheaper per request than a
    // vectored write of the pieces (measured), a copy for large bodies.
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
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

impl Lease {
    /// The epoch the connection belongs to.
    pub fn epoch(&self) -> u64 {
        self.busy.epoch
    }

    /// The response ended (its body read to the end): the connection goes
    /// back to the pool, or is closed if its epoch ended. It is ready again
    /// by then, unless hyper is still busy on it (a request body still
    /// being sent after an early answer): then a task waits until it is,
    /// and the connection stays busy meanwhile.
    pub fn release(self) {
        let Lease {
            busy, mut sender, ..
        } = self;
        if sender.is_ready() {
            busy.finish(Some(sender));
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback HTTP/1.1 server answering `200 ok` to every request head;
    /// counts the connections it accepted. Ends with the test's runtime.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        let (addr, accepted, _) = server_seeing_closes().await;
        (addr, accepted)
    }

    /// [`server`], also counting the connections the client closed.
    async fn server_seeing_closes() -> (
        SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::watch::Receiver<usize>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = Arc::clone(&accepted);
        let (closed_tx, closed) = tokio::sync::watch::channel(0usize);
        let closed_tx = Arc::new(closed_tx);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let closed_tx = Arc::clone(&closed_tx);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(k) = s.read(&mut chunk).await {
                        if k == 0 {
                            closed_tx.send_modify(|c| *c += 1);
                            return;
                        }
                        buf.extend_from_slice(&chunk[..k]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted, closed)
    }

    /// A GET sent on a connection of `epoch`: its lease and the response.
    async fn send_get(pool: &Pool, epoch: u64) -> (Lease, hyper::Response<hyper::body::Incoming>) {
        let mut lease = pool.checkout(epoch).await.unwrap();
        let req = hyper::Request::builder()
            .uri("/")
            .header("host", "x")
            .body(http_body_util::Either::Right(http_body_util::Empty::new()))
            .unwrap();
        let resp = lease
            .sender
            .try_send_request(req)
            .await
            .map_err(|e| e.into_error())
            .unwrap();
        (lease, resp)
    }

    /// One GET on a connection of `epoch`; returns whether it was reused.
    async fn get(pool: &Pool, epoch: u64) -> bool {
        let (lease, resp) = send_get(pool, epoch).await;
        let reused = lease.reused;
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        // Back in the pool once the body ended (as proxy.rs does).
        lease.release();
        tokio::time::timeout(Duration::from_secs(10), async {
            while pool.busy() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        reused
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_within_the_idle_limit_and_its_epoch_only() {
        let (addr, accepted) = server().await;
        let pool = Pool::new(Target::Tcp(addr), Duration::from_secs(60));
        assert!(!get(&pool, 0).await);
        assert!(get(&pool, 0).await);
        assert!(get(&pool, 0).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A new epoch: the old connection is not used again.
        pool.retire_before(1);
        assert!(!get(&pool, 1).await);
        assert!(get(&pool, 1).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A request that read the old epoch before the switch does not
        // take the new epoch's connection (its connection is not kept).
        assert!(!get(&pool, 0).await);
        assert!(get(&pool, 1).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_idle_connection_past_the_idle_limit_is_never_reused() {
        let (addr, accepted) = server().await;
        // Every idle connection is past a zero limit the moment it is idle.
        let pool = Pool::new(Target::Tcp(addr), Duration::ZERO);
        for _ in 0..3 {
            assert!(!get(&pool, 0).await);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert!(
            pool.state().idle.len() <= 1,
            "expired connections are dropped"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_once_past_the_idle_limit_without_a_request() {
        let (addr, accepted, mut closed) = server_seeing_closes().await;
        let pool = Pool::new(Target::Tcp(addr), Duration::from_millis(200));
        pool.spawn_sweeper();
        assert!(!get(&pool, 0).await);
        tokio::time::timeout(
            Duration::from_secs(10),
            closed.wait_for(|c| *c == accepted.load(Ordering::SeqCst)),
        )
        .await
        .expect("the idle connection is closed by the sweeper")
        .unwrap();
        assert!(pool.state().idle.is_empty());
    }

    /// A response whose body is read to its end gives its connection back
    /// (no task waits for it); one dropped before its end closes it (fails
    /// with `Upstream`'s drop giving every connection back, and with its
    /// drop closing every one and the end of the body not noticed).
    #[tokio::test]
    async fn a_connection_goes_back_when_the_response_body_ends_and_not_before() {
        use super::super::proxy::Upstream;
        let (addr, accepted) = server().await;
        let pool = Pool::new(Target::Tcp(addr), Duration::from_secs(60));
        let send = |pool: Pool| async move {
            let (lease, resp) = send_get(&pool, 0).await;
            (lease.reused, Upstream::new(resp.into_body(), Some(lease)))
        };
        let (_, body) = send(pool.clone()).await;
        assert_eq!(pool.busy(), 1);
        let got = http_body_util::BodyExt::collect(body).await.unwrap();
        assert_eq!(got.to_bytes(), "ok");
        assert_eq!(pool.busy(), 0, "given back as the body ended");
        let (reused, body) = send(pool.clone()).await;
        assert!(reused);
        drop(body);
        assert_eq!(pool.busy(), 0);
        let (reused, _body) = send(pool.clone()).await;
        assert!(
            !reused,
            "a body dropped before its end closes its connection"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
