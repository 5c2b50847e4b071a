//! Issue 3: a tokio server that upgrades itself in place — listener handoff,
//! readiness, drain, rollback. Real processes, real load, exact counts.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use baton_tests::load::{Load, Mode};
use baton_tests::{Server, ServerOpts, http, proc, wait_for};

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const FIXTURE_V2: &str = env!("CARGO_BIN_EXE_baton-fixture-v2");
const T: Duration = Duration::from_secs(30);

fn fixture() -> &'static Path {
    Path::new(FIXTURE)
}

/// Wait until the load client has made progress (so requests are in flight).
#[test]
fn twenty_upgrades_under_connection_close_load_fail_nothing() {
    let s = Server::start(fixture(), "twenty");
    let load = Load::start(s.addr, Mode::Close, 16, Duration::from_secs(240), u64::MAX);
    load.wait_progress(50, T);
    let mut pids = BTreeSet::from([s.pid()]);
    let mut in_flight_at_trigger = Vec::new();
    for i in 0..20 {
        let before = s.version();
        assert_eq!(before.generation, i + 1);
        in_flight_at_trigger.push(load.in_flight.load(Ordering::SeqCst));
        s.usr2();
        let after = s.wait_upgraded(before.pid, before.generation, T);
        pids.insert(after.pid);
        // Keep the load going between upgrades.
        load.wait_progress(20, T);
    }
    let stats = load.stop();
    eprintln!("load: {stats:?}\nin flight at each trigger: {in_flight_at_trigger:?}");
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert_eq!(stats.wrong, 0, "wrong responses: {:?}", stats.errors);
    assert_eq!(pids.len(), 21, "distinct pids {pids:?}");
    assert_eq!(s.version().generation, 21);
    assert!(
        in_flight_at_trigger.iter().all(|n| *n > 0),
        "requests must be in flight at every upgrade: {in_flight_at_trigger:?}"
    );
    // The load client saw most generations answer.
    assert!(
        stats.pids.len() >= 15,
        "load saw only {} pids",
        stats.pids.len()
    );
}

/// Regression guard for "the old one resumes": the new generation stops
/// itself right after saying Ready (before or after promotion) and is
/// killed; the old generation must resume with nothing refused.
fn killed_after_ready(point: &str) {
    let s = Server::start(fixture(), &format!("killed-{point}"));
    let old = s.version();
    let load = Load::start(s.addr, Mode::Close, 8, Duration::from_secs(60), u64::MAX);
    load.wait_progress(20, T);
    // A request held open keeps the old generation draining after a
    // promotion, so it is still there to resume when the successor dies
    // (a `/slow?ms=N` one could end first on a busy machine).
    let held = http::hold(http::connect(s.addr).unwrap()).expect("a held request");
    s.arm_fault(&format!("stop-at:{point}"));
    s.usr2();
    // Find the stopped child.
    let child = wait_for(T, "the new generation to stop itself", || {
        proc::children(old.pid)
            .into_iter()
            .find(|c| proc::state(*c) == Some('T'))
    });
    if point == "promoted" {
        assert_eq!(
            s.try_pid(),
            Some(child),
            "the promoted generation wrote the pid file"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    proc::signal(child, rustix::process::Signal::KILL);
    wait_for(T, "the killed child to be reaped", || {
        proc::state(child).is_none().then_some(())
    });
    // The old one serves again, and its pid is in the pid file.
    wait_for(T, "the old generation to resume", || {
        (s.try_pid() == Some(old.pid)
            && http::get(s.addr, "/version").is_ok_and(|r| r.status == 200))
        .then_some(())
    });
    load.wait_progress(50, T);
    let stats = load.stop();
    eprintln!("load: {stats:?}");
    let refused = stats.failures.refused;
    assert_eq!(
        refused, 0,
        "refused connections: {:?} {:?}",
        stats.failures, stats.errors
    );
    if point == "ready" {
        // It never accepted anything: nothing at all may fail.
        assert_eq!(stats.failed, 0, "failed: {:?}", stats.errors);
    } else {
        // A process killed while serving loses the requests it had accepted
        // (the listening socket and its queue survive in the old one).
        eprintln!("requests lost with the killed generation: {}", stats.failed);
    }
    let (r, _) = held.release().expect("the held request completes");
    assert_eq!(r.status, 200);
    let v = s.version();
    assert_eq!(v.pid, old.pid);
    assert_eq!(v.generation, old.generation);
    assert!(
        proc::children(old.pid).is_empty(),
        "no child left: {:?}",
        proc::children(old.pid)
    );
    let st = baton_tests::control_status(&s.control);
    let last = st.last_upgrade.expect("last upgrade recorded");
    assert_eq!(last.result, "failed", "{last:?}");
    // And the next upgrade works.
    let v2 = s.upgrade(T);
    assert_eq!(v2.generation, old.generation + 1);
}

#[test]
fn new_generation_killed_right_after_ready_old_one_resumes() {
    killed_after_ready("ready");
}

#[test]
fn new_generation_killed_right_after_promotion_old_one_resumes_and_rewrites_pid_file() {
    killed_after_ready("promoted");
}

/// A request in flight when the upgrade starts finishes on the old
/// generation, which drains until then while the new one serves.
#[test]
fn a_slow_request_completes_on_the_old_generation() {
    let s = Server::start(fixture(), "slow");
    let old = s.version();
    // Held open until the test releases it (no fixed duration to outlast).
    let held = http::hold(http::connect(s.addr).unwrap()).expect("a held request");
    let peer = held.local_port();
    s.usr2();
    // The new generation serves while the request is still running.
    let new = wait_for(T, "the new generation", || {
        let v = baton_tests::Version::parse(&http::get(s.addr, "/version").ok()?.body)?;
        (v.pid != old.pid).then_some(v)
    });
    assert!(
        proc::alive(old.pid),
        "the old generation must still be draining"
    );
    assert!(
        proc::serves_connection(old.pid, s.addr.port(), peer)
            && !proc::serves_connection(new.pid, s.addr.port(), peer),
        "the old generation, only it, holds the request's connection"
    );
    let (r, _) = held.release().expect("the held request");
    assert_eq!(r.status, 200);
    assert_eq!(new.generation, old.generation + 1);
    wait_for(T, "the old generation to exit", || {
        (!proc::alive(old.pid)).then_some(())
    });
}

fn rollback_case(name: &str, arm: impl FnOnce(&Server), extra_args: &[&str]) {
    let s = Server::start_with(
        fixture(),
        name,
        ServerOpts {
            args: extra_args.iter().map(|a| a.to_string()).collect(),
            ..ServerOpts::default()
        },
    );
    let old = s.version();
    let load = Load::start(s.addr, Mode::Close, 8, Duration::from_secs(120), u64::MAX);
    load.wait_progress(20, T);
    arm(&s);
    let t = Instant::now();
    let reply = baton_tests::control_call(
        &s.control,
        &baton::control::Request::Upgrade(baton::control::UpgradeOptions::default()),
        |e| eprintln!("event: {e:?}"),
    );
    eprintln!("{name}: {reply:?} after {:?}", t.elapsed());
    match &reply {
        baton::control::Reply::Failed(f) => {
            assert_eq!(f.kind, baton::control::FailureKind::Failed, "{f:?}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    load.wait_progress(20, T);
    let stats = load.stop();
    assert_eq!(
        stats.failed, 0,
        "{name}: failed requests during the attempt: {:?}",
        stats.errors
    );
    let v = s.version();
    assert_eq!(
        (v.pid, v.generation),
        (old.pid, old.generation),
        "same generation serving"
    );
    assert_eq!(s.pid(), old.pid);
    wait_for(T, "no child left", || {
        proc::children(old.pid).is_empty().then_some(())
    });
    // The next upgrade with a good binary succeeds.
    s.replace_binary(fixture());
    let v2 = s.upgrade(T);
    assert_eq!(v2.generation, old.generation + 1);
}

#[test]
fn rollback_when_the_new_binary_exits_at_start() {
    rollback_case("exit-at-start", |s| s.arm_fault("exit-at-start"), &[]);
}

#[test]
fn rollback_when_the_new_binary_never_becomes_ready() {
    rollback_case(
        "never-ready",
        |s| s.arm_fault("never-ready"),
        &["--ready-timeout", "2s"],
    );
}

#[test]
fn rollback_when_the_new_binary_reports_a_failure() {
    rollback_case(
        "fail-ready",
        |s| s.arm_fault("fail-ready:config file is broken"),
        &[],
    );
}

#[test]
fn rollback_when_a_shell_script_replaced_the_binary() {
    rollback_case(
        "script",
        |s| s.replace_with_script("#!/bin/sh\necho 'broken deploy' >&2\nexit 1\n"),
        &[],
    );
    rollback_case(
        "script-hangs",
        |s| s.replace_with_script("#!/bin/sh\nexec sleep 600\n"),
        &["--ready-timeout", "2s"],
    );
}

#[test]
fn unix_socket_listener_works_across_upgrades_and_keeps_its_path() {
    let dir = baton_tests::TestDir::new("unix-sock");
    let sock = dir.join("app.sock");
    let s = Server::start_with(
        fixture(),
        "unix",
        ServerOpts {
            args: vec!["--listen".into(), format!("api=unix:{}", sock.display())],
            ..ServerOpts::default()
        },
    );
    let r = http::get_unix(&sock, "/version").unwrap();
    let before = baton_tests::Version::parse(&r.body).unwrap();
    for _ in 0..3 {
        let after = s.upgrade(T);
        assert!(
            sock.exists(),
            "the socket path survives the old generation's exit"
        );
        let r = http::get_unix(&sock, "/version").unwrap();
        let v = baton_tests::Version::parse(&r.body).unwrap();
        assert_eq!(v.pid, after.pid);
    }
    assert_eq!(s.version().generation, before.generation + 3);
    let st = baton_tests::control_status(&s.control);
    assert!(
        st.listeners
            .iter()
            .any(|l| l.name == "api" && l.addr.starts_with("unix:")),
        "{st:?}"
    );
}

#[test]
fn replacing_the_binary_upgrades_to_the_new_version() {
    let s = Server::start(fixture(), "replace");
    let before = s.version();
    assert_ne!(before.version, "2.0.0-fixture");
    s.replace_binary(Path::new(FIXTURE_V2));
    let after = s.upgrade(T);
    assert_eq!(after.version, "2.0.0-fixture");
    assert_eq!(after.generation, before.generation + 1);
}

#[test]
fn a_second_upgrade_request_during_an_upgrade_is_told_in_progress() {
    let s = Server::start(fixture(), "in-progress");
    let old = s.pid();
    // The first upgrade stays in progress until the test creates `go` (a
    // fixed slow start raced the test's own sleep and requests).
    let go = s.dir.join("go");
    s.arm_fault(&format!("ready-when:{}", go.display()));
    let path = s.control.clone();
    let first = std::thread::spawn(move || baton_tests::control_upgrade(&path));
    wait_for(T, "the first upgrade to spawn the new generation", || {
        (!proc::children(old).is_empty()).then_some(())
    });
    let second = baton_tests::control_upgrade(&s.control);
    match second {
        baton::control::Reply::Failed(f) => {
            assert_eq!(f.kind, baton::control::FailureKind::InProgress, "{f:?}")
        }
        other => panic!("expected in-progress, got {other:?}"),
    }
    // A SIGUSR2 now is logged and ignored.
    s.usr2();
    wait_for(T, "the SIGUSR2 to be ignored", || {
        s.log()
            .contains("SIGUSR2 upgrade did not happen")
            .then_some(())
    });
    std::fs::write(&go, "").unwrap();
    match first.join().unwrap() {
        baton::control::Reply::Upgraded(r) => assert_eq!(r.to_generation, 2),
        other => panic!("expected success, got {other:?}"),
    }
    s.wait_upgraded(old, 1, T);
    // Refused, not queued: nothing else will start an upgrade.
    assert_eq!(
        s.log()
            .matches("upgrade requested while one is running; ignored")
            .count(),
        2,
        "both the second request and the SIGUSR2 were refused: {}",
        s.log()
    );
}

#[test]
fn stale_listen_fds_in_the_environment_are_not_passed_on() {
    // A LISTEN_FDS meant for another pid is ignored, and removed before the
    // next generation starts (it would otherwise adopt random fds).
    let s = Server::start_with(
        fixture(),
        "stale-listen-fds",
        ServerOpts {
            env: vec![
                ("LISTEN_FDS".into(), "2".into()),
                ("LISTEN_PID".into(), "1".into()),
            ],
            ..ServerOpts::default()
        },
    );
    let v = s.upgrade(T);
    let env = std::fs::read(format!("/proc/{}/environ", v.pid)).unwrap();
    let env = String::from_utf8_lossy(&env);
    assert!(
        !env.contains("LISTEN_FDS="),
        "LISTEN_FDS leaked into the new generation"
    );
    assert!(
        !env.contains("LISTEN_PID="),
        "LISTEN_PID leaked into the new generation"
    );
}

#[test]
fn a_request_longer_than_the_drain_timeout_is_cut_and_counted() {
    let s = Server::start_with(
        fixture(),
        "deadline",
        ServerOpts {
            args: vec!["--drain-timeout".into(), "1s".into()],
            ..ServerOpts::default()
        },
    );
    // Never released: only the drain deadline can end it (a
    // `/slow?ms=10000` one would end by itself on a slow enough upgrade).
    let held = http::hold(http::connect(s.addr).unwrap()).expect("a held request");
    let reply = baton_tests::control_upgrade(&s.control);
    match reply {
        baton::control::Reply::Upgraded(r) => {
            assert_eq!(
                r.closed_at_deadline, 1,
                "exactly the one slow connection: {r:?}"
            );
            assert!(r.drain_ms >= 1000 && r.drain_ms < 3000, "{r:?}");
        }
        other => panic!("{other:?}"),
    }
    held.wait_cut(T).expect("the cut request fails");
    let st = baton_tests::control_status(&s.control);
    assert_eq!(
        st.counters.conns_closed_at_deadline, 1,
        "carried to the new generation"
    );
}

#[test]
fn flipping_a_current_symlink_upgrades_to_the_new_release() {
    baton_tests::init();
    let dir = baton_tests::TestDir::new("symlink");
    for (rel, bin) in [("1", FIXTURE), ("2", FIXTURE_V2)] {
        std::fs::create_dir_all(dir.join(&format!("releases/{rel}"))).unwrap();
        baton_tests::copy_exe(Path::new(bin), &dir.join(&format!("releases/{rel}/server")));
    }
    std::os::unix::fs::symlink("releases/1", dir.join("current")).unwrap();
    let port = baton_tests::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let pid_file = dir.join("server.pid");
    // Started through the symlink, with a relative argv[0], from the dir.
    let mut child = baton_tests::spawn(
        std::process::Command::new("./current/server")
            .current_dir(&dir.path)
            .args(["--listen", &addr.to_string(), "--pid-file"])
            .arg(&pid_file)
            .stderr(std::fs::File::create(dir.join("log")).unwrap()),
    )
    .unwrap();
    let version = || baton_tests::Version::parse(&http::get(addr, "/version").ok()?.body);
    let v1 = wait_for(T, "release 1", version);
    assert_ne!(v1.version, "2.0.0-fixture");
    // Deploy: flip the symlink atomically.
    std::os::unix::fs::symlink("releases/2", dir.join("current.new")).unwrap();
    std::fs::rename(dir.join("current.new"), dir.join("current")).unwrap();
    proc::signal(v1.pid, rustix::process::Signal::USR2);
    let v2 = wait_for(T, "release 2", || version().filter(|v| v.pid != v1.pid));
    assert_eq!(v2.version, "2.0.0-fixture", "the new release runs");
    assert_eq!(v2.generation, 2);
    let exe = std::fs::read_link(format!("/proc/{}/exe", v2.pid)).unwrap();
    assert!(exe.ends_with("releases/2/server"), "{}", exe.display());
    for pid in [v1.pid, v2.pid] {
        proc::signal(pid, rustix::process::Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait(); // already reaped by the test's reaper, most likely
}

/// `Baton::upgrade` — the programmatic trigger — runs the same upgrade as
/// SIGUSR2 and returns its report to the caller.
#[test]
fn the_library_call_upgrades_and_returns_the_report() {
    let s = Server::start(Path::new(FIXTURE), "lib-upgrade");
    let first = s.version();
    s.arm_fault("self-upgrade:300");
    let second = s.upgrade(T);
    let third = s.wait_upgraded(second.pid, second.generation, T);
    assert_eq!(third.generation, first.generation + 2);
    let log = s.log();
    let line = format!(
        "fixture: self-upgrade ok: {} -> {} (generation {} -> {})",
        second.pid, third.pid, second.generation, third.generation
    );
    assert!(log.contains(&line), "{line} not in:\n{log}");
}
