//! `baton run --front http --front-upstream unix`: the front reaches each
//! generation over a Unix stream socket of its own (passed at fd 3 through
//! `LISTEN_FDS` like the TCP one), in a private directory next to the
//! control socket. Keep-alive clients see no error across app upgrades and
//! `baton upgrade --self`; a WebSocket keeps working across an upgrade; a
//! retired generation's socket path is removed, the serving one's is not;
//! bad input is refused with a clear message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use apps::uvicorn_cmd as uvicorn_app;
use apps::{go_server_cmd as go_app, gunicorn_cmd as gunicorn_app, node_server_cmd as node_app};
use baton_tests::apps::{self, strings as s};
use baton_tests::keepalive::{Clients, compile_java};
use baton_tests::supervisor::{RunOpts, Supervised, upgrade_in_thread};
use baton_tests::ws::{Lang, WsClients};
use baton_tests::{TestDir, wait_for};

const T: Duration = Duration::from_secs(30);

/// The private directory of the generations' sockets.
fn upstream_dir(sup: &Supervised, name: &str) -> PathBuf {
    sup.control
        .parent()
        .unwrap()
        .join(format!("{name}.upstream"))
}

/// The socket files in `dir`, sorted.
fn sockets_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The inode of the Unix socket bound at `path` (`/proc/net/unix`).
fn unix_inode_at(path: &Path) -> String {
    let text = std::fs::read_to_string("/proc/net/unix").unwrap();
    text.lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(7).copied() == path.to_str()).then(|| f[6].to_owned())
        })
        .unwrap_or_else(|| panic!("no Unix socket bound at {}", path.display()))
}

/// `ready`: `--ready http://PUBLIC/health` (sent over the new
/// generation's Unix socket), or the default `tcp` (a connect to it that
/// the app accepts).
fn unix_front(
    name: &str,
    app: Vec<String>,
    more: &[&str],
    bin: Option<PathBuf>,
    http_ready: bool,
) -> Supervised {
    let mut args = s(&["--front", "http", "--front-upstream", "unix"]);
    args.extend(s(more));
    Supervised::start(
        name,
        RunOpts {
            ready: http_ready.then(|| "http://{addr}/health".to_owned()),
            args,
            command: app,
            bin,
            ..RunOpts::default()
        },
    )
}

/// The three keep-alive clients (GET and POST) across two app upgrades,
/// then (`self_too`) `baton upgrade --self` and one more app upgrade: no
/// client error. After each upgrade exactly the serving generation's
/// socket file exists (the retired ones are removed), the directory is
/// 0700, and the app's fd 3 is a Unix socket.
fn clients_across_upgrades(name: &str, app: Vec<String>, self_too: bool) {
    let bin_dir = TestDir::new(&format!("{name}-bin"));
    let bin = self_too.then(|| {
        std::fs::create_dir_all(bin_dir.join("bin")).unwrap();
        let p = bin_dir.join("bin/baton");
        baton_tests::copy_exe(&apps::baton_bin(), &p);
        p
    });
    let sup = unix_front(name, app, &[], bin, true);
    let dir = upstream_dir(&sup, name);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(sockets_in(&dir), vec!["http.1.sock".to_owned()]);
    // The app holds the socket bound at that path (gunicorn's master
    // moves it off fd 3, so every fd is looked at).
    let inode = unix_inode_at(&dir.join("http.1.sock"));
    let pid = sup.status().pid;
    let held = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| l.to_string_lossy() == format!("socket:[{inode}]"));
    assert!(
        held,
        "{name}: the app (pid {pid}) holds the Unix socket {inode}"
    );
    let java_cp = compile_java(&sup.dir.path);
    let url = format!("http://{}/", sup.addr);
    let clients = Clients::start(&["GET", "POST"], &url, &sup.dir, &java_cp);
    clients.wait_total(20, "every client to complete requests");
    let mut generation = 1;
    for i in 0..2 {
        let out = sup.upgrade(&["--json"]);
        assert_eq!(out.code, 0, "{name}: upgrade {i} failed: {out:?}");
        generation += 1;
        assert_eq!(
            sockets_in(&dir),
            vec![format!("http.{generation}.sock")],
            "{name}: only the serving generation's socket is left"
        );
        clients.wait_more(10, "every client to go on after the upgrade");
    }
    if self_too {
        let out = sup.upgrade(&["--self", "--json", "--timeout", "60s"]);
        assert_eq!(out.code, 0, "{name}: --self failed: {out:?}");
        clients.wait_more(10, "every client to go on after --self");
        let out = sup.upgrade(&["--json"]);
        assert_eq!(out.code, 0, "{name}: upgrade after --self failed: {out:?}");
        generation += 1;
        assert_eq!(
            sockets_in(&dir),
            vec![format!("http.{generation}.sock")],
            "{name}: the carried paths: the retired one removed after --self"
        );
        clients.wait_more(10, "every client to go on after the upgrade");
    }
    let counts = clients.finish();
    for c in &counts {
        eprintln!(
            "{name}: {}: {} ok, {} errors {} {}",
            c.label, c.ok, c.errors, c.kinds, c.samples
        );
        assert!(c.ok > 0, "{name}: {} completed no request", c.label);
        assert_eq!(
            c.errors, 0,
            "{name}: {} failed {} requests: {} {}",
            c.label, c.errors, c.kinds, c.samples
        );
    }
    let mut sup = sup;
    sup.signal(rustix::process::Signal::TERM);
    assert!(sup.wait_exit(T).is_some(), "baton exits on SIGTERM");
    assert!(!dir.exists(), "baton's stop removes the directory");
}

#[test]
fn keepalive_clients_through_a_unix_upstream_see_no_errors_across_go_upgrades_and_self() {
    clients_across_upgrades("unix-go", go_app(), true);
}

#[test]
fn keepalive_clients_through_a_unix_upstream_see_no_errors_across_node_upgrades() {
    clients_across_upgrades("unix-node", node_app(), false);
}

/// gunicorn takes the Unix socket through its systemd socket activation
/// (`LISTEN_FDS`), uvicorn through `--fd 3`.
#[test]
fn keepalive_clients_through_a_unix_upstream_see_no_errors_across_gunicorn_and_uvicorn_upgrades() {
    clients_across_upgrades("unix-gunicorn", gunicorn_app(), false);
    clients_across_upgrades("unix-uvicorn", uvicorn_app(), false);
}

/// A generation killed under load, three times: the keep-alive GET clients
/// see no error (requests in flight are retried, the restarted generation
/// gets the same socket, whose queue kept the new connections), and the
/// path stays the first generation's.
#[test]
fn get_clients_through_a_unix_upstream_see_no_errors_when_the_generation_is_killed() {
    let sup = unix_front("unix-crash", node_app(), &[], None, true);
    let dir = upstream_dir(&sup, "unix-crash");
    let java_cp = compile_java(&sup.dir.path);
    let url = format!("http://{}/", sup.addr);
    let clients = Clients::start(&["GET"], &url, &sup.dir, &java_cp);
    clients.wait_total(20, "every client to complete requests");
    for i in 1..=3u64 {
        sup.kill_serving_and_wait_restart(i, T);
        clients.wait_more(10, "every client to go on after the restart");
        assert_eq!(sockets_in(&dir), vec!["http.1.sock".to_owned()]);
    }
    let counts = clients.finish();
    for c in &counts {
        eprintln!(
            "unix-crash: {}: {} ok, {} errors {} {}",
            c.label, c.ok, c.errors, c.kinds, c.samples
        );
        assert!(c.ok > 0, "unix-crash: {} completed no request", c.label);
        assert_eq!(
            c.errors, 0,
            "unix-crash: {}: {} {}",
            c.label, c.kinds, c.samples
        );
    }
}

/// A WebSocket opened before an upgrade keeps working over the old
/// generation's Unix socket; the old generation is stopped once it closes,
/// and only then its socket path goes.
#[test]
fn a_websocket_through_a_unix_upstream_keeps_working_across_an_upgrade() {
    // The default readiness check (tcp) over the Unix socket.
    let sup = unix_front(
        "unix-ws",
        node_app(),
        &["--drain-timeout", "60s"],
        None,
        false,
    );
    let dir = upstream_dir(&sup, "unix-ws");
    let gen1 = sup.status().pid;
    let url = format!("ws://{}/ws", sup.addr);
    let old = WsClients::start(
        Lang::Node,
        &url,
        2,
        Duration::from_millis(50),
        Duration::from_secs(120),
    );
    old.wait_ready(T);
    old.wait_all_answered_by(gen1, T);
    let up = upgrade_in_thread(&sup, &["--json"]);
    wait_for(T, "generation 2 to take new requests", || {
        (sup.try_version()?.generation == 2).then_some(())
    });
    // Both generations live: both paths exist while the tunnels hold the
    // old one.
    let since = old.answers();
    old.wait_more_answers(&since, 10, T);
    assert_eq!(
        sockets_in(&dir),
        vec!["http.1.sock".to_owned(), "http.2.sock".to_owned()]
    );
    let reports = old.finish(T);
    let out = up.join().unwrap();
    assert_eq!(out.code, 0, "upgrade: {out:?}");
    assert_eq!(out.json()["closed_at_deadline"], 0, "{out:?}");
    for r in &reports {
        assert!(r.answers > 0 && r.answers == r.sent, "{r:?}");
        assert_eq!((r.seq_errors, r.echo_errors), (0, 0), "{r:?}");
        assert!(r.errors.is_empty() && r.closes.is_empty(), "{r:?}");
        assert_eq!(r.pids, vec![gen1], "{r:?}");
    }
    assert_eq!(sockets_in(&dir), vec!["http.2.sock".to_owned()]);
}

/// Bad input: `--front-upstream` without `--front`, `--canary` with a Unix
/// upstream, and a directory baton cannot create are refused at start with
/// a clear message, and nothing is left running.
#[test]
fn a_unix_upstream_without_front_with_canary_or_in_an_unwritable_directory_is_refused() {
    let dir = TestDir::new("unix-bad");
    let port = baton_tests::free_port();
    let listen = format!("http=127.0.0.1:{port}");
    // Each must exit at start: bounded, and a baton that started anyway is
    // killed and reported.
    let run = |extra: &[&str], control: &Path| {
        let err = dir.join("stderr.txt");
        let mut cmd = std::process::Command::new(apps::baton_bin());
        cmd.args(["run", "--name", "unix-bad", "--control"])
            .arg(control)
            .args(["--listen", &listen])
            .args(extra)
            .arg("--")
            .args(go_app())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap());
        let mut child = baton_tests::spawn_owned(&mut cmd).unwrap();
        let status = baton_tests::wait_for_opt(T, || child.try_wait().unwrap());
        let Some(status) = status else {
            baton_tests::supervisor::kill_tree(child.id());
            let _ = child.wait();
            panic!(
                "baton {extra:?} did not exit at start: {}",
                std::fs::read_to_string(&err).unwrap()
            );
        };
        (
            status.code().unwrap_or(-1),
            std::fs::read_to_string(&err).unwrap(),
        )
    };
    let ctl = dir.join("ctl/control.sock");
    std::fs::create_dir_all(ctl.parent().unwrap()).unwrap();
    let (code, err) = run(&["--front-upstream", "unix"], &ctl);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--front"), "{err}");
    let (code, err) = run(
        &[
            "--front",
            "http",
            "--front-upstream",
            "unix",
            "--canary",
            "5s",
        ],
        &ctl,
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--canary cannot be used with --front-upstream unix"),
        "{err}"
    );
    // A directory baton cannot create (its parent is a file; the suite may
    // run as root, which a mode would not stop).
    let file = dir.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let (code, err) = run(
        &["--front", "http", "--front-upstream", "unix"],
        &file.join("control.sock"),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot create the private directory"), "{err}");
    // The port is free again: nothing kept it.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port was released");
}
