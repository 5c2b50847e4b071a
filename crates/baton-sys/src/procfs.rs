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
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        if let Some(n) = parse_proc_net_tcp_queue(&text, inode as u64) {
            return Ok(n);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "listening socket not found in /proc/net/tcp{,6}",
    ))
}

/// Find the `rx_queue` of the socket with `inode` in a `/proc/net/tcp` table.
pub fn parse_proc_net_tcp_queue(text: &str, inode: u64) -> Option<u32> {
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        if cols[9].parse::<u64>().ok() != Some(inode) {
            continue;
        }
        let rx = cols[4].split(':').nth(1)?;
        return u32::from_str_radix(rx, 16).ok();
    }
    None
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
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        if let Some(e) = parse_proc_net_tcp_entry(&text, local, remote) {
            return Ok(Some(e));
        }
    }
    Ok(None)
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
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        let (Some(l), Some(r)) = (
            parse_proc_net_tcp_addr(cols[1]),
            parse_proc_net_tcp_addr(cols[2]),
        ) else {
            continue;
        };
        if !same_endpoint(l, local) || !same_endpoint(r, remote) {
            continue;
        }
        return Some(ProcTcpEntry {
            state: u8::from_str_radix(cols[3], 16).ok()?,
            inode: cols[9].parse().ok()?,
        });
    }
    None
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
