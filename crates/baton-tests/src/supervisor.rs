//! `baton run` under test: started in its own temp dir on a free port,
//! driven with the real `baton` CLI, and torn down with everything it
//! started (each generation runs in a process group of its own).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use baton::control::StatusReport;

use crate::{TestDir, Version, apps, free_port, http, init, proc, wait_for};

/// Options for [`Supervised::start`].
#[derive(Debug, Clone, Default)]
pub struct RunOpts {
    /// `--ready` (`{addr}` is replaced by the `http` listener's address).
    pub ready: Option<String>,
    /// More `baton run` arguments (before `--`; `{addr}` is replaced too).
    pub args: Vec<String>,
    /// Environment for baton (and so for the app).
    pub env: Vec<(String, String)>,
    /// The app's command line.
    pub command: Vec<String>,
    /// Do not wait for generation 1 to serve.
    pub no_wait: bool,
    /// No `http` TCP listener (give others in `args`).
    pub no_tcp: bool,
    /// No `--control`: the default path from `--name` under
    /// `XDG_RUNTIME_DIR=<test dir>/xdg` (so `<test dir>/xdg/baton/NAME.sock`).
    pub default_control: bool,
    /// Run this `baton` binary instead of the freshly built one (a copy,
    /// for `baton upgrade --self` to replace).
    pub bin: Option<PathBuf>,
}

/// The output of one `baton` CLI call.
#[derive(Debug, Clone)]
pub struct CliOut {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOut {
    /// stdout parsed as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {self:?}"))
    }
}

/// A `baton run` supervisor under test.
#[derive(Debug)]
pub struct Supervised {
    pub dir: TestDir,
    /// The `http` listener.
    pub addr: SocketAddr,
    pub control: PathBuf,
    pub log: PathBuf,
    pub pid: u32,
    child: Option<Child>,
}

/// Run the `baton` CLI.
pub fn baton_cli(args: &[&str]) -> CliOut {
    baton_cli_with(Command::new(apps::baton_bin()).args(args))
}

/// Run a prepared `baton` command line.
pub fn baton_cli_with(cmd: &mut Command) -> CliOut {
    let out = crate::output(cmd.stdin(Stdio::null())).expect("running baton");
    CliOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Start `baton upgrade --control PATH ARGS...` for `sup` in a thread (to
/// act on the supervisor while the upgrade runs); returns its handle.
pub fn upgrade_in_thread(sup: &Supervised, args: &[&str]) -> std::thread::JoinHandle<CliOut> {
    let control = sup.control.clone();
    let args = apps::strings(args);
    std::thread::spawn(move || {
        let mut a = vec![
            "upgrade".to_string(),
            "--control".into(),
            control.display().to_string(),
        ];
        a.extend(args);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        baton_cli(&a)
    })
}

impl Supervised {
    /// Start `baton run --listen http=127.0.0.1:PORT ... -- COMMAND` and wait
    /// until generation 1 serves.
    pub fn start(name: &str, opts: RunOpts) -> Supervised {
        init();
        let dir = TestDir::new(name);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join("baton.log");
        let mut cmd = Command::new(opts.bin.clone().unwrap_or_else(apps::baton_bin));
        cmd.arg("run").arg("--name").arg(name);
        let control = if opts.default_control {
            let xdg = dir.join("xdg");
            cmd.env("XDG_RUNTIME_DIR", &xdg)
                .env_remove("RUNTIME_DIRECTORY");
            xdg.join(format!("baton/{name}.sock"))
        } else {
            let control = dir.join("ctl/control.sock");
            cmd.arg("--control").arg(&control);
            control
        };
        if !opts.no_tcp {
            cmd.arg("--listen").arg(format!("http={addr}"));
        }
        if let Some(r) = &opts.ready {
            cmd.arg("--ready")
                .arg(r.replace("{addr}", &addr.to_string()));
        }
        cmd.args(
            opts.args
                .iter()
                .map(|a| a.replace("{addr}", &addr.to_string())),
        )
        .arg("--")
        .args(&opts.command);
        for k in [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "BATON_LOG",
        ] {
            cmd.env_remove(k);
        }
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&dir.path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("baton.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = crate::spawn_owned(&mut cmd).expect("starting baton run");
        let s = Supervised {
            pid: child.id(),
            dir,
            addr,
            control,
            log,
            child: Some(child),
        };
        if !opts.no_wait {
            s.wait_generation(1, Duration::from_secs(30));
        }
        s
    }

    /// Status over the control socket, if it answers.
    pub fn try_status(&self) -> Option<StatusReport> {
        crate::try_control_status(&self.control)
    }

    /// Status over the control socket.
    pub fn status(&self) -> StatusReport {
        self.try_status().expect("baton status")
    }

    /// Wait until `generation` serves (status says so, and `/version` on
    /// the `http` listener answers from it).
    pub fn wait_generation(&self, generation: u64, timeout: Duration) -> Version {
        wait_for(
            timeout,
            &format!("generation {generation} to serve"),
            || {
                let st = self.try_status()?;
                if st.phase != "serving" || st.generation != generation {
                    return None;
                }
                let v = self.try_version()?;
                (v.generation == generation).then_some(v)
            },
        )
    }

    /// `GET /version` on a new connection.
    pub fn try_version(&self) -> Option<Version> {
        let r = http::get(self.addr, "/version").ok()?;
        (r.status == 200).then(|| Version::parse(&r.body))?
    }

    /// `GET /version` on a new connection.
    pub fn version(&self) -> Version {
        self.try_version().expect("GET /version")
    }

    /// `baton SUBCOMMAND --control PATH ARGS...`.
    pub fn cli(&self, sub: &str, args: &[&str]) -> CliOut {
        baton_cli_with(
            Command::new(apps::baton_bin())
                .arg(sub)
                .arg("--control")
                .arg(&self.control)
                .args(args),
        )
    }

    /// `baton upgrade --control PATH ARGS...`.
    pub fn upgrade(&self, args: &[&str]) -> CliOut {
        self.cli("upgrade", args)
    }

    /// `baton upgrade`, asserting it succeeded; returns the new
    /// generation's `/version`.
    pub fn upgrade_ok(&self) -> Version {
        let before = self.status().generation;
        let out = self.upgrade(&[]);
        assert_eq!(
            out.code,
            0,
            "baton upgrade failed: {out:?}\n{}",
            self.log_text()
        );
        let st = self.status();
        assert!(st.generation > before, "{st:?}");
        self.wait_generation(st.generation, Duration::from_secs(30))
    }

    /// The supervisor's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send a signal to `baton run` itself.
    pub fn signal(&self, sig: rustix::process::Signal) {
        proc::signal(self.pid, sig);
    }

    /// Wait for `baton run` to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        crate::wait_owned(child, timeout)
    }

    /// Kill the serving generation (SIGKILL) and wait until a restarted
    /// one serves, with `restarts` restarts counted in all.
    pub fn kill_serving_and_wait_restart(&self, restarts: u64, timeout: Duration) {
        let st = self.status();
        proc::signal(st.pid, rustix::process::Signal::KILL);
        wait_for(timeout, "the restarted generation", || {
            let st = self.try_status()?;
            (st.phase == "serving" && st.counters.restarts == restarts).then_some(())
        });
    }

    /// A path in this test's directory.
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }
}

/// Kill `pid` and everything in the process groups of its descendants —
/// except the test's own group: a descendant that never left it (`unshare`
/// and what it forks, for one) would otherwise take the test down with it,
/// and a failing test would die by SIGKILL before reporting.
pub fn kill_tree(pid: u32) {
    let desc = proc::descendants(pid);
    let own = proc::pgid(std::process::id());
    proc::signal(pid, rustix::process::Signal::KILL);
    for d in &desc {
        if let Some(g) = proc::pgid(*d).filter(|g| Some(*g) != own) {
            let _ = baton_sys::process::kill_group(g, rustix::process::Signal::KILL);
        }
        proc::signal(*d, rustix::process::Signal::KILL);
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- baton log ({}) -----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let desc = proc::descendants(self.pid);
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                proc::signal(self.pid, rustix::process::Signal::TERM);
                if crate::wait_owned(&mut c, Duration::from_secs(10)).is_none() {
                    kill_tree(self.pid);
                    let _ = crate::wait_owned(&mut c, Duration::from_secs(5));
                }
            }
        }
        for d in desc {
            if proc::alive(d) {
                kill_tree(d);
            }
        }
    }
}
