//! `baton run --metrics ADDR`: the supervisor's own counters at
//! `http://ADDR/metrics`, in the Prometheus (OpenMetrics) text format the
//! library-mode servers use too ([`baton::metrics::render`]).
//!
//! A few lines of HTTP/1.1 instead of an HTTP stack: one `GET` per
//! connection, answered and closed. Every read is bounded.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest wait for a scrape's request head.
pub const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Scrapes answered at the same time; more wait in the accept queue.
const MAX_CONCURRENT_SCRAPES: usize = 16;

/// Bind the metrics listener (`CLOEXEC`, never passed to the app).
///
/// # Errors
/// Why it cannot be bound.
pub fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| format!("--metrics {addr}: cannot bind: {e}"))?;
    l.set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(l))
        .map_err(|e| format!("--metrics {addr}: {e}"))
}

/// Answer scrapes with `render()` until the runtime ends.
pub async fn serve<F>(listener: tokio::net::TcpListener, render: F)
where
    F: Fn() -> String + Clone + Send + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_SCRAPES));
    loop {
        let Ok(permit) = std::sync::Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((s, _)) => {
                let render = render.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = answer(s, render).await {
                        tracing::debug!(error = %e, "metrics scrape failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer<F: Fn() -> String>(mut s: tokio::net::TcpStream, render: F) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(METRICS_REQUEST_TIMEOUT, read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", baton::metrics::CONTENT_TYPE, render()),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only /metrics here\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_owned(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    tokio::time::timeout(METRICS_REQUEST_TIMEOUT, s.write_all(&out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))??;
    let _ = s.shutdown().await;
    Ok(())
}
