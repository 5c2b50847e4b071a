//! Fleet rollouts (`contrib/ansible`, `contrib/kubernetes`, `baton-sidecar`):
//! hosts that are fixture instances started through a `current` symlink the
//! way a deploy lays them out, stripped release binaries with their SHA-256,
//! tools from the venv run with a bound (ansible-playbook, ansible,
//! kubernetes-validate), the play recap parsed, and a ConfigMap volume
//! written the way the kubelet writes one.
//!
//! A missing tool fails the test with a message naming
//! `scripts/setup-test-deps.sh`; nothing is skipped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{Version, http, proc, wait_for};

/// What the set-up installs for these tests.
const SETUP_HINT: &str =
    "run scripts/setup-test-deps.sh (it installs ansible-core and kubernetes-validate into .venv)";

/// A tool in the repository's venv; a missing one fails the test.
pub fn venv_tool(name: &str) -> PathBuf {
    let p = crate::apps::workspace_root().join(".venv/bin").join(name);
    assert!(p.exists(), "{} is missing: {SETUP_HINT}", p.display());
    p
}

/// The `baton-sidecar` binary, built on first use into this test's target
/// directory and profile (`cargo nextest run -p baton-tests` does not build
/// other packages' binaries). `BATON_SIDECAR_BIN` overrides.
pub fn sidecar_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        crate::apps::built_bin("baton-sidecar", "baton-sidecar", "BATON_SIDECAR_BIN")
    })
    .clone()
}

/// SHA-256 of a file, hex.
pub fn sha256(path: &Path) -> String {
    baton::admission::sha256_path(path)
        .unwrap_or_else(|e| panic!("hashing {}: {e}", path.display()))
}

/// A release: an executable and its SHA-256.
#[derive(Debug, Clone)]
pub struct Release {
    pub version: String,
    pub path: PathBuf,
    pub sha256: String,
}

impl Release {
    /// A stripped copy of `binary` at `dir/file`: a tenth of the size of a
    /// debug build, so that hashing it (here and in the server's pre-flight,
    /// both debug builds) takes well under a second.
    pub fn stripped(binary: &Path, dir: &Path, file: &str, version: &str) -> Release {
        let path = dir.join(file);
        let strip = crate::apps::in_path("strip", "run scripts/setup-test-deps.sh (binutils)");
        {
            let out = crate::output(Command::new(strip).arg("-o").arg(&path).arg(binary))
                .expect("running strip");
            assert!(
                out.status.success(),
                "strip {}: {}",
                binary.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Release {
            version: version.to_owned(),
            sha256: sha256(&path),
            path,
        }
    }
}

/// One host of a fleet: a fixture instance whose files are laid out like a
/// deploy's (`ROOT/releases/VERSION/server`, `ROOT/current -> releases/VERSION`)
/// and started through `ROOT/current/server`, so that flipping `current`
/// changes what its next generation runs. Its own port, control socket,
/// pid file and fault file. Every process it started is killed on drop.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    pub root: PathBuf,
    pub addr: SocketAddr,
    pub control: PathBuf,
    pub pid_file: PathBuf,
    pub fault_file: PathBuf,
    pub log: PathBuf,
    first: Option<Child>,
}

/// A paced no-retry load: `clients` keep-alive connections, each sending
/// `GET /version` once per `interval` (or as fast as answers come, if slower)
/// until stopped or `max_time` is up. Counted like
/// [`Load`](crate::load::Load): every request that gets no answer is a
/// failure of its kind, never retried (the next request opens a new
/// connection); an answer that is not a `/version` object is wrong.
///
/// Why paced: on a 2-core machine an unpaced load on three servers takes
/// every cycle (the loopback's softirq work included, which no nice value
/// reaches), and the rollout tool under test, ansible's Python processes,
/// then needs a minute for a play that takes ten seconds. Paced, most
/// connections are idle between requests at any instant, which is the case
/// an upgrade must hand over, and a few are mid-request.
#[derive(Debug)]
pub struct PacedLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<crate::load::Stats>>,
}

impl PacedLoad {
    pub fn start(
        addr: SocketAddr,
        clients: usize,
        interval: Duration,
        max_time: Duration,
    ) -> PacedLoad {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let done = std::sync::Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + max_time;
        let threads = (0..clients)
            .map(|_| {
                let (stop, done) = (stop.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut s = crate::load::Stats::default();
                    let mut conn: Option<http::Conn> = None;
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        paced_one(addr, &mut conn, &mut s);
                        done.fetch_add(1, Ordering::Relaxed);
                        next += interval;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        } else {
                            next = now;
                        }
                    }
                    s
                })
            })
            .collect();
        PacedLoad {
            stop,
            done,
            threads,
        }
    }

    /// Requests finished so far (any outcome).
    pub fn done(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait (at most `timeout`) until `n` more requests have finished.
    pub fn wait_progress(&self, n: u64, timeout: Duration) {
        let start = self.done();
        wait_for(timeout, "load progress", || {
            (self.done() >= start + n).then_some(())
        });
    }

    /// Stop and add up every client's counts.
    pub fn stop(self) -> crate::load::Stats {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = crate::load::Stats::default();
        for t in self.threads {
            let s = t.join().expect("load client");
            all.ok += s.ok;
            all.failed += s.failed;
            all.wrong += s.wrong;
            all.closes += s.closes;
            let (a, b) = (&mut all.failures, s.failures);
            a.refused += b.refused;
            a.reset += b.reset;
            a.eof += b.eof;
            a.timeout += b.timeout;
            a.bad_status += b.bad_status;
            a.other += b.other;
            all.pids.extend(s.pids);
            all.generations.extend(s.generations);
            for e in s.errors {
                if all.errors.len() < crate::load::MAX_KEPT_ERRORS {
                    all.errors.push(e);
                }
            }
        }
        all
    }
}

/// Count one failed request in `s`, as [`Load`](crate::load::Load) does.
fn count_failure(s: &mut crate::load::Stats, kind: crate::load::FailKind, msg: String) {
    use crate::load::FailKind;
    s.failed += 1;
    let f = &mut s.failures;
    *match kind {
        FailKind::Refused => &mut f.refused,
        FailKind::Reset => &mut f.reset,
        FailKind::Eof => &mut f.eof,
        FailKind::Timeout => &mut f.timeout,
        FailKind::BadStatus => &mut f.bad_status,
        FailKind::Other => &mut f.other,
    } += 1;
    if s.errors.len() < crate::load::MAX_KEPT_ERRORS {
        s.errors.push(format!("{kind:?}: {msg}"));
    }
}

/// One request of a [`PacedLoad`] client, counted in `s`.
fn paced_one(addr: SocketAddr, conn: &mut Option<http::Conn>, s: &mut crate::load::Stats) {
    use crate::load::FailKind;
    let fail = count_failure;
    if conn.is_none() {
        match http::connect(addr) {
            Ok(c) => *conn = Some(c),
            Err(e) => return fail(s, FailKind::of(&e), format!("connect: {e}")),
        }
    }
    let Some(c) = conn.as_mut() else { return };
    let r = match c.get("/version") {
        Ok(r) => r,
        Err(e) => {
            *conn = None;
            return fail(
                s,
                FailKind::of(&e),
                format!("GET /version (keep-alive): {e}"),
            );
        }
    };
    if r.closes() {
        s.closes += 1;
        *conn = None;
    }
    if r.status != 200 {
        return fail(
            s,
            FailKind::BadStatus,
            format!("status {}: {}", r.status, r.text()),
        );
    }
    match Version::parse(&r.body) {
        Some(v) => {
            s.ok += 1;
            s.pids.insert(v.pid);
            s.generations.insert(v.generation);
        }
        None => {
            s.wrong += 1;
            if s.errors.len() < crate::load::MAX_KEPT_ERRORS {
                s.errors.push(format!("bad /version body {:?}", r.text()));
            }
        }
    }
}

/// The executable's file name inside a release directory.
pub const BINARY_NAME: &str = "server";

/// Put `release` at `root/releases/VERSION/server` (a copy).
pub fn install(root: &Path, release: &Release) -> PathBuf {
    let dir = root.join("releases").join(&release.version);
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join(BINARY_NAME);
    crate::copy_exe(&release.path, &exe);
    exe
}

/// Point `root/current` at `releases/VERSION` (relative, atomically).
pub fn flip_current(root: &Path, version: &str) {
    let tmp = root.join("current.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("releases/{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, root.join("current")).unwrap();
}

/// Where `root/current` points (`releases/VERSION`).
pub fn current_target(root: &Path) -> String {
    std::fs::read_link(root.join("current"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("(no current: {e})"))
}

impl Host {
    /// Start a host at `root` (created) running `release`.
    pub fn start(name: &str, root: &Path, release: &Release) -> Host {
        std::fs::create_dir_all(root).unwrap();
        install(root, release);
        flip_current(root, &release.version);
        Self::start_current(name, root)
    }

    /// Start a host at `root` from what `root/current` points at (already
    /// delivered, e.g. by the sidecar).
    pub fn start_current(name: &str, root: &Path) -> Host {
        crate::init();
        let port = crate::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let control = root.join("ctl/control.sock");
        let pid_file = root.join("server.pid");
        let fault_file = root.join("fault");
        let log = root.join("server.log");
        let mut cmd = Command::new(root.join("current").join(BINARY_NAME));
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--control")
            .arg(&control)
            .env("BATON_FIXTURE_FAULT_FILE", &fault_file)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(root.join("server.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        let first = crate::spawn(&mut cmd).unwrap();
        let h = Host {
            name: name.to_owned(),
            root: root.to_path_buf(),
            addr,
            control,
            pid_file,
            fault_file,
            log,
            first: Some(first),
        };
        wait_for(Duration::from_secs(20), "the host to serve", || {
            let r = http::get(h.addr, "/health").ok()?;
            (r.status == 200 && h.control.exists()).then_some(())
        });
        h
    }

    /// `GET /version` on a new connection.
    pub fn version(&self) -> Version {
        let r = http::get(self.addr, "/version").expect("GET /version");
        assert_eq!(r.status, 200, "{}: GET /version: {r:?}", self.name);
        Version::parse(&r.body).expect("version json")
    }

    /// `baton status` over the control socket.
    pub fn status(&self) -> baton::control::StatusReport {
        crate::control_status(&self.control)
    }

    /// Where `current` points.
    pub fn current(&self) -> String {
        current_target(&self.root)
    }

    /// Arm a fixture fault for this host's next generation.
    pub fn arm_fault(&self, fault: &str) {
        std::fs::write(&self.fault_file, fault).unwrap();
    }

    /// Release versions delivered (`releases/*`), sorted.
    pub fn releases(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("releases"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Every live process running a file under this host's root.
    pub fn processes(&self) -> Vec<u32> {
        proc::processes_with_exe_prefix(&self.root)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log()
            );
        }
        for pid in self.processes() {
            proc::signal(pid, rustix::process::Signal::KILL);
        }
        if let Some(mut c) = self.first.take() {
            let _ = c.kill();
        }
        let _ = crate::wait_for_opt(Duration::from_secs(5), || {
            self.processes().is_empty().then_some(())
        });
    }
}

/// A finished command: exit status, output, how long it took.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// Exit code (-1 if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// A command run to its end within `timeout` (killed and the test failed
/// past it). Output goes to files in `dir` named after `tag`, so a chatty
/// command cannot block on a full pipe while we wait.
pub fn run_bounded(cmd: &mut Command, dir: &Path, tag: &str, timeout: Duration) -> Run {
    let out_path = dir.join(format!("{tag}.stdout"));
    let err_path = dir.join(format!("{tag}.stderr"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let start = Instant::now();
    let mut child = crate::spawn_owned(cmd).unwrap_or_else(|e| panic!("{tag}: {e}"));
    let status = crate::wait_owned(&mut child, timeout);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = crate::wait_owned(&mut child, Duration::from_secs(5));
        panic!(
            "{tag} did not finish within {timeout:?}\n--- stdout\n{}\n--- stderr\n{}",
            read(&out_path),
            read(&err_path)
        );
    };
    Run {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
        elapsed: start.elapsed(),
    }
}

/// ansible-core from the venv, isolated from the machine's and the user's
/// configuration: its own `ansible.cfg`, home and temp dirs in `dir`, the
/// collection from `contrib/ansible/collections`, no colour.
#[derive(Debug)]
pub struct Ansible {
    pub dir: PathBuf,
}

impl Ansible {
    pub fn new(dir: &Path) -> Ansible {
        let cfg = "[defaults]\nretry_files_enabled = false\nstdout_callback = default\n\
                   host_key_checking = false\nforks = 1\n\
                   [connection]\npipelining = true\n";
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ansible.cfg"), cfg).unwrap();
        Ansible {
            dir: dir.to_path_buf(),
        }
    }

    /// The collections path (`contrib/ansible/collections`).
    pub fn collections() -> PathBuf {
        crate::apps::workspace_root().join("contrib/ansible/collections")
    }

    /// The example play (`contrib/ansible/rollout.yml`).
    pub fn rollout_play() -> PathBuf {
        crate::apps::workspace_root().join("contrib/ansible/rollout.yml")
    }

    /// `TOOL` from the venv with the isolated environment.
    pub fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(venv_tool(tool));
        c.current_dir(&self.dir)
            .env("ANSIBLE_CONFIG", self.dir.join("ansible.cfg"))
            .env("ANSIBLE_HOME", self.dir.join("home"))
            .env("ANSIBLE_LOCAL_TEMP", self.dir.join("tmp-local"))
            .env("ANSIBLE_REMOTE_TEMP", self.dir.join("tmp-remote"))
            .env("ANSIBLE_COLLECTIONS_PATH", Self::collections())
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("ANSIBLE_STDOUT_CALLBACK");
        c
    }

    /// The venv's python (the interpreter the modules run with).
    pub fn python() -> PathBuf {
        venv_tool("python")
    }

    /// One module on `localhost` (local connection), with the `minimal`
    /// callback: its result object and the line's status word (`CHANGED`,
    /// `SUCCESS`, `FAILED!`).
    pub fn module(
        &self,
        tag: &str,
        module: &str,
        args: &serde_json::Value,
        check: bool,
    ) -> ModuleResult {
        let mut c = self.command("ansible");
        c.env("ANSIBLE_STDOUT_CALLBACK", "minimal")
            .env("ANSIBLE_LOAD_CALLBACK_PLUGINS", "1")
            .args([
                "localhost",
                "-i",
                "localhost,",
                "-c",
                "local",
                "-m",
                module,
                "-a",
            ])
            .arg(args.to_string())
            .arg("-e")
            .arg(format!(
                "ansible_python_interpreter={}",
                Self::python().display()
            ));
        if check {
            c.arg("--check");
        }
        let run = run_bounded(&mut c, &self.dir, tag, Duration::from_secs(120));
        ModuleResult::parse(run)
    }
}

/// The result of one ad-hoc module run.
#[derive(Debug)]
pub struct ModuleResult {
    /// `CHANGED`, `SUCCESS` or `FAILED!`.
    pub word: String,
    pub json: serde_json::Value,
    pub run: Run,
}

impl ModuleResult {
    fn parse(run: Run) -> ModuleResult {
        // `localhost | CHANGED => {...}` (the object spans lines).
        let text = &run.stdout;
        let Some((head, body)) = text.split_once(" => ") else {
            panic!(
                "no module result in the output:\n--- stdout\n{}\n--- stderr\n{}",
                run.stdout, run.stderr
            );
        };
        let word = head
            .rsplit(" | ")
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let json = serde_json::from_str(body.trim()).unwrap_or_else(|e| {
            panic!(
                "module result is not JSON ({e}):\n{body}\n--- stderr\n{}",
                run.stderr
            )
        });
        ModuleResult { word, json, run }
    }
}

/// One host's line of a play recap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recap {
    pub ok: u32,
    pub changed: u32,
    pub unreachable: u32,
    pub failed: u32,
    pub skipped: u32,
    pub rescued: u32,
    pub ignored: u32,
}

/// The `PLAY RECAP` section of ansible-playbook's output, by host. Panics if
/// there is none or a line does not parse.
pub fn play_recap(stdout: &str) -> BTreeMap<String, Recap> {
    let Some((_, section)) = stdout.split_once("PLAY RECAP") else {
        panic!("no PLAY RECAP in:\n{stdout}");
    };
    let mut out = BTreeMap::new();
    for line in section.lines().skip(1) {
        let Some((host, counts)) = line.split_once(" : ") else {
            if line.trim().is_empty() {
                continue;
            }
            break;
        };
        let mut r = Recap::default();
        for kv in counts.split_whitespace() {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("recap field {kv:?} in {line:?}"));
            let v: u32 = v.parse().unwrap_or_else(|_| panic!("recap value {kv:?}"));
            match k {
                "ok" => r.ok = v,
                "changed" => r.changed = v,
                "unreachable" => r.unreachable = v,
                "failed" => r.failed = v,
                "skipped" => r.skipped = v,
                "rescued" => r.rescued = v,
                "ignored" => r.ignored = v,
                other => panic!("unknown recap field {other} in {line:?}"),
            }
        }
        out.insert(host.trim().to_owned(), r);
    }
    assert!(!out.is_empty(), "an empty PLAY RECAP in:\n{stdout}");
    out
}

/// The Kubernetes versions whose schemas the manifests are checked
/// against: 1.29 (the first with native sidecars on by default), 1.33
/// (native sidecars GA), 1.37 (the newest kubernetes-validate ships).
pub const K8S_VERSIONS: &[&str] = &["1.29.0", "1.33.0", "1.37.0"];

/// The manifests in `contrib/kubernetes`, sorted.
pub fn k8s_manifests() -> Vec<PathBuf> {
    let dir = crate::apps::workspace_root().join("contrib/kubernetes");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    v
}

/// What `k8s_manifests.py` reads from the manifests: ConfigMaps' data and
/// every command line a pod template runs.
pub fn k8s_commands(dir: &Path, files: &[PathBuf]) -> serde_json::Value {
    let script = dir.join("k8s_manifests.py");
    std::fs::write(&script, include_str!("k8s_manifests.py")).unwrap();
    let mut c = Command::new(venv_tool("python"));
    c.arg(&script).args(files);
    let r = run_bounded(&mut c, dir, "k8s_manifests", Duration::from_secs(60));
    assert_ne!(r.code(), 3, "PyYAML is missing: {SETUP_HINT}");
    assert_eq!(r.code(), 0, "k8s_manifests.py: {}", r.stderr);
    serde_json::from_str(&r.stdout).expect("k8s_manifests.py output")
}

/// A directory written the way the kubelet writes a ConfigMap volume
/// (its atomic writer): the data in a timestamped directory, `..data`
/// pointing at it, each key a symlink `KEY -> ..data/KEY`; an update writes
/// a new directory and renames a new `..data` over the old one, so a reader
/// sees the old or the new content, never a mix.
#[derive(Debug)]
pub struct ConfigMapVolume {
    pub dir: PathBuf,
    n: u32,
}

impl ConfigMapVolume {
    pub fn new(dir: &Path) -> ConfigMapVolume {
        std::fs::create_dir_all(dir).unwrap();
        ConfigMapVolume {
            dir: dir.to_path_buf(),
            n: 0,
        }
    }

    /// The file a container reads for `key`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Replace the whole ConfigMap's data with `data`.
    pub fn write(&mut self, data: &[(&str, &str)]) {
        self.n += 1;
        let ts = format!("..2026_01_01_00_00_{:02}.{}", self.n, std::process::id());
        let ts_dir = self.dir.join(&ts);
        std::fs::create_dir(&ts_dir).unwrap();
        for (k, v) in data {
            std::fs::write(ts_dir.join(k), v).unwrap();
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for (k, _) in data {
            let link = self.dir.join(k);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{k}"), &link).unwrap();
            }
        }
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paced client must see a refusal: with nothing listening, every
    /// request is a failure of kind `refused`, none is retried.
    #[test]
    fn a_paced_load_counts_every_refused_request() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let load = PacedLoad::start(addr, 2, Duration::from_millis(1), Duration::from_secs(30));
        load.wait_progress(50, Duration::from_secs(30));
        let s = load.stop();
        assert!(s.failed >= 50, "{s:?}");
        assert_eq!(s.failures.refused, s.failed, "{s:?}");
        assert_eq!((s.ok, s.wrong), (0, 0));
        assert_eq!(s.errors.len(), crate::load::MAX_KEPT_ERRORS);
    }

    #[test]
    fn the_recap_is_read_line_by_line() {
        let out = "PLAY RECAP *****\n\
                   h1 : ok=7    changed=4    unreachable=0    failed=0    skipped=0    rescued=0    ignored=0   \n\
                   h2 : ok=6    changed=4    unreachable=0    failed=1    skipped=0    rescued=1    ignored=0\n\n";
        let r = play_recap(out);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r["h2"],
            Recap {
                ok: 6,
                changed: 4,
                failed: 1,
                rescued: 1,
                ..Recap::default()
            }
        );
    }
}
