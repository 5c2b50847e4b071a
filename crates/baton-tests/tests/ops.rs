//! Issue 7 (library mode): systemd notifications, socket activation, PID 1,
//! metrics that survive upgrades, JSON logs, example units.

use std::path::Path;
use std::time::Duration;

use baton::control::Reply;
use baton_tests::load::{Load, Mode};
use baton_tests::notify::NotifySocket;
use baton_tests::{Server, ServerOpts, TestDir, http, proc, wait_for};

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const T: Duration = Duration::from_secs(60);

fn upgrade(s: &Server) -> Reply {
    baton_tests::control_upgrade(&s.control)
}

fn which(name: &str) -> std::path::PathBuf {
    baton_tests::apps::in_path(name, "see scripts/setup-test-deps.sh")
}

#[test]
fn systemd_notifications_follow_the_protocol_across_a_good_and_a_failed_upgrade() {
    let dir = TestDir::new("notify");
    let sock = NotifySocket::bind(&dir.join("notify.sock"));
    let s = Server::start_with(
        Path::new(FIXTURE),
        "notify",
        ServerOpts {
            env: vec![("NOTIFY_SOCKET".into(), sock.path.display().to_string())],
            ..ServerOpts::default()
        },
    );
    let g1 = s.pid();
    let start = sock.drain(Duration::from_millis(300));
    eprintln!("start: {start:?}");
    assert!(
        start.iter().any(|n| n.pid == g1 && n.has("READY=1")),
        "READY=1 from the first generation"
    );
    assert!(start.iter().all(|n| n.pid == g1));

    // A successful upgrade.
    let r = match upgrade(&s) {
        Reply::Upgraded(r) => r,
        other => panic!("{other:?}"),
    };
    let notes = sock.drain(Duration::from_millis(500));
    eprintln!("upgrade: {notes:?}");
    let pos = |f: &dyn Fn(&baton_tests::notify::Note) -> bool| notes.iter().position(f);
    let reloading = pos(&|n| n.has("RELOADING=1")).expect("RELOADING=1");
    assert_eq!(notes[reloading].pid, g1);
    assert!(
        notes[reloading].has("MONOTONIC_USEC="),
        "MONOTONIC_USEC with RELOADING=1"
    );
    let mainpid = pos(&|n| n.has(&format!("MAINPID={}", r.new_pid))).expect("MAINPID=<new>");
    assert_eq!(notes[mainpid].pid, g1, "sent by the old main pid");
    assert!(
        notes[mainpid].has("READY=1"),
        "MAINPID and READY=1 in one datagram"
    );
    assert!(notes[mainpid].has("STATUS="), "STATUS= with it");
    let barrier = pos(&|n| n.has("BARRIER=1")).expect("BARRIER=1");
    assert_eq!(notes[barrier].pid, g1);
    assert_eq!(notes[barrier].fds, 1, "BARRIER=1 carries a pipe fd");
    assert!(reloading < mainpid && mainpid < barrier, "order");
    assert!(
        !notes.iter().any(|n| n.pid == r.new_pid && n.has("READY=1")),
        "the new generation never says READY=1 itself (NotifyAccess=main)"
    );

    // A failed upgrade, from the new main pid.
    s.arm_fault("exit-at-start");
    assert!(matches!(upgrade(&s), Reply::Failed(_)));
    let notes = sock.drain(Duration::from_millis(500));
    eprintln!("failed upgrade: {notes:?}");
    let g2 = r.new_pid;
    assert!(notes.iter().any(|n| n.pid == g2 && n.has("RELOADING=1")));
    let ready = notes
        .iter()
        .find(|n| n.pid == g2 && n.has("READY=1"))
        .expect("READY=1 again after the failure");
    let status = ready
        .lines
        .iter()
        .find(|l| l.starts_with("STATUS="))
        .expect("STATUS=");
    assert!(
        status.contains("generation 2") && status.contains("failed"),
        "{status}"
    );
}

#[test]
fn socket_activated_by_systemd_socket_activate_serves_and_upgrades() {
    let ssa = which("systemd-socket-activate");
    let s = Server::start_with(
        Path::new(FIXTURE),
        "ssa",
        ServerOpts {
            wrapper: vec![ssa.display().to_string(), "-l".into(), "{addr}".into()],
            ..ServerOpts::default()
        },
    );
    let st = baton_tests::control_status(&s.control);
    assert!(
        st.listeners
            .iter()
            .any(|l| l.name == "http" && l.origin.contains("systemd")),
        "the listener came from LISTEN_FDS: {:?}",
        st.listeners
    );
    let load = Load::start(s.addr, Mode::Close, 8, Duration::from_secs(120), u64::MAX);
    wait_for(T, "load", || (load.done() > 50).then_some(()));
    for _ in 0..5 {
        let before = load.done();
        s.upgrade(T);
        wait_for(T, "load progress", || {
            (load.done() > before + 50).then_some(())
        });
    }
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert_eq!(s.version().generation, 6);
}

#[test]
fn as_pid_1_a_library_mode_server_refuses_to_upgrade_itself() {
    let unshare = which("unshare");
    let s = Server::start_with(
        Path::new(FIXTURE),
        "pid1",
        ServerOpts {
            wrapper: vec![
                unshare.display().to_string(),
                "--pid".into(),
                "--fork".into(),
                "--mount-proc".into(),
            ],
            ..ServerOpts::default()
        },
    );
    assert_eq!(s.pid(), 1, "the pid file holds the namespace pid");
    match upgrade(&s) {
        Reply::Failed(f) => {
            assert_eq!(f.kind, baton::control::FailureKind::Refused);
            assert!(
                f.message.contains("PID 1") && f.message.contains("--delegate"),
                "{}",
                f.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        http::get(s.addr, "/health").unwrap().status,
        200,
        "still serving"
    );
}

#[test]
fn metrics_survive_upgrades_and_parse() {
    let mport = baton_tests::free_port();
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    let s = Server::start_with(
        Path::new(FIXTURE),
        "metrics",
        ServerOpts {
            args: vec!["--metrics".into(), maddr.to_string()],
            ..ServerOpts::default()
        },
    );
    for _ in 0..10 {
        http::get(s.addr, "/").unwrap();
    }
    let scrape = || {
        let r = http::get(maddr, "/metrics").unwrap();
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type")
                .unwrap_or_default()
                .contains("openmetrics")
        );
        let text = r.text();
        let samples =
            baton_tests::openmetrics::check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let get = |name: &str| samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        (
            get("baton_upgrades_total{result=\"success\"}"),
            get("demo_requests_total"),
            get("baton_upgrade_duration_seconds_count"),
            text,
        )
    };
    let (before, req_before, _, _) = scrape();
    assert_eq!(before, Some(0.0));
    let req_before = req_before.unwrap();
    assert!(req_before >= 10.0);
    for _ in 0..5 {
        s.upgrade(T);
    }
    let (after, req_after, hist_count, text) = scrape();
    eprintln!("{text}");
    assert_eq!(
        after,
        Some(5.0),
        "baton_upgrades_total{{result=\"success\"}} after 5 upgrades"
    );
    assert!(
        req_after.unwrap() > req_before,
        "the app's carried counter did not reset: {req_before} → {req_after:?}"
    );
    assert_eq!(
        hist_count,
        Some(5.0),
        "the duration histogram carries its observations"
    );
    // promtool, when the machine has it, agrees.
    baton_tests::openmetrics::check_with_promtool(&text);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let s = Server::start_with(
        Path::new(FIXTURE),
        "jsonlog",
        ServerOpts {
            args: vec!["--log-format".into(), "json".into()],
            ..ServerOpts::default()
        },
    );
    s.upgrade(T);
    let log = s.log();
    let mut n = 0;
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        n += 1;
    }
    assert!(n >= 5, "json lines: {n}\n{log}");
    assert!(
        log.contains("\"message\":\"upgrade: promoted; draining\""),
        "{log}"
    );
    let _ = proc::alive(1);
}

#[test]
fn example_units_pass_systemd_analyze_verify() {
    let sa = which("systemd-analyze");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd");
    let dir = TestDir::new("units");
    let mut checked = 0;
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        if p.extension()
            .is_none_or(|x| x != "service" && x != "socket")
        {
            continue;
        }
        // Point ExecStart at binaries that exist here.
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("/usr/local/bin/baton-demo", FIXTURE)
            .replace(
                "/usr/local/bin/baton",
                &baton_tests::workspace_bin("baton").display().to_string(),
            )
            .replace("/usr/local/bin/myapp", "/bin/true");
        std::fs::write(dir.path.join(p.file_name().unwrap()), text).unwrap();
        checked += 1;
    }
    assert!(checked >= 2, "example units in contrib/systemd");
    let units: Vec<_> = std::fs::read_dir(&dir.path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let out =
        baton_tests::output(std::process::Command::new(sa).arg("verify").args(&units)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("systemd-analyze verify: {} {err}", out.status);
    // Without a running systemd (containers), verify may warn about the
    // manager; unit errors always name the unit file.
    for u in &units {
        let name = u.file_name().unwrap().to_string_lossy();
        assert!(
            !err.lines()
                .any(|l| l.contains(&*name) && !l.contains("Unknown key name 'ExecReload'")),
            "{err}"
        );
    }
}
