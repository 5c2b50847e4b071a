//! Issue 5 (supervisor mode): signals to `baton run` and stopping it.
//! SIGHUP upgrades; SIGTERM, SIGINT and `baton stop` stop the app with its
//! stop signal (`--stop-signal`) and baton exits 0, abandoning an upgrade
//! that is not ready yet.

use std::time::{Duration, Instant};

use baton_tests::apps::{pyapp, strings as s};
use baton_tests::load::{Load, Mode};
use baton_tests::supervisor::{RunOpts, Supervised, upgrade_in_thread};
use baton_tests::{proc, wait_for};
use rustix::process::Signal;

const T: Duration = Duration::from_secs(30);

#[test]
fn sighup_upgrades_and_sigterm_stops_gracefully() {
    let mut sup = Supervised::start(
        "signals",
        RunOpts {
            args: s(&["--pid-file", "baton.pid"]),
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    let pid_file = sup.path("baton.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        sup.pid.to_string(),
        "the pid file names baton itself"
    );
    let v1 = sup.version();
    sup.signal(Signal::HUP);
    let v2 = sup.wait_generation(2, T);
    wait_for(T, "generation 1 to exit", || {
        (!proc::alive(v1.pid)).then_some(())
    });
    // SIGTERM: the app gets its stop signal and baton exits 0.
    let load = Load::start(sup.addr, Mode::Close, 2, Duration::from_secs(30), u64::MAX);
    load.wait_progress(10, T);
    sup.signal(Signal::TERM);
    let st = sup.wait_exit(T).expect("baton exits after SIGTERM");
    let stats = load.stop();
    assert_eq!(st.code(), Some(0), "{st:?}");
    assert!(!proc::alive(v2.pid), "the app is gone");
    assert!(!sup.control.exists(), "the control socket is removed");
    assert!(!pid_file.exists(), "the pid file is removed");
    let log = sup.log_text();
    assert!(log.contains("SIGTERM: stopping gracefully"), "{log}");
    assert!(
        log.contains("SIGTERM: stopping"),
        "the app got SIGTERM: {log}"
    );
    eprintln!(
        "load during the stop: {} ok, {} failed (refused after exit)",
        stats.ok, stats.failed
    );
}

/// `--stop-signal QUIT`: an upgrade stops the old generation with SIGQUIT,
/// and so does SIGINT to the supervisor (a terminal's ^C), which then
/// exits 0.
#[test]
fn the_stop_signal_is_configurable_and_sigint_stops_gracefully() {
    let mut sup = Supervised::start(
        "stopsig",
        RunOpts {
            args: s(&["--stop-signal", "QUIT", "--steer-quiet", "20ms"]),
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    let v1 = sup.version();
    sup.signal(Signal::HUP);
    let v2 = sup.wait_generation(2, T);
    wait_for(T, "generation 1 to exit", || {
        (!proc::alive(v1.pid)).then_some(())
    });
    let log = sup.log_text();
    // --steer-quiet 20ms instead of the default 250 ms.
    let settle_ms: u64 = log
        .lines()
        .find(|l| l.contains("accept queue is empty"))
        .and_then(|l| l.split("settle_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no settle time logged: {log}"));
    assert!(settle_ms < 250, "settled after {settle_ms} ms: {log}");
    assert!(
        log.contains("SIGQUIT: stopping"),
        "the old generation got SIGQUIT: {log}"
    );
    sup.signal(Signal::INT);
    let st = sup.wait_exit(T).expect("baton exits after SIGINT");
    assert_eq!(st.code(), Some(0), "{st:?}");
    assert!(!proc::alive(v2.pid), "the app is gone");
    let log = sup.log_text();
    assert!(log.contains("SIGINT: stopping gracefully"), "{log}");
    assert_eq!(
        log.matches("SIGQUIT: stopping").count(),
        2,
        "both generations got SIGQUIT: {log}"
    );
    assert!(!log.contains("SIGTERM: stopping"), "{log}");
}

#[test]
fn baton_stop_stops_the_supervisor() {
    let mut sup = Supervised::start(
        "stop",
        RunOpts {
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    let v = sup.version();
    let out = sup.cli("stop", &[]);
    assert_eq!(out.code, 0, "{out:?}");
    let st = sup.wait_exit(T).expect("baton exits");
    assert_eq!(st.code(), Some(0));
    assert!(!proc::alive(v.pid));
}

/// SIGTERM during an upgrade that is not ready yet: the upgrade is
/// abandoned (its process killed), the serving generation stops gracefully,
/// baton exits 0.
#[test]
fn sigterm_during_an_upgrade_abandons_it_and_stops() {
    let mut sup = Supervised::start(
        "term-upgrade",
        RunOpts {
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    let v1 = sup.version();
    let upgrade = upgrade_in_thread(&sup, &["--json", "--", "sleep", "600"]);
    let hung = wait_for(T, "the new generation", || {
        proc::descendants(sup.pid).into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.starts_with("sleep"))
        })
    });
    let t = Instant::now();
    sup.signal(Signal::TERM);
    let st = sup.wait_exit(T).expect("baton exits");
    assert_eq!(st.code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let out = upgrade.join().unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.json()["message"]
            .as_str()
            .unwrap()
            .contains("abandoned because baton is stopping"),
        "{out:?}"
    );
    assert!(!proc::alive(hung));
    assert!(!proc::alive(v1.pid));
}
