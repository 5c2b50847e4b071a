//! A raw HTTP/1.1 client: exact control over connections and bytes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The server asked to close the connection.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection (keep-alive unless asked otherwise).
#[derive(Debug)]
pub struct Conn<S: Read + Write = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
}

/// Connect with timeouts.
pub fn connect(addr: SocketAddr) -> io::Result<Conn> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    Ok(Conn::new(s))
}

impl<S: Read + Write> Conn<S> {
    pub fn new(stream: S) -> Self {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Send raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Send a request and read its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        close: bool,
        body: &[u8],
    ) -> io::Result<Resp> {
        self.send_raw(&format_request(method, path, close, body))?;
        self.read_response()
    }

    pub fn get(&mut self, path: &str) -> io::Result<Resp> {
        self.request("GET", path, false, b"")
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut tmp = [0u8; 16384];
        let n = self.stream.read(&mut tmp)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    /// Read one response.
    pub fn read_response(&mut self) -> io::Result<Resp> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(io::Error::other("response head too large"));
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        if let Some(len) = resp
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            while self.buf.len() < len {
                self.fill()?;
            }
            resp.body = self.buf.drain(..len).collect();
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    self.fill()?;
                };
                let size_hex = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(size_hex.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| io::Error::other("bad chunk size"))?;
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    self.fill()?;
                }
                resp.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        } else if status != 204 && status != 304 && !(100..200).contains(&status) {
            // Read to EOF.
            loop {
                match self.fill() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(resp)
    }
}

/// Bytes of a request.
pub fn format_request(method: &str, path: &str, close: bool, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n").into_bytes();
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A request held open for as long as the test wants: `POST /echo` with
/// `Expect: 100-continue`, whose body the client sends only when
/// [`Held::release`] is called.
///
/// Why not `GET /slow?ms=N`: that request ends after N ms whatever the test
/// is doing, so a test that needs it in flight (to keep an old generation
/// draining, or to be cut) races its own waits, and loses on a busy
/// machine. And a test had to sleep, hoping the request had reached the
/// handler before the upgrade started. A held request has neither race:
/// [`hold`] returns only once the handler runs (hyper answers
/// `100 Continue` when the handler first reads the body), and from then on
/// the request is in flight on that process until it is released, cut at
/// the drain deadline, or dies with its process.
#[derive(Debug)]
pub struct Held {
    conn: Conn,
}

/// The body a held request sends when released (and gets back).
const HELD_BODY: &[u8] = b"held until released";

/// Start a held request on `conn` (fresh, or kept alive and idle); returns
/// once the server's handler is running.
pub fn hold(mut conn: Conn) -> io::Result<Held> {
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        HELD_BODY.len()
    );
    conn.send_raw(head.as_bytes())?;
    let r = conn.read_response()?;
    if r.status != 100 {
        return Err(io::Error::other(format!(
            "a held request needs 100 Continue, got {} {:?}",
            r.status,
            r.text()
        )));
    }
    Ok(Held { conn })
}

impl Held {
    /// The client's end of the connection: the server sees the request
    /// come from this port.
    pub fn local_port(&self) -> u16 {
        self.conn
            .stream
            .local_addr()
            .expect("local address of a connected socket")
            .port()
    }

    /// Send the body: the handler answers with it (checked). Returns the
    /// response and the connection, kept alive unless the response says
    /// otherwise.
    pub fn release(mut self) -> io::Result<(Resp, Conn)> {
        self.conn.send_raw(HELD_BODY)?;
        let r = self.conn.read_response()?;
        if r.status == 200 && r.body != HELD_BODY {
            return Err(io::Error::other(format!(
                "the held request's echo came back as {:?}",
                r.text()
            )));
        }
        Ok((r, self.conn))
    }

    /// Wait at most `timeout` for the server to end the connection with no
    /// answer (EOF or reset): the request was cut, or died with its
    /// process. `Err` says what happened instead (an answer, a timeout).
    pub fn wait_cut(mut self, timeout: Duration) -> Result<(), String> {
        self.conn
            .stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 1024];
        match self.conn.stream.read(&mut b) {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!(
                "the server answered the held request: {:?}",
                String::from_utf8_lossy(&b[..n])
            )),
            Err(e) if crate::load::FailKind::of(&e) == crate::load::FailKind::Reset => Ok(()),
            Err(e) => Err(format!(
                "the held request was not cut within {timeout:?}: {e}"
            )),
        }
    }
}

/// One request on a fresh connection with `Connection: close`.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Resp> {
    let mut c = connect(addr)?;
    c.request("GET", path, true, b"")
}

/// One request over a Unix socket with `Connection: close`.
pub fn get_unix(path: &std::path::Path, uri: &str) -> io::Result<Resp> {
    let s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut c = Conn::new(s);
    c.request("GET", uri, true, b"")
}
