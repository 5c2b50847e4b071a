//! The connection I/O wrapper hyper sees.
//!
//! It does three things hyper cannot tell us:
//! * replays bytes read earlier (a handed-over connection's prefix, or the
//!   bytes read to sniff the HTTP/2 preface) before reading the socket;
//! * records whether hyper's write buffer is known to be flushed (`dirty`):
//!   set on every write attempt, cleared when `poll_flush` succeeds — hyper
//!   only flushes the socket after its own buffer is empty;
//! * records whether hyper's latest read found nothing (`read_blocked`):
//!   the connection is waiting for the client.
//!
//! It also holds a task-tracker token, so an upgraded connection (WebSocket)
//! keeps the draining generation alive until it closes, and it records when
//! the connection last moved a byte (a TLS connection is closed only after
//! it has been quiet for a while).
//!
//! The transport is a plain [`Stream`] (which can be handed over) or, with
//! the `tls` feature, a TLS stream over one (which cannot).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use baton::{Phase, Stream};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the connection task needs to see while hyper owns the I/O.
#[derive(Debug)]
pub(crate) struct IoFlags {
    dirty: AtomicBool,
    read_blocked: AtomicBool,
    /// Milliseconds since [`clock_base`] when a byte last moved either way
    /// (kept only when `track` is set: TLS connections need it, plain ones
    /// would pay a clock read per I/O for nothing).
    last_activity_ms: AtomicU64,
    track: AtomicBool,
}

impl Default for IoFlags {
    fn default() -> Self {
        IoFlags {
            dirty: AtomicBool::new(false),
            read_blocked: AtomicBool::new(false),
            last_activity_ms: AtomicU64::new(clock_ms()),
            track: AtomicBool::new(false),
        }
    }
}

/// A process-wide monotonic origin for [`IoFlags::last_activity_ms`].
fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn clock_ms() -> u64 {
    clock_base().elapsed().as_millis() as u64
}

impl IoFlags {
    /// hyper flushed everything it wrote and its last read found nothing:
    /// it is waiting for the client.
    pub(crate) fn waiting_for_client(&self) -> bool {
        !self.dirty.load(Ordering::Relaxed) && self.read_blocked.load(Ordering::Relaxed)
    }

    /// How long since a byte last moved on this connection.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn quiet_for(&self) -> Duration {
        let last = self.last_activity_ms.load(Ordering::Relaxed);
        Duration::from_millis(clock_ms().saturating_sub(last))
    }

    fn touch(&self) {
        if self.track.load(Ordering::Relaxed) {
            self.last_activity_ms.store(clock_ms(), Ordering::Relaxed);
        }
    }

    /// Start keeping the last-activity clock.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn track_activity(&self) {
        self.last_activity_ms.store(clock_ms(), Ordering::Relaxed);
        self.track.store(true, Ordering::Relaxed);
    }
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct ConnIo<T = Stream> {
    stream: T,
    replay: BytesMut,
    flags: Arc<IoFlags>,
    /// While the generation is quiesced (exact state snapshot) reads are
    /// held: no new request starts. The connection task re-polls on every
    /// phase change. Asked at every read: the lock-free copy of the phase.
    phase: baton::PhaseCell,
    _token: baton::ConnectionToken,
}

impl<T> ConnIo<T> {
    pub(crate) fn new(stream: T, prefix: Bytes, baton: &baton::Baton) -> Self {
        let (token, phase) = (baton.connection_token(), baton.phase_cell());
        ConnIo {
            stream,
            replay: BytesMut::from(&prefix[..]),
            flags: Arc::new(IoFlags::default()),
            phase,
            _token: token,
        }
    }

    /// Reads are held (exact state snapshot in progress).
    pub(crate) fn reads_held(&self) -> bool {
        self.phase.get() == Phase::Quiesced
    }

    /// The flags, to read while hyper owns this I/O.
    pub(crate) fn flags(&self) -> Arc<IoFlags> {
        Arc::clone(&self.flags)
    }

    /// Bytes waiting to be replayed.
    pub(crate) fn replay(&self) -> &[u8] {
        &self.replay
    }

    /// Take the transport and every byte read but not consumed: `before`
    /// (what hyper had buffered) followed by whatever was never replayed.
    pub(crate) fn into_parts(self, before: Bytes) -> (T, Vec<u8>) {
        let mut prefix = Vec::with_capacity(before.len() + self.replay.len());
        prefix.extend_from_slice(&before);
        prefix.extend_from_slice(&self.replay);
        (self.stream, prefix)
    }

    /// Put bytes back in front of the replay buffer (what hyper had read
    /// when the connection was detached and then kept).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn put_back(&mut self, before: &[u8]) {
        if !before.is_empty() {
            let mut r = BytesMut::from(before);
            r.extend_from_slice(&self.replay);
            self.replay = r;
        }
    }

    /// The transport.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn get_mut(&mut self) -> &mut T {
        &mut self.stream
    }
}

impl ConnIo<Stream> {
    /// Read more from the socket into the replay buffer (for sniffing).
    /// Returns the number of bytes read (0 = EOF).
    pub(crate) async fn fill(&mut self) -> io::Result<usize> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        let n = self.stream.read(&mut buf).await?;
        self.replay.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reads_held() {
            this.flags.read_blocked.store(true, Ordering::Relaxed);
            return Poll::Pending;
        }
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            this.flags.read_blocked.store(false, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => {
                this.flags.read_blocked.store(true, Ordering::Relaxed);
                Poll::Pending
            }
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.flags.read_blocked.store(false, Ordering::Relaxed);
                    this.flags.touch();
                }
                Poll::Ready(r)
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flags.dirty.store(true, Ordering::Relaxed);
        this.flags.touch();
        Pin::new(&mut this.stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flags.dirty.store(true, Ordering::Relaxed);
        this.flags.touch();
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_flush(cx);
        // Not activity: hyper flushes on every poll, busy or not.
        if matches!(r, Poll::Ready(Ok(()))) {
            this.flags.dirty.store(false, Ordering::Relaxed);
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
