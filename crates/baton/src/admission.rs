//! Admission: checks made before anything is spawned. A refusal changes
//! nothing.
//!
//! * **Pre-flight**: the executable exists and is executable; an optional
//!   check command exits 0; an optional expected SHA-256 matches — hashed
//!   from an open fd that is then the one executed (`/proc/self/fd/N`), so
//!   the file cannot be swapped in between.
//! * **Memory headroom**: `used + estimate` must stay under a percentage of
//!   the tightest limit — the cgroup's and its ancestors' (v2 `memory.max`,
//!   v1 `memory.limit_in_bytes`), else the machine's (`/proc/meminfo`). Used
//!   memory excludes reclaimable page cache (`inactive_file`). The estimate
//!   of the new generation is, by default, the current generation's process
//!   tree (its anonymous and shared-memory pages, from `/proc/PID/status`).

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;

/// Default share of the memory limit an upgrade may bring usage to.
pub const DEFAULT_MAX_MEMORY_PERCENT: f64 = 75.0;
/// Default time a `--check` command may run.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The executable an upgrade will start, checked.
#[derive(Debug)]
pub struct Executable {
    /// The path as configured (becomes argv\[0\]'s basis).
    pub path: PathBuf,
    /// When the content was pinned by hash: the open file to exec.
    pub pinned: Option<File>,
}

impl Executable {
    /// The path to hand to `exec`: the pinned fd's `/proc/self/fd/N` when
    /// pinned (fork copies the fd table, so the child execs the very file
    /// that was hashed), else the path.
    pub fn exec_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        match &self.pinned {
            Some(f) => PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())),
            None => self.path.clone(),
        }
    }
}

/// Pre-flight: the executable exists, is a regular file and is executable;
/// if `expect_sha256` is given, the file's SHA-256 matches (and the returned
/// handle pins that content).
///
/// # Errors
/// [`Error::Refused`] naming the reason.
pub fn preflight(program: &Path, expect_sha256: Option<&str>) -> Result<Executable, Error> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(program).map_err(|e| {
        Error::Refused(format!(
            "the executable {} cannot be used: {e}",
            program.display()
        ))
    })?;
    if !meta.is_file() {
        return Err(Error::Refused(format!(
            "{} is not a regular file",
            program.display()
        )));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(Error::Refused(format!(
            "{} is not executable (mode {:o}); chmod +x it",
            program.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let Some(want) = expect_sha256 else {
        return Ok(Executable {
            path: program.to_path_buf(),
            pinned: None,
        });
    };
    let want = want.trim().to_ascii_lowercase();
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Refused(format!(
            "expected SHA-256 '{want}' is not 64 hex digits"
        )));
    }
    // std opens with O_CLOEXEC: the fd reaches no other child. exec of
    // /proc/self/fd/N resolves it before close-on-exec applies.
    let mut file = File::open(program)
        .map_err(|e| Error::Refused(format!("cannot open {}: {e}", program.display())))?;
    let got = sha256_file(&mut file)
        .map_err(|e| Error::Refused(format!("cannot read {}: {e}", program.display())))?;
    if got != want {
        return Err(Error::Refused(format!(
            "SHA-256 of {} is {got}, expected {want}",
            program.display()
        )));
    }
    Ok(Executable {
        path: program.to_path_buf(),
        pinned: Some(file),
    })
}

fn sha256_file(f: &mut File) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// SHA-256 of a file, hex (for `baton upgrade --expect-sha256`).
///
/// # Errors
/// The I/O error.
pub fn sha256_path(p: &Path) -> std::io::Result<String> {
    sha256_file(&mut File::open(p)?)
}

/// Run the pre-flight check command; it must exit 0 within `timeout`.
///
/// # Errors
/// [`Error::Refused`] with its exit status and the end of its output.
pub async fn run_check(cmd: &[String], timeout: Duration) -> Result<(), Error> {
    let Some((prog, args)) = cmd.split_first() else {
        return Ok(());
    };
    let mut c = tokio::process::Command::new(prog);
    c.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .env_remove(crate::spawn::ENV_HANDOFF_FD)
        .env_remove(crate::spawn::ENV_PARENT_PID);
    let child = c.spawn().map_err(|e| {
        Error::Refused(format!(
            "pre-flight check '{}' could not start: {e}",
            cmd.join(" ")
        ))
    })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return Err(Error::Refused(format!(
                "pre-flight check '{}': {e}",
                cmd.join(" ")
            )));
        }
        Err(_) => {
            return Err(Error::Refused(format!(
                "pre-flight check '{}' did not finish within {timeout:?}",
                cmd.join(" ")
            )));
        }
    };
    if out.status.success() {
        return Ok(());
    }
    let tail = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        let s = s.trim();
        s.chars()
            .rev()
            .take(300)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>()
    };
    Err(Error::Refused(format!(
        "pre-flight check '{}' failed ({}): {}{}",
        cmd.join(" "),
        out.status,
        tail(&out.stderr),
        if out.stdout.is_empty() {
            String::new()
        } else {
            format!(" / {}", tail(&out.stdout))
        }
    )))
}

/// How the memory admission decides.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MemoryPolicy {
    /// Check at all.
    pub enabled: bool,
    /// Usage after the upgrade may reach this share of the limit.
    pub max_percent: f64,
    /// Use this limit (bytes) instead of the cgroup's or the machine's.
    pub limit: Option<u64>,
    /// Assume the new generation needs this much (bytes) instead of
    /// measuring the current one.
    pub estimate: Option<u64>,
}

impl Default for MemoryPolicy {
    fn default() -> Self {
        MemoryPolicy {
            enabled: true,
            max_percent: DEFAULT_MAX_MEMORY_PERCENT,
            limit: None,
            estimate: None,
        }
    }
}

/// One memory limit and the usage it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLevel {
    /// Where it comes from (a cgroup directory, `/proc/meminfo`, or the
    /// configured limit).
    pub source: String,
    /// Limit in bytes.
    pub limit: u64,
    /// Usage in bytes, reclaimable page cache excluded.
    pub used: u64,
}

/// Bytes, human readable.
#[derive(Debug, Clone, Copy)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= (1u64 << 30) as f64 {
            write!(f, "{:.2} GiB", b / (1u64 << 30) as f64)
        } else if b >= (1u64 << 20) as f64 {
            write!(f, "{:.1} MiB", b / (1u64 << 20) as f64)
        } else if b >= 1024.0 {
            write!(f, "{:.1} KiB", b / 1024.0)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

/// Read a small kernel pseudo-file (procfs, cgroupfs) whole, starting with
/// a buffer of `cap` bytes. `read_to_string` sizes its buffer from the file's
/// size, which these files report as 0: it starts at 32 bytes and doubles,
/// one `read` each time (eight of them for a 1.5 KiB `/proc/meminfo`, plus a
/// `statx`). The files read here produce their content as one record, which
/// the kernel hands over whole when the buffer fits it, so a read returning
/// less than the space left is the end (as it is for a regular file, e.g. a
/// test's fixture tree): one `read` each. A read that fills the buffer grows
/// it and reads on, to the end of the file.
pub(crate) fn read_small(path: &Path, cap: usize) -> std::io::Result<String> {
    read_pseudo(path, cap, true)
}

/// [`read_small`] for a file of several records (e.g. `task/PID/children`,
/// one per child): the kernel may stop a read before a record that does not
/// fit, so only a read returning nothing is the end.
fn read_records(path: &Path, cap: usize) -> std::io::Result<String> {
    read_pseudo(path, cap, false)
}

fn read_pseudo(path: &Path, cap: usize, one_record: bool) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; cap.max(16)];
    let mut len = 0;
    loop {
        let n = match f.read(&mut buf[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        len += n;
        if n == 0 || (one_record && len < buf.len()) {
            break;
        }
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Buffer for a file holding one number (`memory.max`, `memory.current`...).
const NUMBER_CAP: usize = 64;
/// Buffer for `memory.stat`, `/proc/meminfo`, `/proc/PID/status` (1-2 KiB
/// on current kernels; a larger one is read on to its end).
const TABLE_CAP: usize = 8192;

fn read_u64(p: &Path) -> Option<u64> {
    read_small(p, NUMBER_CAP).ok()?.trim().parse().ok()
}

/// Parse a cgroup `memory.stat` and return one field.
pub fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The cgroup v2 path of this process, from `/proc/self/cgroup` text.
pub fn cgroup_v2_path(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// The cgroup v1 memory controller path, from `/proc/self/cgroup` text.
pub fn cgroup_v1_memory_path(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _id = parts.next()?;
        let ctrls = parts.next()?;
        let path = parts.next()?;
        ctrls
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_owned())
    })
}

/// Every limited level of a cgroup v2 hierarchy, from `cg` up to the root
/// (directories under `mount`).
pub fn cgroup_v2_levels(mount: &Path, cg: &str) -> Vec<MemoryLevel> {
    let mut out = Vec::new();
    let mut rel = PathBuf::from(cg.trim_start_matches('/'));
    loop {
        let dir = mount.join(&rel);
        if let Ok(max) = read_small(&dir.join("memory.max"), NUMBER_CAP) {
            let max = max.trim();
            if max != "max"
                && let Ok(limit) = max.parse::<u64>()
                && let Some(current) = read_u64(&dir.join("memory.current"))
            {
                let inactive = read_small(&dir.join("memory.stat"), TABLE_CAP)
                    .ok()
                    .and_then(|s| stat_field(&s, "inactive_file"))
                    .unwrap_or(0);
                out.push(MemoryLevel {
                    source: format!("cgroup v2 {}", dir.display()),
                    limit,
                    used: current.saturating_sub(inactive),
                });
            }
        }
        if !rel.pop() {
            break;
        }
    }
    out
}

/// cgroup v1's "no limit" is a page-aligned `i64::MAX`; anything at or
/// above 2^60 is treated as unlimited.
const V1_UNLIMITED: u64 = 1 << 60;

/// Every limited level of a cgroup v1 memory hierarchy.
pub fn cgroup_v1_levels(mount: &Path, cg: &str) -> Vec<MemoryLevel> {
    let mut out = Vec::new();
    let mut rel = PathBuf::from(cg.trim_start_matches('/'));
    loop {
        let dir = mount.join(&rel);
        if let Some(limit) = read_u64(&dir.join("memory.limit_in_bytes"))
            && limit < V1_UNLIMITED
            && let Some(usage) = read_u64(&dir.join("memory.usage_in_bytes"))
        {
            let stat = read_small(&dir.join("memory.stat"), TABLE_CAP).unwrap_or_default();
            let inactive = stat_field(&stat, "total_inactive_file")
                .or_else(|| stat_field(&stat, "inactive_file"))
                .unwrap_or(0);
            out.push(MemoryLevel {
                source: format!("cgroup v1 {}", dir.display()),
                limit,
                used: usage.saturating_sub(inactive),
            });
        }
        if !rel.pop() {
            break;
        }
    }
    out
}

/// The machine's memory from `/proc/meminfo` text.
pub fn meminfo_level(text: &str) -> Option<MemoryLevel> {
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|v| v * 1024)
    };
    let total = kib("MemTotal:")?;
    let avail = kib("MemAvailable:")?;
    Some(MemoryLevel {
        source: "/proc/meminfo".into(),
        limit: total,
        used: total.saturating_sub(avail),
    })
}

/// Every applicable limit for this process, read from `root` (`/` in
/// production; a fixture tree in tests).
pub fn memory_levels(root: &Path) -> Vec<MemoryLevel> {
    let cgroup = read_small(&root.join("proc/self/cgroup"), 1024).unwrap_or_default();
    let mut levels = Vec::new();
    if let Some(p) = cgroup_v2_path(&cgroup) {
        for mount in ["sys/fs/cgroup", "sys/fs/cgroup/unified"] {
            let m = root.join(mount);
            if m.join("cgroup.controllers").exists() {
                levels.extend(cgroup_v2_levels(&m, &p));
                break;
            }
        }
    }
    if let Some(p) = cgroup_v1_memory_path(&cgroup) {
        levels.extend(cgroup_v1_levels(&root.join("sys/fs/cgroup/memory"), &p));
    }
    if let Some(m) = read_small(&root.join("proc/meminfo"), TABLE_CAP)
        .ok()
        .and_then(|t| meminfo_level(&t))
    {
        levels.push(m);
    }
    levels
}

/// The memory of a process tree, in bytes: what a copy of it would need of
/// its own — anonymous and shared-memory pages (`RssAnon` + `RssShmem` in
/// `/proc/PID/status`), else `VmRSS`. File-backed pages (code, mapped
/// files) are shared with a successor running the same files. Not
/// `smaps_rollup`'s PSS: the kernel walks every page of the process to
/// compute it, so its cost grows with the resident set (tens of
/// milliseconds for a server of a few GiB, at every upgrade); `status` costs
/// the same at any size.
pub fn process_tree_memory(root_pid: u32) -> u64 {
    let mut pids = vec![root_pid];
    let mut i = 0;
    while i < pids.len() {
        let p = pids[i];
        if let Ok(children) = read_records(Path::new(&format!("/proc/{p}/task/{p}/children")), 256)
        {
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    pids.iter().map(|p| process_memory(*p)).sum()
}

fn process_memory(pid: u32) -> u64 {
    let kib_field = |text: &str, key: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|v| v * 1024)
    };
    let Ok(t) = read_small(Path::new(&format!("/proc/{pid}/status")), TABLE_CAP) else {
        return 0;
    };
    match (kib_field(&t, "RssAnon:"), kib_field(&t, "RssShmem:")) {
        (Some(anon), shmem) => anon + shmem.unwrap_or(0),
        (None, _) => kib_field(&t, "VmRSS:").unwrap_or(0),
    }
}

/// Decide: refuse if `used + estimate` exceeds `max_percent` of any level's
/// limit. Returns a line describing the tightest level when admitted.
///
/// # Errors
/// [`Error::Refused`] with the numbers.
pub fn check_memory(
    levels: &[MemoryLevel],
    estimate: u64,
    policy: &MemoryPolicy,
) -> Result<String, Error> {
    let pct = policy.max_percent.clamp(1.0, 100.0);
    let levels: Vec<MemoryLevel> = match policy.limit {
        Some(limit) => {
            // An explicit limit replaces the discovered ones; usage is the
            // tightest level's (or the machine's).
            let used = levels.first().map_or(0, |l| l.used);
            vec![MemoryLevel {
                source: "the configured memory limit".into(),
                limit,
                used,
            }]
        }
        None => levels.to_vec(),
    };
    let mut tightest: Option<(f64, &MemoryLevel)> = None;
    for l in &levels {
        let after = l.used.saturating_add(estimate);
        let allowed = (l.limit as f64 * pct / 100.0) as u64;
        if after > allowed {
            return Err(Error::Refused(format!(
                "not enough memory: {} used + {} estimated for the new generation = {} > {pct}% of {} ({}, limit {}); \
                 free memory, raise the limit, or adjust --max-memory-percent / --memory-estimate",
                Bytes(l.used),
                Bytes(estimate),
                Bytes(after),
                Bytes(l.limit),
                l.source,
                Bytes(allowed)
            )));
        }
        let share = after as f64 / l.limit.max(1) as f64;
        if tightest.is_none_or(|(s, _)| share > s) {
            tightest = Some((share, l));
        }
    }
    Ok(match tightest {
        Some((share, l)) => format!(
            "memory: {} used + {} estimated = {:.0}% of {} ({}; allowed {pct}%)",
            Bytes(l.used),
            Bytes(estimate),
            share * 100.0,
            Bytes(l.limit),
            l.source
        ),
        None => "memory: no limit found".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> crate::admission::tests::Tmp {
        let t = Tmp::new();
        for (p, content) in files {
            let path = t.0.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        t
    }

    struct Tmp(PathBuf);

    impl Tmp {
        fn new() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "baton-adm-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const MEMINFO: &str =
        "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n";

    #[test]
    fn cgroup_v2_nested_takes_every_limited_ancestor() {
        let t = tree(&[
            ("proc/self/cgroup", "0::/system.slice/app.service\n"),
            ("proc/meminfo", MEMINFO),
            ("sys/fs/cgroup/cgroup.controllers", "memory\n"),
            ("sys/fs/cgroup/system.slice/memory.max", "2147483648\n"),
            ("sys/fs/cgroup/system.slice/memory.current", "1073741824\n"),
            (
                "sys/fs/cgroup/system.slice/memory.stat",
                "anon 1\ninactive_file 536870912\n",
            ),
            ("sys/fs/cgroup/system.slice/app.service/memory.max", "max\n"),
            (
                "sys/fs/cgroup/system.slice/app.service/memory.current",
                "900000000\n",
            ),
        ]);
        let levels = memory_levels(&t.0);
        assert_eq!(levels.len(), 2, "{levels:?}"); // the slice + meminfo; the service says max
        assert_eq!(levels[0].limit, 2147483648);
        assert_eq!(
            levels[0].used,
            1073741824 - 536870912,
            "inactive_file excluded"
        );
        assert_eq!(levels[1].source, "/proc/meminfo");
        assert_eq!(levels[1].used, 4000000 * 1024);
        // 512 MiB used + 1 GiB estimated = 75% of 2 GiB: allowed at 75%.
        let p = MemoryPolicy::default();
        assert!(check_memory(&levels, 1 << 30, &p).is_ok());
        let e = check_memory(&levels, (1 << 30) + (1 << 20), &p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("75%") && e.contains("2.00 GiB") && e.contains("system.slice"),
            "{e}"
        );
    }

    #[test]
    fn cgroup_v1_limits_and_unlimited() {
        let t = tree(&[
            (
                "proc/self/cgroup",
                "12:pids:/x\n9:memory:/docker/abc\n0::/\n",
            ),
            ("proc/meminfo", MEMINFO),
            (
                "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
                "1073741824\n",
            ),
            (
                "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes",
                "600000000\n",
            ),
            (
                "sys/fs/cgroup/memory/docker/abc/memory.stat",
                "cache 1\ninactive_file 5\ntotal_inactive_file 100000000\n",
            ),
            (
                "sys/fs/cgroup/memory/docker/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            (
                "sys/fs/cgroup/memory/docker/memory.usage_in_bytes",
                "600000000\n",
            ),
        ]);
        let levels = memory_levels(&t.0);
        assert_eq!(levels.len(), 2, "{levels:?}");
        assert_eq!(levels[0].limit, 1073741824);
        assert_eq!(levels[0].used, 500000000, "total_inactive_file excluded");
    }

    #[test]
    fn no_cgroup_limit_falls_back_to_meminfo() {
        let t = tree(&[("proc/self/cgroup", "0::/\n"), ("proc/meminfo", MEMINFO)]);
        let levels = memory_levels(&t.0);
        assert_eq!(levels.len(), 1);
        assert_eq!(levels[0].limit, 16000000 * 1024);
    }

    #[test]
    fn configured_limit_overrides() {
        let levels = vec![MemoryLevel {
            source: "x".into(),
            limit: 100 << 30,
            used: 1 << 30,
        }];
        let p = MemoryPolicy {
            limit: Some(2 << 30),
            ..MemoryPolicy::default()
        };
        assert!(check_memory(&levels, 100 << 20, &p).is_ok());
        let e = check_memory(&levels, 1 << 30, &p).unwrap_err().to_string();
        assert!(e.contains("configured memory limit"), "{e}");
    }

    #[test]
    fn parsers() {
        assert_eq!(
            stat_field("a 1\ninactive_file 42\n", "inactive_file"),
            Some(42)
        );
        assert_eq!(cgroup_v2_path("0::/a/b\n"), Some("/a/b".into()));
        assert_eq!(
            cgroup_v1_memory_path("4:cpu,memory:/m\n"),
            Some("/m".into())
        );
        assert_eq!(cgroup_v1_memory_path("4:cpu:/m\n"), None);
        assert!(meminfo_level("garbage").is_none());
        assert_eq!(Bytes(1536).to_string(), "1.5 KiB");
    }

    #[test]
    fn this_machine_has_some_level_and_a_process_tree_size() {
        assert!(!memory_levels(Path::new("/")).is_empty());
        assert!(process_tree_memory(std::process::id()) > 0);
    }

    #[test]
    fn small_reads_return_whole_files() {
        // A pseudo-file longer than the first buffer: read on to its end.
        let want = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert!(want.len() > 16, "{want:?}");
        assert_eq!(
            read_small(Path::new("/proc/self/cgroup"), 16).unwrap(),
            want
        );
        assert_eq!(
            read_records(Path::new("/proc/self/cgroup"), 16).unwrap(),
            want
        );
        // A regular file (fixture trees): exactly the buffer's size, and more.
        let t = Tmp::new();
        for len in [16, 64, 10_000] {
            let p = t.0.join(format!("f{len}"));
            let text: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            std::fs::write(&p, &text).unwrap();
            assert_eq!(read_small(&p, 16).unwrap(), text, "{len} bytes");
            assert_eq!(read_records(&p, 16).unwrap(), text, "{len} bytes");
        }
        assert!(read_small(&t.0.join("missing"), 16).is_err());
    }

    #[test]
    fn sha256_pins_content() {
        let t = Tmp::new();
        let p = t.0.join("bin");
        std::fs::write(&p, b"abc").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let e = preflight(&p, Some(good)).unwrap();
        assert!(e.pinned.is_some());
        assert!(e.exec_path().starts_with("/proc/self/fd/"));
        let err = preflight(&p, Some(&"0".repeat(64)))
            .unwrap_err()
            .to_string();
        assert!(err.contains(good), "{err}");
        assert!(preflight(&p, Some("xyz")).is_err());
    }
}
