//! Two of the demo's routes, apart from the router: `GET /upgrade` (a raw
//! upgraded echo that cannot move) and the key-value cache `/kv/{key}`.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::{App, MAX_KV_KEYS, MAX_KV_VALUE, lock_state, text};

/// `GET /upgrade` with `Upgrade: echo`: switch protocols and echo every
/// byte back (a stand-in for WebSocket). An upgraded connection cannot move
/// to another generation: it stays on this one until it closes or the drain
/// deadline passes.
pub(crate) fn echo_upgrade(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("echo"));
    if !wants {
        return text(
            StatusCode::BAD_REQUEST,
            "send Upgrade: echo and Connection: upgrade\n",
        );
    }
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        match hyper::upgrade::on(req).await {
            Ok(up) => {
                let mut io = hyper_util::rt::TokioIo::new(up);
                let mut buf = vec![0u8; 4096];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert(header::UPGRADE, header::HeaderValue::from_static("echo"));
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    r
}

pub(crate) async fn kv(
    app: &App,
    method: Method,
    key: String,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if key.is_empty() || key.len() > 256 {
        return text(StatusCode::BAD_REQUEST, "key must be 1 to 256 bytes\n");
    }
    match method {
        Method::GET => match lock_state(&app.state).kv.get(&key) {
            Some(v) => Response::new(Full::new(Bytes::from(v.clone()))),
            None => text(StatusCode::NOT_FOUND, "no such key\n"),
        },
        Method::PUT => match Limited::new(req.into_body(), MAX_KV_VALUE).collect().await {
            Ok(b) => {
                let mut s = lock_state(&app.state);
                if s.kv.len() >= MAX_KV_KEYS && !s.kv.contains_key(&key) {
                    return text(StatusCode::INSUFFICIENT_STORAGE, "the cache is full\n");
                }
                s.kv.insert(key, b.to_bytes().to_vec());
                text(StatusCode::OK, "stored\n")
            }
            Err(e) => text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the value: {e}\n"),
            ),
        },
        Method::DELETE => match lock_state(&app.state).kv.remove(&key) {
            Some(_) => text(StatusCode::OK, "deleted\n"),
            None => text(StatusCode::NOT_FOUND, "no such key\n"),
        },
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    }
}
