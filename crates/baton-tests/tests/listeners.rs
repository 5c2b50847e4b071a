//! Which sockets a generation serves (issue 14, items 2 and 4): every socket
//! systemd passes when no `--listen` is given, whatever its name; a passed
//! socket the program does not use is an error at start, not a silent
//! close; unnamed `--listen` flags get names from their addresses.
//!
//! systemd-socket-activate stands in for systemd: like a `.socket` unit, it
//! names the socket only when told to (`--fdname`), and starts the server
//! at the first connection — which must be answered, not reset.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_tests::load::{Load, Mode};
use baton_tests::{Server, ServerOpts, TestDir, apps, http, proc, wait_for};

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const T: Duration = Duration::from_secs(30);

/// `systemd-socket-activate -l ADDR [--fdname=NAME] fixture ARGS...`, with
/// its stderr in `DIR/server.log`.
struct Activated {
    child: std::process::Child,
    dir: TestDir,
    addr: SocketAddr,
}

impl Activated {
    fn start(name: &str, fdname: Option<&str>, args: &[&str]) -> Activated {
        baton_tests::init();
        let ssa = apps::in_path("systemd-socket-activate", "apt-get install systemd");
        let dir = TestDir::new(name);
        let addr: SocketAddr = format!("127.0.0.1:{}", baton_tests::free_port())
            .parse()
            .unwrap();
        let mut cmd = Command::new(ssa);
        cmd.arg("-l").arg(addr.to_string());
        if let Some(n) = fdname {
            cmd.arg(format!("--fdname={n}"));
        }
        cmd.arg(FIXTURE)
            .arg("--pid-file")
            .arg(dir.join("server.pid"))
            .arg("--control")
            .arg(dir.join("ctl/control.sock"))
            .args(args)
            .env_remove("LISTEN_FDS")
            .env_remove("NOTIFY_SOCKET")
            .env("BATON_FIXTURE_FAULT_FILE", dir.join("fault"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log")).unwrap());
        let child = baton_tests::spawn_owned(&mut cmd).unwrap();
        Activated { child, dir, addr }
    }

    /// The first connection (it starts the server): its one request.
    fn first_request(&self) -> std::io::Result<http::Resp> {
        let mut c = wait_for(T, "systemd-socket-activate to listen", || {
            http::connect(self.addr).ok()
        });
        c.request("GET", "/version", true, b"")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("server.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn control(&self) -> PathBuf {
        self.dir.join("ctl/control.sock")
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Some(p) = self.pid() {
            baton_tests::supervisor::kill_tree(p);
        }
        let _ = self.child.kill();
        let _ = baton_tests::wait_owned(&mut self.child, T);
    }
}

/// No `--listen`: the socket systemd passes is served, named or not, the
/// connection that started the server is answered, and upgrades under load
/// keep it.
fn serves_what_systemd_passes(name: &str, fdname: Option<&str>, expected_name: &str) {
    let a = Activated::start(name, fdname, &[]);
    let first = a
        .first_request()
        .unwrap_or_else(|e| panic!("the connection that started the server: {e}\n{}", a.log()));
    assert_eq!(first.status, 200, "{}", a.log());
    let st = baton_tests::control_status(&a.control());
    assert!(
        st.listeners
            .iter()
            .any(|l| l.name == expected_name && l.origin.contains("systemd")),
        "the passed socket, as {expected_name}: {:?}",
        st.listeners
    );
    assert!(
        !a.log().contains("127.0.0.1:8080"),
        "no default address bound: {}",
        a.log()
    );
    let load = Load::start(
        a.addr,
        Mode::KeepAlive,
        4,
        Duration::from_secs(120),
        u64::MAX,
    );
    load.wait_progress(50, T);
    for _ in 0..3 {
        let old = a.pid().unwrap();
        baton_tests::control_upgrade(&a.control());
        wait_for(T, "the old generation to exit", || {
            (!proc::alive(old)).then_some(())
        });
        load.wait_progress(50, T);
    }
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{:?} {:?}", stats.failures, stats.errors);
    assert_eq!(stats.generations.iter().max(), Some(&4), "{stats:?}");
}

#[test]
fn an_unnamed_activation_socket_is_served_without_listen() {
    serves_what_systemd_passes("ssa-unnamed", None, "unknown");
}

#[test]
fn a_socket_named_after_its_unit_is_served_without_listen() {
    serves_what_systemd_passes(
        "ssa-unit-name",
        Some("baton-demo.socket"),
        "baton-demo.socket",
    );
}

/// With `--listen` naming other listeners, a socket systemd passes and
/// nobody uses is an error at start that names it and says how to name it.
#[test]
fn a_passed_socket_the_program_does_not_use_is_an_error_at_start() {
    let other = format!("api=127.0.0.1:{}", baton_tests::free_port());
    let mut a = Activated::start("ssa-unused", Some("web"), &["--listen", &other]);
    // Start it (its first connection); it must refuse to become ready.
    let _ = a.first_request();
    let st = baton_tests::wait_owned(&mut a.child, T);
    assert!(
        st.is_some_and(|s| !s.success()),
        "exits with an error: {st:?}"
    );
    let log = a.log();
    assert!(log.contains("'web' (127.0.0.1:"), "names it: {log}");
    assert!(
        log.contains("FileDescriptorName="),
        "says how to name it: {log}"
    );
}

/// Two unnamed `--listen` flags: each is named after its address, in any
/// order, and both are served across upgrades.
#[test]
fn two_unnamed_listen_flags_are_named_after_their_addresses() {
    let dir = TestDir::new("two-unnamed-sock");
    let sock = dir.join("app.sock");
    let s = Server::start_with(
        Path::new(FIXTURE),
        "two-unnamed",
        ServerOpts {
            args: vec!["--listen".into(), format!("unix:{}", sock.display())],
            ..ServerOpts::default()
        },
    );
    let names: Vec<String> = baton_tests::control_status(&s.control)
        .listeners
        .into_iter()
        .map(|l| l.name)
        .collect();
    let tcp_name = format!("http-127.0.0.1-{}", s.addr.port());
    let unix_name = format!(
        "http-unix-{}",
        sock.display()
            .to_string()
            .trim_start_matches('/')
            .replace('/', "-")
    );
    assert!(names.contains(&tcp_name), "{names:?}");
    assert!(names.contains(&unix_name), "{names:?}");
    for _ in 0..2 {
        s.upgrade(T);
        assert_eq!(http::get(s.addr, "/version").unwrap().status, 200);
        assert_eq!(http::get_unix(&sock, "/version").unwrap().status, 200);
    }
}

/// A real duplicate says which flag to rename.
#[test]
fn a_duplicate_listener_name_says_which_flag_to_rename() {
    let port = baton_tests::free_port();
    let out = baton_tests::output(
        Command::new(FIXTURE)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}")),
    )
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "--listen 127.0.0.1:{port} and --listen 127.0.0.1:{port}"
        )) && err.contains("another name"),
        "{err}"
    );
}
