//! The one HTTP probe, for readiness and health checks: `GET PATH` on a
//! fresh connection; the status line of the answer decides.
//!
//! A status from 200 to 399 passes, as Kubernetes counts it for its HTTP
//! probes: a redirect (a `/health` that sends to a login page, say) still
//! says the server is up and routing; 4xx, 5xx, no answer or no HTTP
//! answer fail.
//!
//! Used by the library's observation window ([`get`], with the health URL
//! from [`Config::health_url`](crate::Config::health_url)) and by the
//! `baton run` supervisor's `--ready http://...` and `--health` checks
//! ([`http_get`] on a connection it routed to the new generation itself).
//!
//! ```
//! assert!(baton::probe::passes(200));
//! assert!(baton::probe::passes(302));
//! assert!(!baton::probe::passes(404));
//! assert!(!baton::probe::passes(503));
//! ```

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Lowest status that passes.
pub const FIRST_PASSING: u16 = 200;
/// Highest status that passes.
pub const LAST_PASSING: u16 = 399;
/// Largest part of an answer read while looking for the end of its status
/// line; what follows it (headers, body) is never read.
pub const MAX_STATUS_LINE: usize = 16 * 1024;
/// `User-Agent` of the observation window's health checks.
pub const HEALTH_USER_AGENT: &str = "baton-health";

/// Whether an answer with this status passes (200–399).
pub fn passes(status: u16) -> bool {
    (FIRST_PASSING..=LAST_PASSING).contains(&status)
}

/// Send `GET path` on `stream` (`Host: host`, `Connection: close`) and
/// judge the status line of the answer.
///
/// No timeout of its own: bound it where the caller knows how long a check
/// may take.
///
/// # Errors
/// What went wrong, in words: the I/O error, "not an HTTP answer" with what
/// came instead, or the status line of a failing answer (so a 503 reads
/// `HTTP/1.1 503 Service Unavailable`).
///
/// # Cancel safety
/// Not cancel safe: the request may be half written. Use a fresh
/// connection for the next attempt.
pub async fn http_get<S>(
    stream: &mut S,
    host: &str,
    path: &str,
    user_agent: &str,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 || buf.len() >= MAX_STATUS_LINE {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    if buf.is_empty() {
        return Err("the connection closed before a status line".to_owned());
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or_default();
    match line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
    {
        Some(s) if passes(s) => Ok(()),
        Some(_) => Err(line.to_owned()),
        None => Err(format!("not an HTTP answer: {line:?}")),
    }
}

/// `GET` a health URL (`http://HOST:PORT/PATH`) on a fresh connection,
/// within `timeout`: [`http_get`] with the connection made here.
///
/// # Errors
/// What went wrong, in words (as [`http_get`], plus a URL that is not
/// `http://`, a failed connect, or no answer within `timeout`).
pub async fn get(url: &str, timeout: Duration) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("health URL {url} must start with http://"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(hostport)
            .await
            .map_err(|e| format!("connect {hostport}: {e}"))?;
        http_get(&mut s, hostport, path, HEALTH_USER_AGENT).await
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers each connection with the next status line of `answers`.
    async fn server(answers: &'static [&'static str]) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for status in answers {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("{status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        format!("http://{addr}/health")
    }

    #[test]
    fn passing_is_200_to_399() {
        for s in [200, 204, 299, 300, 301, 302, 304, 307, 399] {
            assert!(passes(s), "{s}");
        }
        for s in [0, 100, 101, 199, 400, 401, 404, 429, 499, 500, 503, 599] {
            assert!(!passes(s), "{s}");
        }
    }

    #[tokio::test]
    async fn a_redirect_passes_a_client_or_server_error_fails() {
        let url = server(&[
            "HTTP/1.1 200 OK",
            "HTTP/1.1 302 Found",
            "HTTP/1.1 404 Not Found",
            "HTTP/1.1 503 Service Unavailable",
            "SSH-2.0-OpenSSH_9.6",
        ])
        .await;
        let t = Duration::from_secs(5);
        assert_eq!(get(&url, t).await, Ok(()));
        assert_eq!(get(&url, t).await, Ok(()));
        assert_eq!(get(&url, t).await, Err("HTTP/1.1 404 Not Found".into()));
        assert_eq!(
            get(&url, t).await,
            Err("HTTP/1.1 503 Service Unavailable".into())
        );
        let e = get(&url, t).await.unwrap_err();
        assert!(e.starts_with("not an HTTP answer"), "{e}");
    }

    #[tokio::test]
    async fn bad_urls_closed_ports_and_silent_servers_fail() {
        let t = Duration::from_millis(300);
        assert!(get("ftp://x", t).await.unwrap_err().contains("http://"));
        assert!(get("http://127.0.0.1:1/", t).await.is_err());
        // A server that accepts and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        let e = get(&url, t).await.unwrap_err();
        assert!(e.contains("no answer within"), "{e}");
        // One that reads the request and closes without a word (the
        // first connection, abandoned above, is served the same way).
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
            }
        });
        let e = get(&url, t).await.unwrap_err();
        assert!(e.contains("before a status line"), "{e}");
    }
}
