//! Looking at processes through /proc.

use std::path::Path;

/// The state letter of a process (`R`, `S`, `T`, `Z`...), if it exists.
pub fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

/// Alive = exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    matches!(state(pid), Some(c) if c != 'Z' && c != 'X')
}

/// Parent pid.
pub fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Every pid on the machine.
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Children of `pid` (any state, zombies included).
pub fn children(pid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|p| ppid(*p) == Some(pid))
        .collect()
}

/// Live processes whose executable lives under `dir`.
pub fn processes_with_exe_prefix(dir: &Path) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|exe| exe.starts_with(dir))
                && alive(*p)
        })
        .collect()
}

/// Send a signal (errors ignored: the process may be gone).
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let _ = baton_sys::process::kill(pid, sig);
}

/// Number of open fds of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Anonymous resident memory in KiB (heap, stacks: not code pages).
pub fn rss_anon_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "RssAnon:")
}

/// A `KiB` field of `/proc/PID/status`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Process group id.
pub fn pgid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(2)?.parse().ok()
}

/// Every live descendant of `pid` (children, their children, ...).
pub fn descendants(pid: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, ppid(p)?)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (c, pp) in &all {
            if *pp == p && !out.contains(c) {
                out.push(*c);
                frontier.push(*c);
            }
        }
    }
    out.retain(|p| alive(*p));
    out
}

/// The value of an environment variable of a process.
pub fn env_var(pid: u32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{name}=")).map(str::to_owned)
    })
}

/// Established TCP connections (IPv4 and IPv6) held by `pid`: the local and
/// the remote port of each.
pub fn established(pid: u32) -> Vec<(u16, u16)> {
    let inodes: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| {
                let target = std::fs::read_link(e.ok()?.path()).ok()?;
                let t = target.to_str()?;
                t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(st), Some(inode)) =
                (f.get(1), f.get(2), f.get(3), f.get(9))
            else {
                continue;
            };
            if *st == "01"
                && inode.parse().is_ok_and(|i: u64| inodes.contains(&i))
                && let (Some(l), Some(r)) = (port(local), port(remote))
            {
                out.push((l, r));
            }
        }
    }
    out
}

/// Established TCP connections held by `pid` whose local port is `port`:
/// the connections a server process is serving on that port.
pub fn established_on_port(pid: u32, port: u16) -> usize {
    established(pid).iter().filter(|(l, _)| *l == port).count()
}

/// `pid` holds the server end of the connection from the client port
/// `peer` to `port` (which process is serving that request).
pub fn serves_connection(pid: u32, port: u16, peer: u16) -> bool {
    established(pid).contains(&(port, peer))
}
