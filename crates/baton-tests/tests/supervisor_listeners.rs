//! Issue 5 (supervisor mode): the sockets of `baton run`. What the app
//! inherits (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`, no other fd), a
//! Unix listener shared rather than steered, and baton itself
//! socket-activated: a socket without SO_REUSEPORT is shared, one with it
//! is steered.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use baton_tests::apps::{pyapp, strings as s};
use baton_tests::load::{Load, Mode};
use baton_tests::supervisor::{RunOpts, Supervised, baton_cli};
use baton_tests::{apps, http, proc, wait_for};
use rustix::process::Signal;

const T: Duration = Duration::from_secs(30);

/// `LISTEN_PID` is the app's own pid, `LISTEN_FDS`/`LISTEN_FDNAMES` list
/// the listeners in order, and nothing else leaks into the app.
#[test]
fn listen_pid_is_the_childs_own_pid_and_only_the_sockets_are_inherited() {
    let dir = baton_tests::TestDir::new("listen-pid-unix");
    let sock = dir.join("admin.sock");
    let sup = Supervised::start(
        "listen-pid",
        RunOpts {
            args: s(&["--listen", &format!("admin=unix:{}", sock.display())]),
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    for _ in 0..2 {
        let v: serde_json::Value =
            serde_json::from_slice(&http::get(sup.addr, "/version").unwrap().body).unwrap();
        let pid = v["pid"].as_u64().unwrap();
        assert_eq!(v["listen_pid"], pid.to_string(), "{v}");
        assert_eq!(v["listen_fds"], "2", "{v}");
        assert_eq!(v["listen_fdnames"], "http:admin", "{v}");
        // The Unix listener works too (it is fd 4).
        let r = http::get_unix(&sock, "/version").unwrap();
        assert_eq!(r.status, 200);
        sup.upgrade_ok();
    }
    // A process that opens nothing itself: its fds are exactly 0, 1, 2 and
    // the listener (every other fd of baton is close-on-exec).
    let only_unix = baton_tests::TestDir::new("fds");
    let sup2 = Supervised::start(
        "fds",
        RunOpts {
            // A Unix-only service cannot be steered: delay readiness is an
            // alive check.
            args: s(&[
                "--listen",
                &format!("other=unix:{}", only_unix.join("x.sock").display()),
                "--ready",
                "delay=300ms",
            ]),
            command: s(&["sleep", "600"]),
            no_wait: true,
            no_tcp: true,
            ..RunOpts::default()
        },
    );
    let st = wait_for(T, "sleep to serve", || {
        sup2.try_status().filter(|s| s.phase == "serving")
    });
    let fds: BTreeSet<String> = std::fs::read_dir(format!("/proc/{}/fd", st.pid))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        fds,
        BTreeSet::from(["0", "1", "2", "3"].map(String::from)),
        "fds of the app"
    );
    assert_eq!(
        proc::env_var(st.pid, "LISTEN_PID"),
        Some(st.pid.to_string())
    );
    assert_eq!(proc::env_var(st.pid, "NOTIFY_SOCKET"), None);
}

/// Unix sockets cannot be steered: one shared socket, said in status, and
/// upgrades still work over it.
#[test]
fn a_unix_listener_is_shared_and_status_says_so() {
    let dir = baton_tests::TestDir::new("unix-shared");
    let sock = dir.join("api.sock");
    let sup = Supervised::start(
        "unix",
        RunOpts {
            args: s(&["--listen", &format!("api=unix:{}", sock.display())]),
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    let st = sup.status();
    let api = st.listeners.iter().find(|l| l.name == "api").unwrap();
    assert!(api.origin.contains("shared socket, no steering"), "{api:?}");
    assert!(api.origin.contains("Unix"), "{api:?}");
    let http_l = st.listeners.iter().find(|l| l.name == "http").unwrap();
    assert!(http_l.origin.contains("steered"), "{http_l:?}");
    assert!(
        st.notes
            .iter()
            .any(|n| n.contains("'api' is one shared socket")),
        "{:?}",
        st.notes
    );
    assert!(sup.log_text().contains("no steering for this listener"));
    for _ in 0..3 {
        let v = sup.upgrade_ok();
        let r = http::get_unix(&sock, "/version").unwrap();
        let u = baton_tests::Version::parse(&r.body).unwrap();
        assert_eq!(u.pid, v.pid);
    }
}

/// A child that is killed (with everything it started) if the test fails.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            baton_tests::supervisor::kill_tree(self.0.id());
        }
    }
}

/// baton itself socket-activated (systemd-socket-activate stands in for
/// systemd): it uses the inherited socket, which has no SO_REUSEPORT, so
/// it falls back to sharing it and says so; tcp readiness is refused there
/// with a clear message, notify works.
#[test]
fn socket_activated_baton_uses_the_inherited_socket_and_falls_back_to_sharing_it() {
    let activate = apps::in_path("systemd-socket-activate", "apt-get install systemd");
    let port = baton_tests::free_port();
    let dir = baton_tests::TestDir::new("activated");
    let control = dir.join("ctl/c.sock");
    let run = |ready: &str| {
        let mut cmd = std::process::Command::new(&activate);
        cmd.arg("-l")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--fdname=http")
            .arg(apps::baton_bin())
            .args(["run", "--name", "activated", "--control"])
            .arg(&control)
            .args(["--ready", ready, "--"])
            .args(pyapp(&["--notify"]))
            .env_remove("NOTIFY_SOCKET")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("baton.log")).unwrap());
        cmd
    };
    // tcp readiness cannot work on a shared socket: refused at start.
    let mut c = run("tcp");
    let mut child = Reap(baton_tests::spawn_owned(&mut c).unwrap());
    // systemd-socket-activate starts baton at the first connection.
    let _first = wait_for(T, "systemd-socket-activate to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let st = baton_tests::wait_owned(&mut child.0, T).expect("baton exits");
    assert_eq!(st.code(), Some(2), "usage error");
    let log = std::fs::read_to_string(dir.join("baton.log")).unwrap();
    assert!(log.contains("without ReusePort=yes"), "{log}");
    assert!(log.contains("--ready notify"), "{log}");
    // notify readiness works.
    let mut c = run("notify");
    let mut child = Reap(baton_tests::spawn_owned(&mut c).unwrap());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The first connection starts baton and waits in the queue for the app.
    let l = first_listener_once_serving(addr, &control);
    assert!(l.origin.contains("without ReusePort=yes"), "{l:?}");
    // Five upgrades under no-retry `Connection: close` clients: the shared
    // socket's queue outlives every generation, so nothing fails.
    upgrades_under_close_load(addr, &control, 5, "socket-activated baton run");
    let r = http::get(addr, "/version").unwrap();
    let v = baton_tests::Version::parse(&r.body).unwrap();
    assert_eq!(v.generation, 6);
    proc::signal(child.0.id(), Signal::TERM);
    let st = baton_tests::wait_owned(&mut child.0, T).expect("baton exits");
    assert_eq!(st.code(), Some(0));
}

/// Wait for a socket-activated service's first answer; its first listener
/// must be the one systemd passed.
fn first_listener_once_serving(addr: std::net::SocketAddr, control: &Path) -> baton::ListenerInfo {
    let r = wait_for(T, "the first request", || http::get(addr, "/version").ok());
    assert_eq!(r.status, 200);
    let st = baton_tests::control_status(control);
    let l = st.listeners[0].clone();
    assert!(l.origin.contains("inherited from systemd"), "{l:?}");
    l
}

/// `n` upgrades through the control socket under 8 no-retry
/// `Connection: close` clients: none may fail.
fn upgrades_under_close_load(addr: std::net::SocketAddr, control: &Path, n: usize, what: &str) {
    let load = Load::start(addr, Mode::Close, 8, Duration::from_secs(120), u64::MAX);
    wait_for(T, "load", || (load.done() > 20).then_some(()));
    for _ in 0..n {
        let before = load.done();
        let out = baton_cli(&["upgrade", "--control", &control.display().to_string()]);
        assert_eq!(out.code, 0, "{out:?}");
        wait_for(T, "load progress", || {
            (load.done() > before + 20).then_some(())
        });
    }
    let stats = load.stop();
    eprintln!(
        "{what}, {n} upgrades: {} ok, {} failed",
        stats.ok, stats.failed
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
}

/// A socket systemd passes with `ReusePort=yes` is steered like one baton
/// bound itself: baton adds the second socket of the pair to its reuseport
/// group. Here a small activator does what systemd does (bind with
/// SO_REUSEPORT, listen, exec baton with the socket at fd 3 and
/// `LISTEN_PID` = its own pid, which the exec keeps).
#[test]
fn an_inherited_reuseport_socket_is_steered_through_upgrades_under_load() {
    let port = baton_tests::free_port();
    let dir = baton_tests::TestDir::new("activated-reuseport");
    let control = dir.join("ctl/c.sock");
    let activator = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, sys.argv[2] == "inherit")
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="http", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[3], sys.argv[3:])
"#;
    let activate = |mode: &str| {
        let mut cmd = std::process::Command::new(apps::venv_tool("python"));
        cmd.arg("-c")
            .arg(activator)
            .arg(port.to_string())
            .arg(mode)
            .arg(apps::baton_bin())
            .args(["run", "--name", "activated-rp", "--control"])
            .arg(&control)
            .args(["--ready", "notify", "--"])
            .args(pyapp(&["--notify"]))
            .env_remove("NOTIFY_SOCKET")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("baton.log")).unwrap());
        cmd
    };
    // A socket passed close-on-exec is gone in baton: whatever baton opens
    // at fd 3 meanwhile must not be taken for it. A clear error, no crash.
    let mut bad = activate("cloexec");
    let mut child = Reap(baton_tests::spawn_owned(&mut bad).unwrap());
    let st = baton_tests::wait_owned(&mut child.0, T).expect("baton exits");
    let log = std::fs::read_to_string(dir.join("baton.log")).unwrap();
    assert_eq!(st.code(), Some(1), "{st:?}: {log}");
    assert!(
        log.contains("named by LISTEN_FDS is not a listening socket"),
        "{log}"
    );
    let mut cmd = activate("inherit");
    let mut child = Reap(baton_tests::spawn_owned(&mut cmd).unwrap());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let l = first_listener_once_serving(addr, &control);
    assert!(l.origin.contains("steered"), "{l:?}");
    upgrades_under_close_load(addr, &control, 3, "inherited ReusePort socket");
    let v = baton_tests::Version::parse(&http::get(addr, "/version").unwrap().body).unwrap();
    assert_eq!(v.generation, 4);
    proc::signal(child.0.id(), Signal::TERM);
    let st = baton_tests::wait_owned(&mut child.0, T).expect("baton exits");
    assert_eq!(st.code(), Some(0));
}
