//! Helpers for baton's process-level tests: unique temp dirs and ports,
//! a server under test, a raw HTTP/1.1 client, a no-retry load client,
//! and process inspection. Every wait has a timeout.
//!
//! The test process makes itself a child subreaper and reaps every orphan
//! in a background thread, so "no zombie" never depends on the machine's
//! PID 1 (old generations are reparented to the test). Children the test
//! waits for itself ([`spawn_owned`], [`output`]) are left to their owner:
//! a reaper that took them would leave `try_wait` waiting forever.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod apps;
pub mod fixture;
pub mod fleet;
pub mod h2load;
pub mod h2node;
pub mod http;
pub mod keepalive;
pub mod load;
pub mod notify;
pub mod openmetrics;
pub mod proc;
pub mod supervisor;
pub mod tls;
pub mod tls_matrix;
pub mod ws;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Children this process waits for itself (`output`, `spawn_owned`): the
/// reaper leaves them alone, or their owner's `wait` would fail with
/// ECHILD.
static OWNED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn owned() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    OWNED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Our direct children (orphans reparented to us included), from
/// `/proc/self/task/*/children`; `None` if the kernel does not have it.
fn our_children() -> Option<Vec<u32>> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    let mut out = Vec::new();
    let mut any = false;
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            any = true;
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    any.then_some(out)
}

/// Reap every zombie child nobody else waits for.
fn reap_orphans() {
    let Some(children) = our_children() else {
        // No /proc/PID/task/TID/children: reap anything (owned children may
        // then see ECHILD).
        while let Ok(Some(_)) = baton_sys::process::reap_any() {}
        return;
    };
    let owned = owned();
    for pid in children {
        if owned.contains(&pid) || proc::state(pid) != Some('Z') {
            continue;
        }
        if let Some(p) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG);
        }
    }
}

/// Make this test process a subreaper and start the reaper thread (once).
pub fn init() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        baton_sys::process::set_child_subreaper().expect("PR_SET_CHILD_SUBREAPER");
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(|| {
                loop {
                    reap_orphans();
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .expect("reaper thread");
    });
}

/// Held while this test process forks or writes a file that will be
/// executed: a child forked while another thread has an executable open for
/// writing inherits that fd until its own `exec`, and an `exec` of the file
/// meanwhile fails with ETXTBSY.
static EXEC_LOCK: Mutex<()> = Mutex::new(());

/// Spawn a command under the exec lock.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let _g = EXEC_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    cmd.spawn()
}

/// Run a command to completion under the exec lock (for the fork).
pub fn output(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    let child = spawn_owned(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))?;
    let pid = child.id();
    let out = child.wait_with_output();
    owned().remove(&pid);
    out
}

/// Spawn a command whose exit status this test will read with
/// [`wait_owned`] (the reaper leaves it alone).
pub fn spawn_owned(cmd: &mut Command) -> std::io::Result<Child> {
    // Registered under the reaper's lock, so it cannot be reaped between
    // the fork and the registration.
    let mut owned = owned();
    let child = {
        let _g = EXEC_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        cmd.spawn()?
    };
    owned.insert(child.id());
    Ok(child)
}

/// Wait up to `timeout` for a child started with [`spawn_owned`].
pub fn wait_owned(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let st = wait_for_opt(timeout, || child.try_wait().ok().flatten());
    if st.is_some() {
        owned().remove(&child.id());
    }
    st
}

/// Copy an executable under the exec lock.
pub fn copy_exe(from: &Path, to: &Path) {
    let _g = EXEC_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    std::fs::copy(from, to).unwrap();
}

/// Write an executable file under the exec lock.
pub fn write_exe(to: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let _g = EXEC_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    std::fs::write(to, contents).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A unique temporary directory, removed on drop (kept if
/// `BATON_KEEP_TEST_DIRS` is set).
#[derive(Debug)]
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let base = std::env::var_os("BATON_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let path = base.join(format!(
            "baton-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("BATON_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    // Hand out ports from the ephemeral range's neighbourhood but check each
    // by binding; never reuse one within this process.
    static USED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut used = USED.lock().unwrap();
        if !used.contains(&port) {
            used.push(port);
            return port;
        }
    }
}

/// Poll `f` every 10 ms until it returns `Some`, or panic after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A binary built by this workspace: integration tests of this crate get
/// theirs from `CARGO_BIN_EXE_*`; this finds them next to the test binary.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built (run the tests with `cargo test --workspace` or nextest)",
        p.display()
    );
    p
}

/// Options for [`Server::start`].
#[derive(Debug, Clone)]
pub struct ServerOpts {
    /// Extra arguments.
    pub args: Vec<String>,
    /// Listen on a TCP port (default) — set false for Unix-only.
    pub tcp: bool,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Add `--health http://ADDR{path}` (the server's own address).
    pub health_path: Option<String>,
    /// Run the server through this command prefix (`{addr}` is replaced by
    /// the listen address), e.g. `systemd-socket-activate -l {addr}`.
    pub wrapper: Vec<String>,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            args: Vec::new(),
            tcp: true,
            env: Vec::new(),
            health_path: None,
            wrapper: Vec::new(),
        }
    }
}

/// A library-mode server under test (the fixture binary, copied into its
/// own directory so the test can replace it like a deploy would).
#[derive(Debug)]
pub struct Server {
    pub dir: TestDir,
    pub exe: PathBuf,
    pub addr: SocketAddr,
    pub pid_file: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    pub fault_file: PathBuf,
    first: Option<Child>,
}

/// `/version` of a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub pid: u32,
    pub generation: u64,
    pub version: String,
    pub peer: String,
    pub handed_over: bool,
}

impl Version {
    pub fn parse(body: &[u8]) -> Option<Version> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        Some(Version {
            pid: v["pid"].as_u64()? as u32,
            generation: v["generation"].as_u64()?,
            version: v["version"].as_str()?.to_owned(),
            peer: v["peer"].as_str().unwrap_or_default().to_owned(),
            handed_over: v["handed_over"].as_bool().unwrap_or(false),
        })
    }
}

impl Server {
    /// Start `binary` with the default options.
    pub fn start(binary: &Path, name: &str) -> Server {
        Self::start_with(binary, name, ServerOpts::default())
    }

    /// Start `binary` (copied into a fresh test dir) listening on a free port.
    pub fn start_with(binary: &Path, name: &str, opts: ServerOpts) -> Server {
        init();
        let dir = TestDir::new(name);
        let exe = dir.join("server");
        copy_exe(binary, &exe);
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let pid_file = dir.join("server.pid");
        let control = dir.join("ctl/control.sock");
        let log = dir.join("server.log");
        let fault_file = dir.join("fault");
        let mut cmd = match opts.wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest.iter().map(|a| a.replace("{addr}", &addr.to_string())));
                c.arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        if opts.tcp {
            cmd.arg("--listen").arg(addr.to_string());
        }
        if let Some(p) = &opts.health_path {
            cmd.arg("--health").arg(format!("http://{addr}{p}"));
        }
        cmd.arg("--pid-file")
            .arg(&pid_file)
            .arg("--control")
            .arg(&control)
            .args(&opts.args)
            .env("BATON_FIXTURE_FAULT_FILE", &fault_file)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("server.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let first = spawn(&mut cmd).unwrap();
        let s = Server {
            dir,
            exe,
            addr,
            pid_file,
            control,
            log,
            fault_file,
            first: Some(first),
        };
        s.wait_serving(Duration::from_secs(20));
        s
    }

    /// Wait until the pid file names a live process and (for TCP) `/health`
    /// answers.
    pub fn wait_serving(&self, timeout: Duration) {
        wait_for(timeout, "the server to serve", || {
            // Probe first: a socket-activating wrapper starts the server on
            // the first connection.
            if self.addr.port() != 0 {
                let r = http::get(self.addr, "/health").ok()?;
                if r.status != 200 {
                    return None;
                }
            }
            let pid = self.try_pid()?;
            proc::alive(pid).then_some(())
        });
    }

    pub fn try_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The pid in the pid file.
    pub fn pid(&self) -> u32 {
        self.try_pid().expect("pid file")
    }

    /// `GET /version` on a new connection.
    pub fn version(&self) -> Version {
        let r = http::get(self.addr, "/version").expect("GET /version");
        assert_eq!(r.status, 200, "GET /version: {r:?}");
        Version::parse(&r.body).expect("version json")
    }

    /// Arm a fault for the next generation (see `fixture`).
    pub fn arm_fault(&self, fault: &str) {
        std::fs::write(&self.fault_file, fault).unwrap();
    }

    /// Replace the executable on disk, atomically, like a deploy.
    pub fn replace_binary(&self, from: &Path) {
        let tmp = self.dir.join("server.new");
        copy_exe(from, &tmp);
        std::fs::rename(&tmp, &self.exe).unwrap();
    }

    /// Replace the executable with a shell script.
    pub fn replace_with_script(&self, script: &str) {
        let tmp = self.dir.join("server.new");
        write_exe(&tmp, script.as_bytes());
        std::fs::rename(&tmp, &self.exe).unwrap();
    }

    /// Send SIGUSR2 to the serving generation.
    pub fn usr2(&self) {
        proc::signal(self.pid(), rustix::process::Signal::USR2);
    }

    /// Trigger an upgrade with SIGUSR2 and wait until the next generation
    /// serves and the old process is gone. Returns the new `/version`.
    pub fn upgrade(&self, timeout: Duration) -> Version {
        let before = self.version();
        let old = self.pid();
        assert_eq!(old, before.pid);
        self.usr2();
        self.wait_upgraded(old, before.generation, timeout)
    }

    /// Wait for the generation after `old_generation` to serve and `old_pid`
    /// to be gone.
    pub fn wait_upgraded(&self, old_pid: u32, old_generation: u64, timeout: Duration) -> Version {
        let v = wait_for(timeout, "the next generation to serve", || {
            let p = self.try_pid()?;
            if p == old_pid {
                return None;
            }
            let v = Version::parse(&http::get(self.addr, "/version").ok()?.body)?;
            (v.generation == old_generation + 1 && v.pid == p).then_some(v)
        });
        wait_for(timeout, "the old generation to exit", || {
            (!proc::alive(old_pid)).then_some(())
        });
        v
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every live process running our copy of the binary (all generations).
    pub fn processes(&self) -> Vec<u32> {
        proc::processes_with_exe_prefix(&self.dir.path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- server log ({}) -----\n{}",
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
        let _ = wait_for_opt(Duration::from_secs(5), || {
            self.processes().is_empty().then_some(())
        });
    }
}

/// Like [`wait_for`] but returns `None` on timeout instead of panicking.
pub fn wait_for_opt<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run an async block on a small runtime (for the control client).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Ask a control socket for status.
pub fn control_status(path: &Path) -> baton::control::StatusReport {
    match control_call(path, &baton::control::Request::Status, |_| {}) {
        baton::control::Reply::Status(s) => *s,
        other => panic!("unexpected reply {other:?}"),
    }
}

/// Status over a control socket, if it answers within 5 s.
pub fn try_control_status(path: &Path) -> Option<baton::control::StatusReport> {
    block_on(async {
        let c = baton::control::Client::connect(path).await.ok()?;
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            c.call(&baton::control::Request::Status, |_| {}),
        )
        .await
        .ok()?
        .ok()?;
        match reply {
            baton::control::Reply::Status(s) => Some(*s),
            _ => None,
        }
    })
}

/// One request over a control socket and its final answer (progress events
/// to `on_event`), within 300 s; panics on I/O errors.
pub fn control_call(
    path: &Path,
    req: &baton::control::Request,
    on_event: impl FnMut(&baton::control::Event),
) -> baton::control::Reply {
    control_call_within(path, req, on_event, Duration::from_secs(300))
}

/// [`control_call`] with its own bound.
pub fn control_call_within(
    path: &Path,
    req: &baton::control::Request,
    on_event: impl FnMut(&baton::control::Event),
    timeout: Duration,
) -> baton::control::Reply {
    block_on(async {
        let c = baton::control::Client::connect(path).await.unwrap();
        tokio::time::timeout(timeout, c.call(req, on_event))
            .await
            .unwrap_or_else(|_| panic!("no answer from {} within {timeout:?}", path.display()))
            .unwrap()
    })
}

/// An upgrade with default options over a control socket: its answer.
pub fn control_upgrade(path: &Path) -> baton::control::Reply {
    control_call(
        path,
        &baton::control::Request::Upgrade(Default::default()),
        |_| {},
    )
}
