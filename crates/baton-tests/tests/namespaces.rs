//! Peer credentials across pid namespaces (issue 18, soundness): the kernel
//! reports pid 0 for a peer that the *reading* process cannot see — a
//! server or `baton run` in a container receiving a control call or a
//! notify datagram from the host, a client in a container asking a server
//! on the host. Each read must cope with pid 0. The reading side runs under
//! `unshare --user --map-root-user --pid --fork --mount-proc`, the peer
//! outside. Needs `unshare` (util-linux) and unprivileged user namespaces
//! (or root).

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_tests::apps::{self, pyapp};
use baton_tests::{Server, TestDir, wait_for};

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const T: Duration = Duration::from_secs(30);

fn unshare() -> Command {
    let mut c = Command::new(apps::in_path("unshare", "apt-get install util-linux"));
    c.args([
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--mount-proc",
    ]);
    c
}

/// `baton status` inside a new pid namespace, asking a server outside it:
/// the client reads the server's credentials and gets pid 0.
#[test]
fn a_client_in_a_pid_namespace_talks_to_a_server_outside() {
    let s = Server::start(Path::new(FIXTURE), "ns-client");
    let out = baton_tests::output(
        unshare()
            .arg(apps::baton_bin())
            .args(["status", "--json", "--control"])
            .arg(&s.control),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?} {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["pid"].as_u64(), Some(u64::from(s.pid())), "{v}");
}

/// `baton run` inside a new pid namespace: its notify socket gets a
/// datagram from a process outside (pid 0 to it), ignores it and says so,
/// and goes on serving; a control call from outside is answered too.
#[test]
fn baton_run_in_a_pid_namespace_ignores_a_notification_from_outside() {
    let dir = TestDir::new("ns-run");
    let control = dir.join("ctl/c.sock");
    let port = baton_tests::free_port();
    let log = dir.join("baton.log");
    let mut cmd = unshare();
    cmd.arg(apps::baton_bin())
        .args(["run", "--name", "nsrun", "--control"])
        .arg(&control)
        .arg("--listen")
        .arg(format!("http=127.0.0.1:{port}"))
        .args(["--ready", "notify", "--"])
        .args(pyapp(&["--notify"]))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = baton_tests::spawn_owned(&mut cmd).unwrap();
    let st = wait_for(T, "baton run to serve", || {
        baton_tests::try_control_status(&control).filter(|s| s.phase == "serving")
    });
    assert_eq!(st.generation, 1);
    let notify = dir.join("ctl/nsrun.notify.1");
    let sender = UnixDatagram::unbound().unwrap();
    sender.send_to(b"STATUS=from outside", &notify).unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(T, "the outside notification to be ignored", || {
        text()
            .lines()
            .find(|l| l.contains("outside generation 1 ignored"))
            .map(str::to_owned)
    });
    assert!(
        text().contains("sender_pid=0"),
        "the sender is pid 0 to it: {}",
        text()
    );
    let st = baton_tests::control_status(&control);
    assert_eq!((st.generation, st.phase.as_str()), (1, "serving"));
    assert_eq!(
        baton_tests::http::get(format!("127.0.0.1:{port}").parse().unwrap(), "/")
            .unwrap()
            .status,
        200
    );
    let _ =
        baton_tests::supervisor::baton_cli(&["stop", "--control", &control.display().to_string()]);
    let st = baton_tests::wait_owned(&mut child, T);
    assert!(st.is_some(), "baton run stopped: {}", text());
}
