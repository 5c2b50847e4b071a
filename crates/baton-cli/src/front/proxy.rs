//! One client request: its headers made fit to forward, sent to the current
//! epoch's generation, retried when that is safe, 502 otherwise.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body_util::{Either, Empty, Full};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};

use super::Front;
use super::limits::Capped;
use super::pool::{Lease, UpBody};
use super::serve::Client;
use super::tunnel::Tunnel;

/// The body baton sends a client: the generation's, or its own 502.
pub type DownBody = Either<Upstream, Full<Bytes>>;

/// A response body from the generation. Its upstream connection goes back
/// to the pool as the body ends (no task waits for it), or is closed if
/// the body fails or is dropped before its end (the client went away).
pub struct Upstream {
    inner: Incoming,
    lease: Option<Lease>,
}

impl Upstream {
    pub(super) fn new(inner: Incoming, lease: Option<Lease>) -> Upstream {
        Upstream { inner, lease }
    }

    /// The body ended (`true`) or failed: the connection is given back or
    /// closed.
    fn done(&mut self, ok: bool) {
        if let Some(lease) = self.lease.take() {
            if ok {
                lease.release();
            } else {
                lease.discard();
            }
        }
    }
}

impl Body for Upstream {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &r {
            None => this.done(true),
            Some(Ok(_)) if this.inner.is_end_stream() => this.done(true),
            Some(Err(_)) => this.done(false),
            Some(Ok(_)) => {}
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // An empty body (`HEAD`, `204`, `304`, `Content-Length: 0`) is
        // never polled: it ended too.
        let ended = self.inner.is_end_stream();
        self.done(ended);
    }
}

/// Pause before the retry number `n` (1, 2, ...): a generation that just
/// died is restarted with a backoff of its own, a connect refused at once
/// is not worth repeating at once.
fn retry_pause(n: u32) -> Duration {
    Duration::from_millis(25 * u64::from(n * n))
}

/// Headers that describe one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

const FORWARDED: [&str; 4] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Whether `n` is removed by [`strip_hop_by_hop`].
fn is_hop_by_hop(n: &HeaderName) -> bool {
    *n == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(&n.as_str())
}

/// Remove the hop-by-hop headers, those `Connection` names included.
/// `Transfer-Encoding` goes too: hyper frames the body again itself.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages have none (this runs twice per request): one pass over
    // the names present, no lookup by name.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(header::TRANSFER_ENCODING);
}

/// The forwarding headers' values for one client address, made once per
/// client connection (not per request).
#[derive(Debug, Clone)]
pub struct PeerHeaders {
    /// `X-Forwarded-For`: the address.
    xff: Option<HeaderValue>,
    /// `Forwarded`: `for=<node>;proto=http` (RFC 7239; an IPv6 node quoted
    /// and bracketed).
    forwarded: Option<HeaderValue>,
}

impl PeerHeaders {
    /// The values for a client at `peer`.
    pub fn new(peer: SocketAddr) -> PeerHeaders {
        let ip = peer.ip();
        let node = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        // Both are ASCII made from an address.
        PeerHeaders {
            xff: HeaderValue::from_str(&ip.to_string()).ok(),
            forwarded: HeaderValue::from_str(&format!("for={node};proto=http")).ok(),
        }
    }
}

/// `prev, own` (a trusted proxy's list with baton's hop appended), or
/// `own` alone.
fn append_hop(prev: Option<&HeaderValue>, own: &HeaderValue) -> HeaderValue {
    let joined = match (prev.and_then(|v| v.to_str().ok()), own.to_str()) {
        (Some(prev), Ok(own)) => HeaderValue::from_str(&format!("{prev}, {own}")).ok(),
        _ => None,
    };
    joined.unwrap_or_else(|| own.clone())
}

/// The request headers baton sends upstream: hop-by-hop ones removed, the
/// client's forwarding headers removed unless trusted, baton's added.
pub fn forward_headers(h: &mut HeaderMap, peer: &PeerHeaders, trust: bool) {
    strip_hop_by_hop(h);
    // baton read the body and answered `100 Continue` itself.
    h.remove(header::EXPECT);
    if !trust && h.keys().any(|n| FORWARDED.contains(&n.as_str())) {
        for n in FORWARDED {
            h.remove(n);
        }
    }
    if let Some(own) = &peer.xff {
        let v = append_hop(h.get(&X_FORWARDED_FOR).filter(|_| trust), own);
        h.insert(X_FORWARDED_FOR, v);
    }
    if let Some(own) = &peer.forwarded {
        let v = append_hop(h.get(header::FORWARDED).filter(|_| trust), own);
        h.insert(header::FORWARDED, v);
    }
    if !trust || !h.contains_key(&X_FORWARDED_PROTO) {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
}

/// What is needed to send a request again without its body.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Replay {
    fn request(&self) -> Request<UpBody> {
        let mut r = Request::new(Either::Right(Empty::new()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        r
    }
}

fn bad_gateway() -> Response<DownBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        b"502 Bad Gateway: the application did not answer\n",
    ))));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// What an upgrade request asks for: the `Upgrade` value baton forwards
/// (with `Connection: upgrade`), or `None` for a plain request. Only
/// HTTP/1.1 upgrades; `h2c` is not forwarded (baton speaks h2c with prior
/// knowledge itself, and the app behind it HTTP/1.1).
fn upgrade_asked(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let proto = headers.get(header::UPGRADE)?;
    let h2c = proto
        .to_str()
        .is_ok_and(|p| p.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")));
    (asks && !h2c).then(|| proto.clone())
}

/// Put `Connection: upgrade` and `Upgrade: proto` back (after the
/// hop-by-hop headers went).
fn set_upgrade(h: &mut HeaderMap, proto: HeaderValue) {
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, proto);
}

/// The `413` for a body over `limit`; over HTTP/1 the connection lingers
/// at close, so that a client still sending gets to read it.
fn refuse_body(client: &Client, limit: u64, version: Version) -> Response<DownBody> {
    if version < Version::HTTP_2 {
        client.linger.store(true, Ordering::Release);
    }
    super::limits::too_large(limit, version)
}

/// Serve one request of a client connection.
///
/// # Errors
///
/// None: every failure is a response.
pub async fn handle(
    front: Front,
    client: Arc<Client>,
    mut req: Request<Incoming>,
) -> Result<Response<DownBody>, Infallible> {
    let counters = &front.inner.counters;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let Some(pool) = front.inner.pools.get(client.idx) else {
        return Ok(bad_gateway());
    };
    let limit = front.inner.cfg.max_body;
    if req.body().size_hint().lower() > limit {
        counters.body_too_large.fetch_add(1, Ordering::Relaxed);
        return Ok(refuse_body(&client, limit, req.version()));
    }
    let client_version = req.version();
    let upgrade = upgrade_asked(req.version(), req.headers());
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    forward_headers(
        &mut parts.headers,
        &client.forwarded,
        front.inner.cfg.trust_forwarded,
    );
    if let Some(proto) = &upgrade {
        set_upgrade(&mut parts.headers, proto.clone());
    }
    // HTTP/2 carries the host in `:authority`; HTTP/1.1 upstream needs it
    // in `Host`.
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    parts.version = Version::HTTP_11;
    if let Some(pq) = parts.uri.path_and_query() {
        // An absolute-form target goes upstream in origin form.
        if parts.uri.scheme().is_some()
            && let Ok(u) = Uri::builder().path_and_query(pq.clone()).build()
        {
            parts.uri = u;
        }
    }
    let replay = (parts.method.is_idempotent() && body.is_end_stream()).then(|| Replay {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
    });
    let tripped = Arc::new(AtomicBool::new(false));
    let body = Capped::new(body, limit, Arc::clone(&tripped));
    let mut req = Some(Request::from_parts(parts, Either::Left(body)));
    let mut client_upgrade = client_upgrade;
    for attempt in 1..=super::MAX_ATTEMPTS {
        if attempt > 1 {
            counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(retry_pause(attempt - 1)).await;
        }
        let Some(r) = req.take().or_else(|| replay.as_ref().map(Replay::request)) else {
            break;
        };
        let mut lease = match pool.checkout(front.epoch()).await {
            Ok(l) => l,
            Err(e) => {
                counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, attempt, "front: cannot reach the generation");
                req = Some(r);
                continue;
            }
        };
        match lease.sender.try_send_request(r).await {
            Ok(mut resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let (Some(proto), Some(down)) = (upgrade.as_ref(), client_upgrade.take()) else {
                    // A 101 nobody asked for: the connection is the app's
                    // now, and useless.
                    lease.discard();
                    counters.bad_gateway.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("front: the app switched protocols without an upgrade request");
                    return Ok(bad_gateway());
                };
                // Counted open before the upstream connection stops being
                // busy: its epoch is never seen idle in between.
                let tunnel = Tunnel::open(&front, lease.epoch());
                lease.discard();
                let up = hyper::upgrade::on(&mut resp);
                tunnel.spawn(down, up, client.slot.clone());
                let proto = resp
                    .headers()
                    .get(header::UPGRADE)
                    .cloned()
                    .unwrap_or_else(|| proto.clone());
                strip_hop_by_hop(resp.headers_mut());
                set_upgrade(resp.headers_mut(), proto);
                return Ok(resp.map(|b| Either::Left(Upstream::new(b, None))));
            }
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut());
                return Ok(resp.map(|b| Either::Left(Upstream::new(b, Some(lease)))));
            }
            Err(mut e) => {
                let reused = lease.reused;
                lease.discard();
                if tripped.load(Ordering::Acquire) {
                    // The client's body, not the app, failed the request.
                    counters.body_too_large.fetch_add(1, Ordering::Relaxed);
                    return Ok(refuse_body(&client, limit, client_version));
                }
                counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e.error(), attempt, reused, "front: upstream request failed");
                // Never written: the same request, body included, can go
                // again; otherwise only a replayable one (taken above).
                req = e.take_message();
            }
        }
    }
    counters.bad_gateway.fetch_add(1, Ordering::Relaxed);
    Ok(bad_gateway())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn upgrades_are_asked_by_http11_connection_upgrade_but_h2c() {
        let h = |conn: &'static str, up: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("connection", HeaderValue::from_static(conn));
            h.insert("upgrade", HeaderValue::from_static(up));
            h
        };
        let ws = h("keep-alive, Upgrade", "websocket");
        assert_eq!(upgrade_asked(Version::HTTP_11, &ws).unwrap(), "websocket");
        assert!(upgrade_asked(Version::HTTP_10, &ws).is_none());
        assert!(upgrade_asked(Version::HTTP_11, &h("keep-alive", "websocket")).is_none());
        assert!(upgrade_asked(Version::HTTP_11, &h("Upgrade, HTTP2-Settings", "h2c")).is_none());
        // Forwarded with exactly these two hop-by-hop headers back.
        let mut fwd = ws.clone();
        let peer = PeerHeaders::new("10.0.0.7:5000".parse().unwrap());
        forward_headers(&mut fwd, &peer, false);
        set_upgrade(&mut fwd, HeaderValue::from_static("websocket"));
        assert_eq!(fwd["connection"], "upgrade");
        assert_eq!(fwd["upgrade"], "websocket");
    }

    #[test]
    fn untrusted_forwarding_headers_are_replaced() {
        let peer = PeerHeaders::new("10.0.0.7:5000".parse().unwrap());
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        forward_headers(&mut h, &peer, false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(h["forwarded"], "for=10.0.0.7;proto=http");
        assert_eq!(h["x-forwarded-proto"], "http");

        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        forward_headers(&mut h, &peer, true);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.7");
    }

    #[test]
    fn trusted_forwarding_headers_get_baton_hop_appended_ipv6_quoted() {
        let peer = PeerHeaders::new("[2001:db8::7]:5000".parse().unwrap());
        let mut h = HeaderMap::new();
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-host", HeaderValue::from_static("example.org"));
        h.insert("te", HeaderValue::from_static("trailers"));
        forward_headers(&mut h, &peer, true);
        assert_eq!(h["x-forwarded-for"], "2001:db8::7");
        assert_eq!(
            h["forwarded"],
            "for=1.2.3.4, for=\"[2001:db8::7]\";proto=http"
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "example.org");
        assert!(!h.contains_key("te"));
        // Untrusted: every client value goes, baton's alone are sent.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-host", HeaderValue::from_static("example.org"));
        h.insert("host", HeaderValue::from_static("a"));
        forward_headers(&mut h, &peer, false);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::7]\";proto=http");
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h.len(), 4, "{h:?}");
    }
}
