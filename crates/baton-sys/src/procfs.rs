//! `/proc` parsing: TCP sockets as `/proc/net/tcp{,6}` shows them (a
//! listener's accept queue, a connection's state and inode).

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

use crate::to_io;

/// Number of connections waiting in a TCP listener's accept queue.
///
/// Read from `/proc/net/tcp{,6}` (for a listening socket the `rx_queue`
/// column is the accept backlog), matched by the socket's inode: no
/// `getsockopt(TCP_INFO)` struct layout, no unsafe.
pub fn tcp_accept_queue_len(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let inode = rustix::fs::fstat(fd).map_err(to_io)?.st_ino;
    if let Some(n) = find_in_tcp_tables(|line| tcp_line_queue(line, inode as u64))? {
        return Ok(n);
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "listening socket not found in /proc/net/tcp{,6}",
    ))
}

/// Find the `rx_queue` of the socket with `inode` in a `/proc/net/tcp` table.
pub fn parse_proc_net_tcp_queue(text: &str, inode: u64) -> Option<u32> {
    text.lines().skip(1).find_map(|l| tcp_line_queue(l, inode))
}

/// The `rx_queue` of one table line, if it is the socket with `inode`.
fn tcp_line_queue(line: &str, inode: u64) -> Option<u32> {
    let mut cols = line.split_whitespace();
    let rx = cols.nth(4)?;
    if cols.nth(4)?.parse::<u64>().ok() != Some(inode) {
        return None;
    }
    u32::from_str_radix(rx.split(':').nth(1)?, 16).ok()
}

/// The TCP tables, IPv4 then IPv6.
const TCP_TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

/// Run `f` on each socket line of `/proc/net/tcp` then `/proc/net/tcp6`
/// (header skipped) until it returns `Some`. The tables are streamed through
/// one small buffer, never read whole: with many sockets (TIME_WAIT after a
/// load) a table is megabytes, and one large allocation raises glibc's
/// dynamic mmap threshold, so that the supervisor's heap keeps that much
/// resident afterwards. A missing table (no IPv6) is skipped.
///
/// # Errors
/// A read error other than a missing table.
pub fn find_in_tcp_tables<T>(mut f: impl FnMut(&str) -> Option<T>) -> io::Result<Option<T>> {
    use std::io::BufRead;
    let mut line = String::with_capacity(256);
    for table in TCP_TABLES {
        let file = match std::fs::File::open(table) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut r = io::BufReader::with_capacity(16 * 1024, file);
        let mut first = true;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                break;
            }
            if std::mem::take(&mut first) {
                continue;
            }
            if let Some(t) = f(&line) {
                return Ok(Some(t));
            }
        }
    }
    Ok(None)
}

/// TCP state `LISTEN` in `/proc/net/tcp`.
pub const TCP_LISTEN: u8 = 0x0A;

/// Count the listening sockets bound to exactly `addr`.
///
/// # Errors
/// A read error of the tables.
pub fn count_tcp_listeners(addr: SocketAddr) -> io::Result<usize> {
    let mut n = 0;
    find_in_tcp_tables(|line| {
        let mut cols = line.split_whitespace();
        let local = cols.nth(1).and_then(parse_proc_net_tcp_addr);
        let state = cols.nth(1).and_then(|s| u8::from_str_radix(s, 16).ok());
        if state == Some(TCP_LISTEN) && local == Some(addr) {
            n += 1;
        }
        None::<()>
    })?;
    Ok(n)
}

/// A TCP connection as `/proc/net/tcp{,6}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcTcpEntry {
    /// Kernel TCP state (1 = ESTABLISHED, 4 = FIN_WAIT1, 6 = TIME_WAIT,
    /// 10 = LISTEN...).
    pub state: u8,
    /// Socket inode; 0 while a connection waits in an accept queue (no
    /// process has a file for it yet) and again once it is closed.
    pub inode: u64,
}

/// TCP state `ESTABLISHED` in `/proc/net/tcp`.
pub const TCP_ESTABLISHED: u8 = 1;

/// Look up the socket whose local address is `local` and remote address is
/// `remote` in `/proc/net/tcp` and `/proc/net/tcp6`.
pub fn proc_tcp_entry(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<ProcTcpEntry>> {
    find_in_tcp_tables(|line| tcp_line_entry(line, local, remote))
}

/// Parse `/proc/net/tcp{,6}` address notation: hex IP in host order per
/// 32-bit word, `:`, hex port.
pub fn parse_proc_net_tcp_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = match ip.len() {
        8 => std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes()).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for w in 0..4 {
                let word = u32::from_str_radix(ip.get(w * 8..w * 8 + 8)?, 16).ok()?;
                bytes[w * 4..w * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            match v6.to_ipv4_mapped() {
                Some(v4) => v4.into(),
                None => v6.into(),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |x: SocketAddr| match x.ip() {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), x.port()),
            None => x,
        },
        std::net::IpAddr::V4(_) => x,
    };
    canon(a) == canon(b)
}

/// Find the connection `local` ↔ `remote` in one `/proc/net/tcp{,6}` table.
pub fn parse_proc_net_tcp_entry(
    text: &str,
    local: SocketAddr,
    remote: SocketAddr,
) -> Option<ProcTcpEntry> {
    text.lines()
        .skip(1)
        .find_map(|l| tcp_line_entry(l, local, remote))
}

/// One table line as a [`ProcTcpEntry`], if it is `local` ↔ `remote`.
fn tcp_line_entry(line: &str, local: SocketAddr, remote: SocketAddr) -> Option<ProcTcpEntry> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    if cols.len() < 10 {
        return None;
    }
    let (l, r) = (
        parse_proc_net_tcp_addr(cols[1])?,
        parse_proc_net_tcp_addr(cols[2])?,
    );
    if !same_endpoint(l, local) || !same_endpoint(r, remote) {
        return None;
    }
    Some(ProcTcpEntry {
        state: u8::from_str_radix(cols[3], 16).ok()?,
        inode: cols[9].parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_addresses() {
        assert_eq!(
            parse_proc_net_tcp_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_net_tcp_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_proc_net_tcp_addr("0000000000000000FFFF00000100007F:0050"),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_proc_net_tcp_addr("zz:1"), None);
    }

    #[test]
    fn listeners_are_counted_by_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(count_tcp_listeners(addr).unwrap(), 1);
        drop(l);
        assert_eq!(count_tcp_listeners(addr).unwrap(), 0);
    }

    #[test]
    fn an_accepted_connection_gets_an_inode() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        let me = c.local_addr().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let queued = proc_tcp_entry(addr, me).unwrap().unwrap();
        assert_eq!(queued.state, TCP_ESTABLISHED);
        assert_eq!(queued.inode, 0, "not accepted yet");
        let (_s, _) = l.accept().unwrap();
        let accepted = proc_tcp_entry(addr, me).unwrap().unwrap();
        assert_ne!(accepted.inode, 0);
    }
}
