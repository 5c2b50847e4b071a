//! WebSockets that move to the next generation at a message boundary.
//!
//! An [`Endpoint`] accepts WebSocket upgrades (RFC 6455) on a hyper route
//! and runs the application's handler for each connection — the ones it
//! accepted, and the ones the previous generation handed over. The handler
//! loops on [`WebSocket::recv`]; when this generation hands over and the
//! successor takes the endpoint's kind, `recv` returns [`WsEvent::Move`] at
//! the next message boundary, and the handler passes its own state for the
//! connection to [`WebSocket::hand_over`]. In the successor the same handler
//! gets the connection back with [`WebSocket::moved_state`].
//!
//! A message boundary here means: no fragmented message half received, no
//! close handshake under way, every write flushed (each `send` flushes).
//! Bytes of the next frame already read travel with the connection, so no
//! message is lost, duplicated or reordered. Frames are parsed and written
//! with tungstenite's frame codec; no extension is negotiated
//! (`permessage-deflate` state could not move with the socket).
//!
//! What cannot move — a TLS connection, a successor that does not take the
//! kind or refused the batch — stays here and is closed with code 1012
//! (Service Restart) at the drain deadline; on a plain stop (no successor)
//! it is closed at once with 1001 (Going Away). Never a bare TCP cut.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use baton::{Baton, OwnedConn, OwnedGuard, Phase, Stream};
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::{Frame, FrameHeader};

use crate::io::ConnIo;

/// Largest message (and frame) an endpoint accepts by default.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;
/// How long a closing connection waits for the client's close frame.
pub const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest application state that moves with one WebSocket (baton's 4 KiB
/// bound less this module's two-byte header).
pub const MAX_WS_STATE: usize = baton::protocol::MAX_OWNED_STATE - STATE_HEADER.len();

/// The header of the state blob a WebSocket moves with: a tag and this
/// module's format version. A successor that reads another version
/// refuses the batch (the connections stay and close with 1012).
const STATE_HEADER: [u8; 2] = [b'W', 1];

/// Close codes used here (RFC 6455 §7.4.1, IANA registry).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_TOO_BIG: u16 = 1009;
/// Service Restart: the server is restarting; the client may reconnect.
pub const CLOSE_SERVICE_RESTART: u16 = 1012;

/// What [`WebSocket::recv`] returns.
#[derive(Debug)]
pub enum WsEvent {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Bytes),
    /// This generation hands over and the successor takes this kind: the
    /// connection is at a message boundary; call
    /// [`hand_over`](WebSocket::hand_over) with its state.
    Move,
    /// The connection is closed (by the client, an error, or by this side:
    /// 1012 at the drain deadline, 1001 on a stop). The code, if any.
    Closed(Option<u16>),
}

/// The socket under a WebSocket: a plain one can move, anything else (a
/// TLS stream inside hyper's `Upgraded`) cannot.
enum Transport {
    Plain(Stream),
    Other(TokioIo<Upgraded>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, data),
            Transport::Other(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One server-side WebSocket connection. See the [module docs](self).
pub struct WebSocket {
    io: Transport,
    /// Bytes read and not yet parsed into a frame.
    buf: BytesMut,
    /// A fragmented message being received: its opcode and bytes so far.
    partial: Option<(Data, Vec<u8>)>,
    baton: Baton,
    kind: Arc<str>,
    listener: String,
    max_message: usize,
    moved_state: Option<Vec<u8>>,
    /// Offered to the successor once and refused: stays here.
    may_move: bool,
    /// Cancelled by the drain deadline's close callback.
    close_now: CancellationToken,
    guard: Option<OwnedGuard>,
}

impl std::fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("kind", &self.kind)
            .field("moved", &self.moved_state.is_some())
            .finish_non_exhaustive()
    }
}

impl WebSocket {
    fn new(
        shared: &EndpointShared,
        io: Transport,
        unread: &[u8],
        listener: String,
        moved_state: Option<Vec<u8>>,
    ) -> Self {
        let close_now = CancellationToken::new();
        let cancel = close_now.clone();
        let guard = match io {
            Transport::Plain(_) => shared.baton.owned_guard(move || cancel.cancel()),
            // The I/O inside hyper's Upgraded still holds its connection's
            // token: count it once.
            Transport::Other(_) => shared.baton.owned_close_callback(move || cancel.cancel()),
        };
        WebSocket {
            io,
            buf: BytesMut::from(unread),
            partial: None,
            baton: shared.baton.clone(),
            kind: Arc::clone(&shared.kind),
            listener,
            max_message: shared.max_message,
            moved_state,
            may_move: true,
            close_now,
            guard: Some(guard),
        }
    }

    /// The state the previous generation handed over with this connection
    /// (`None` for a connection accepted by this generation).
    pub fn moved_state(&self) -> Option<&[u8]> {
        self.moved_state.as_deref()
    }

    /// Whether this connection can ever move (a plain socket; not TLS).
    pub fn can_move(&self) -> bool {
        matches!(self.io, Transport::Plain(_))
    }

    /// The next message or event. Answers pings and the client's close
    /// itself.
    ///
    /// # Cancel safety
    /// Cancel safe between messages: bytes read stay buffered.
    pub async fn recv(&mut self) -> WsEvent {
        let mut phase = self.baton.drain_signal();
        loop {
            match self.next_frame() {
                Err(code) => return self.close_with(code, "").await,
                Ok(Some(frame)) => match self.on_frame(frame).await {
                    Ok(Some(ev)) => return ev,
                    Ok(None) => continue,
                    Err(code) => return self.close_with(code, "").await,
                },
                Ok(None) => {}
            }
            // The drain deadline came (the guard's close callback).
            if self.close_now.is_cancelled() {
                return self
                    .close_with(CLOSE_SERVICE_RESTART, "service restart")
                    .await;
            }
            // At a message boundary: nothing half received, every write
            // flushed (send flushes), no close under way.
            if self.partial.is_none() {
                if self.may_move && self.can_move() && self.baton.takes_owned(&self.kind) {
                    return WsEvent::Move;
                }
                if matches!(phase.phase(), Phase::ShuttingDown) {
                    return self.close_with(CLOSE_GOING_AWAY, "server stopping").await;
                }
            }
            tokio::select! {
                n = self.io.read_buf(&mut self.buf) => match n {
                    Ok(0) | Err(_) => return WsEvent::Closed(None),
                    Ok(_) => {}
                },
                () = phase.changed() => {}
                () = self.close_now.cancelled() => {}
            }
        }
    }

    /// Parse one whole frame from the buffer, if there is one. `Err` is the
    /// close code for a protocol violation.
    fn next_frame(&mut self) -> Result<Option<Frame>, u16> {
        let mut cur = io::Cursor::new(&self.buf[..]);
        let Some((mut header, len)) = FrameHeader::parse(&mut cur).map_err(|_| CLOSE_PROTOCOL)?
        else {
            return Ok(None);
        };
        if len > self.max_message as u64 {
            return Err(CLOSE_TOO_BIG);
        }
        let head = cur.position() as usize;
        let len = len as usize;
        if self.buf.len() < head + len {
            return Ok(None);
        }
        // Clients mask every frame (RFC 6455 §5.3); extensions are never
        // negotiated here, so reserved bits are an error.
        let Some(mask) = header.mask.take() else {
            return Err(CLOSE_PROTOCOL);
        };
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(CLOSE_PROTOCOL);
        }
        // Control frames are whole and small (RFC 6455 §5.5).
        if matches!(header.opcode, OpCode::Control(_)) && (!header.is_final || len > 125) {
            return Err(CLOSE_PROTOCOL);
        }
        self.buf.advance(head);
        let mut payload = self.buf.split_to(len);
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
        Ok(Some(Frame::from_payload(header, payload.freeze())))
    }

    /// Act on one frame: a whole message is returned; control frames are
    /// answered here. `Err` is a close code.
    async fn on_frame(&mut self, frame: Frame) -> Result<Option<WsEvent>, u16> {
        let fin = frame.header().is_final;
        match frame.header().opcode {
            OpCode::Control(Control::Ping) => {
                self.write_frame(Frame::pong(frame.into_payload()))
                    .await
                    .map_err(|_| CLOSE_PROTOCOL)?;
                Ok(None)
            }
            OpCode::Control(Control::Pong) => Ok(None),
            OpCode::Control(Control::Close) => {
                let p = frame.payload();
                let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                // Echo the code (RFC 6455 §5.5.1), then end.
                let _ = self.write_close(code.unwrap_or(CLOSE_NORMAL), "").await;
                let _ = self.io.shutdown().await;
                Ok(Some(WsEvent::Closed(code)))
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(CLOSE_PROTOCOL)
            }
            OpCode::Data(Data::Continue) => {
                let Some((op, mut bytes)) = self.partial.take() else {
                    return Err(CLOSE_PROTOCOL);
                };
                if bytes.len() + frame.payload().len() > self.max_message {
                    return Err(CLOSE_TOO_BIG);
                }
                bytes.extend_from_slice(frame.payload());
                if fin {
                    Self::message(op, bytes).map(Some)
                } else {
                    self.partial = Some((op, bytes));
                    Ok(None)
                }
            }
            OpCode::Data(op) => {
                if self.partial.is_some() {
                    return Err(CLOSE_PROTOCOL);
                }
                if fin {
                    Self::message(op, frame.into_payload().to_vec()).map(Some)
                } else {
                    self.partial = Some((op, frame.into_payload().to_vec()));
                    Ok(None)
                }
            }
        }
    }

    fn message(op: Data, bytes: Vec<u8>) -> Result<WsEvent, u16> {
        match op {
            Data::Text => String::from_utf8(bytes)
                .map(WsEvent::Text)
                // 1007: invalid payload data.
                .map_err(|_| 1007),
            _ => Ok(WsEvent::Binary(Bytes::from(bytes))),
        }
    }

    async fn write_frame(&mut self, frame: Frame) -> io::Result<()> {
        let mut out = Vec::with_capacity(frame.len());
        frame.format(&mut out).map_err(io::Error::other)?;
        self.io.write_all(&out).await?;
        self.io.flush().await
    }

    async fn write_close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(120)]);
        let header = FrameHeader {
            opcode: OpCode::Control(Control::Close),
            ..FrameHeader::default()
        };
        self.write_frame(Frame::from_payload(header, payload.into()))
            .await
    }

    /// Send a text message (written and flushed before this returns).
    ///
    /// # Errors
    /// The connection failed.
    pub async fn send_text(&mut self, text: impl Into<String>) -> io::Result<()> {
        let t: String = text.into();
        self.write_frame(Frame::message(
            t.into_bytes(),
            OpCode::Data(Data::Text),
            true,
        ))
        .await
    }

    /// Send a binary message (written and flushed before this returns).
    ///
    /// # Errors
    /// The connection failed.
    pub async fn send_binary(&mut self, data: impl Into<Bytes>) -> io::Result<()> {
        self.write_frame(Frame::message(data, OpCode::Data(Data::Binary), true))
            .await
    }

    /// Close with `code`: send the close frame, wait (bounded) for the
    /// client's, shut the socket down. Returns `Closed(Some(code))`.
    pub async fn close_with(&mut self, code: u16, reason: &str) -> WsEvent {
        if self.write_close(code, reason).await.is_ok() {
            // Read until the client's close frame or EOF, discarding data.
            let wait = async {
                loop {
                    match self.next_frame() {
                        Ok(Some(f)) if f.header().opcode == OpCode::Control(Control::Close) => {
                            return;
                        }
                        Ok(Some(_)) => continue,
                        Err(_) => return,
                        Ok(None) => {}
                    }
                    match self.io.read_buf(&mut self.buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            };
            let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, wait).await;
        }
        let _ = self.io.shutdown().await;
        WsEvent::Closed(Some(code))
    }

    /// Hand this connection to the successor with `state` (at most
    /// [`MAX_WS_STATE`] bytes). `Ok`: it moved (drop your handle on it and
    /// end the task). `Err`: it stays here — serve it on; [`recv`] will not
    /// offer to move it again, and it is closed with 1012 at the drain
    /// deadline if still open.
    ///
    /// [`recv`]: WebSocket::recv
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future may close the connection.
    pub async fn hand_over(mut self, state: &[u8]) -> Result<(), Box<WebSocket>> {
        self.may_move = false;
        if state.len() > MAX_WS_STATE
            || self.partial.is_some()
            || self.buf.len() > baton::protocol::MAX_CONN_PREFIX
            || !self.can_move()
        {
            return Err(Box::new(self));
        }
        let Transport::Plain(stream) = self.io else {
            // can_move() said Plain.
            return Err(Box::new(self));
        };
        let mut blob = STATE_HEADER.to_vec();
        blob.extend_from_slice(state);
        let conn = OwnedConn {
            kind: self.kind.to_string(),
            stream,
            unread: self.buf.to_vec(),
            state: blob,
            listener: self.listener.clone(),
        };
        match self.baton.hand_over_owned(conn).await {
            Ok(()) => {
                drop(self.guard.take());
                Ok(())
            }
            Err(back) => {
                self.io = Transport::Plain(back.stream);
                Err(Box::new(self))
            }
        }
    }
}

struct EndpointShared {
    baton: Baton,
    kind: Arc<str>,
    max_message: usize,
}

type Handler =
    Arc<dyn Fn(WebSocket) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// A WebSocket route whose connections move across upgrades. Cheap to
/// clone. Create it **before** [`Baton::ready`]: that registers its kind
/// with the previous generation.
///
/// ```no_run
/// # async fn f(baton: baton::Baton) -> Result<(), baton::Error> {
/// use baton_http::ws::{Endpoint, WsEvent};
/// let ws = Endpoint::new(&baton, "chat", |mut sock| async move {
///     let mut seen: u64 = sock.moved_state().map_or(0, |s| s.len() as u64);
///     loop {
///         match sock.recv().await {
///             WsEvent::Text(t) => { seen += 1; let _ = sock.send_text(t).await; }
///             WsEvent::Binary(_) => {}
///             WsEvent::Move => match sock.hand_over(&seen.to_le_bytes()).await {
///                 Ok(()) => return,
///                 Err(back) => sock = *back,
///             },
///             WsEvent::Closed(_) => return,
///         }
///     }
/// })?;
/// // In the HTTP handler: `return Ok(ws.upgrade(req));`
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Endpoint {
    shared: Arc<EndpointShared>,
    handler: Handler,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("kind", &self.shared.kind)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint of `kind` (the name its connections travel under; the
    /// successor must create an endpoint of the same kind to take them)
    /// running `handler` for each connection. Must run inside a tokio
    /// runtime.
    ///
    /// # Errors
    /// As [`Baton::receive_owned`] (after `ready()`, a kind already taken).
    pub fn new<F, Fut>(baton: &Baton, kind: &str, handler: F) -> Result<Self, baton::Error>
    where
        F: Fn(WebSocket) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Self::with_max_message(baton, kind, DEFAULT_MAX_MESSAGE, handler)
    }

    /// [`new`](Endpoint::new) with another largest message size.
    ///
    /// # Errors
    /// As [`new`](Endpoint::new).
    pub fn with_max_message<F, Fut>(
        baton: &Baton,
        kind: &str,
        max_message: usize,
        handler: F,
    ) -> Result<Self, baton::Error>
    where
        F: Fn(WebSocket) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut moved = baton.receive_owned_checked(kind, |c| {
            if c.state.get(..STATE_HEADER.len()) == Some(&STATE_HEADER[..]) {
                Ok(())
            } else {
                Err(format!(
                    "WebSocket state of another format (header {:?}, this build reads {STATE_HEADER:?})",
                    c.state.get(..2)
                ))
            }
        })?;
        let handler: Handler = Arc::new(move |ws| Box::pin(handler(ws)));
        let ep = Endpoint {
            shared: Arc::new(EndpointShared {
                baton: baton.clone(),
                kind: Arc::from(kind),
                max_message,
            }),
            handler,
        };
        let me = ep.clone();
        tokio::spawn(async move {
            while let Some(c) = moved.recv().await {
                let state = c.state[STATE_HEADER.len()..].to_vec();
                let ws = WebSocket::new(
                    &me.shared,
                    Transport::Plain(c.stream),
                    &c.unread,
                    c.listener,
                    Some(state),
                );
                me.spawn(ws);
            }
        });
        Ok(ep)
    }

    fn spawn(&self, ws: WebSocket) {
        let fut = (self.handler)(ws);
        self.shared.baton.tracker().spawn(fut);
    }

    /// Answer a WebSocket upgrade request: `101 Switching Protocols` (no
    /// extension, no subprotocol) and the handler runs on the connection;
    /// `400` (or `426` for another protocol version) if it is not a valid
    /// one.
    pub fn upgrade<B: Default>(&self, mut req: Request<hyper::body::Incoming>) -> Response<B> {
        let h = req.headers();
        let has = |name: header::HeaderName, token: &str| {
            h.get_all(name).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        if req.method() != http::Method::GET
            || !has(header::CONNECTION, "upgrade")
            || !has(header::UPGRADE, "websocket")
        {
            return status(StatusCode::BAD_REQUEST);
        }
        if h.get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            let mut r = status(StatusCode::UPGRADE_REQUIRED);
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return r;
        }
        let Some(key) = h.get(header::SEC_WEBSOCKET_KEY) else {
            return status(StatusCode::BAD_REQUEST);
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let Ok(accept) = HeaderValue::from_str(&accept) else {
            return status(StatusCode::BAD_REQUEST);
        };
        let listener = req
            .extensions()
            .get::<crate::ConnInfo>()
            .map_or_else(String::new, |i| i.listener.to_string());
        let on = hyper::upgrade::on(&mut req);
        let me = self.clone();
        self.shared.baton.tracker().spawn(async move {
            let up = match on.await {
                Ok(up) => up,
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            let (io, unread) = match up.downcast::<TokioIo<ConnIo<Stream>>>() {
                Ok(parts) => {
                    let (stream, prefix) = parts.io.into_inner().into_parts(parts.read_buf);
                    (Transport::Plain(stream), prefix)
                }
                Err(up) => (Transport::Other(TokioIo::new(up)), Vec::new()),
            };
            let ws = WebSocket::new(&me.shared, io, &unread, listener, None);
            (me.handler)(ws).await;
        });
        let mut r = status(StatusCode::SWITCHING_PROTOCOLS);
        let hs = r.headers_mut();
        hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        hs.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        r
    }
}

fn status<B: Default>(s: StatusCode) -> Response<B> {
    let mut r = Response::new(B::default());
    *r.status_mut() = s;
    r
}
