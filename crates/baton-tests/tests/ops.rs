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
        let m = baton_tests::openmetrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        m.expect_families(&[
            ("baton_generation", "gauge"),
            ("baton_process_start_time_seconds", "gauge"),
            ("baton_upgrades", "counter"),
            ("baton_upgrade_duration_seconds", "histogram"),
            ("baton_upgrade_ready_seconds", "histogram"),
            ("baton_drain_duration_seconds", "histogram"),
            ("baton_connections_handed_over", "counter"),
            ("baton_connections_closed_at_drain", "counter"),
            ("baton_connections_lost", "counter"),
            ("baton_requests_in_flight", "gauge"),
            ("demo_requests", "counter"),
        ]);
        (
            m.get("baton_upgrades_total{result=\"success\"}"),
            m.get("demo_requests_total"),
            m.get("baton_upgrade_duration_seconds_count"),
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
}

/// In JSON mode every line of the log — both generations', start to
/// graceful stop — is one JSON object with a level and a timestamp.
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
    let v = s.upgrade(T);
    // Stopped before the log is read, so no line is read half-written (and
    // the graceful stop's lines are checked too).
    proc::signal(v.pid, rustix::process::Signal::TERM);
    wait_for(T, "the server to stop", || {
        (!proc::alive(v.pid)).then_some(())
    });
    let log = s.log();
    let mut n = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line:?}\n{log}"));
        assert!(
            v.is_object() && v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        n += 1;
    }
    assert!(n >= 5, "json lines: {n}\n{log}");
    assert!(
        log.contains("\"message\":\"upgrade: promoted; draining\""),
        "{log}"
    );
    assert!(log.contains("SIGTERM: graceful stop"), "{log}");
}

/// The example units in contrib/systemd, made verifiable here: copied into
/// the test's directory with every path they name pointed at a file or
/// directory that exists (the binaries this build made, the directory
/// itself) and `User=`/`Group=` set to root, which every machine has. Then
/// `systemd-analyze verify` must exit 0 and say nothing about any unit: it
/// exits 0 on a misspelt key or value ("ignoring"), so its output counts too.
#[test]
fn example_units_pass_systemd_analyze_verify() {
    let sa = which("systemd-analyze");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd");
    let dir = TestDir::new("units");
    // The paths the units name, in this order: the demo, baton, the app.
    const REWRITTEN: [&str; 3] = [
        "/usr/local/bin/baton-demo",
        "/usr/local/bin/baton",
        "/srv/web",
    ];
    let srv = dir.join("web");
    std::fs::create_dir_all(srv.join("current")).unwrap();
    let baton = baton_tests::apps::baton_bin();
    let mut units = Vec::new();
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        if p.extension()
            .is_none_or(|x| x != "service" && x != "socket")
        {
            continue;
        }
        let original = std::fs::read_to_string(&p).unwrap();
        // A path this test does not know how to rewrite would be verified
        // as written (systemd-analyze checks the commands, not every path).
        for l in original.lines().filter(|l| !l.starts_with('#')) {
            let rest = REWRITTEN.iter().fold(l.to_owned(), |l, k| l.replace(k, ""));
            assert!(
                !rest.contains("/usr/local/") && !rest.contains("/srv/"),
                "{}: a path this test does not rewrite: {l}",
                p.display()
            );
        }
        let text: String = original
            .lines()
            .map(|l| {
                let l = if l.starts_with("User=") {
                    "User=root".to_owned()
                } else if l.starts_with("Group=") {
                    "Group=root".to_owned()
                } else {
                    l.replace(REWRITTEN[0], FIXTURE)
                        .replace(REWRITTEN[1], &baton.display().to_string())
                        .replace(REWRITTEN[2], &srv.display().to_string())
                };
                l + "\n"
            })
            .collect();
        let to = dir.path.join(p.file_name().unwrap());
        std::fs::write(&to, text).unwrap();
        units.push(to);
    }
    assert!(
        units.len() >= 6,
        "example units in contrib/systemd: {units:?}"
    );
    let out =
        baton_tests::output(std::process::Command::new(sa).arg("verify").args(&units)).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("systemd-analyze verify: {}\n{text}", out.status);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{text}",
        out.status
    );
    // Without a running systemd (containers), verify may say something
    // about the manager; anything about a unit names its file.
    for u in &units {
        let name = u.file_name().unwrap().to_string_lossy();
        let about: Vec<&str> = text.lines().filter(|l| l.contains(&*name)).collect();
        assert!(
            about.is_empty(),
            "systemd-analyze verify about {name}:\n{}",
            about.join("\n")
        );
    }
}
