//! Issue 5: `baton run`, the supervisor for servers in any language:
//! gunicorn, uvicorn, Node and Go servers upgraded ten times each under a
//! no-retry load, exact counts. The rest of `baton run` is in its own
//! files: `supervisor_listeners` (what the app inherits, shared and
//! socket-activated sockets), `supervisor_readiness`, `supervisor_failures`
//! (failed upgrades, crashes and restarts), `supervisor_control` (the
//! control socket and the `baton upgrade|status|stop` client),
//! `supervisor_stop` (signals and stopping).

use std::collections::BTreeSet;
use std::time::Duration;

use baton_tests::apps::strings as s;
use baton_tests::load::{Load, Mode, Stats};
use baton_tests::supervisor::{RunOpts, Supervised};
use baton_tests::{apps, proc, wait_for};

const T: Duration = Duration::from_secs(30);

/// Ten `baton upgrade`s under a no-retry `Connection: close` load.
/// Returns the load's stats and the pid of every generation.
fn ten_upgrades_under_load(sup: &Supervised, label: &str) -> (Stats, BTreeSet<u32>) {
    let load = Load::start(sup.addr, Mode::Close, 8, Duration::from_secs(200), u64::MAX);
    load.wait_progress(50, T);
    let first = sup.status();
    let mut pids = BTreeSet::from([first.pid]);
    let mut in_flight = Vec::new();
    for i in 0..10 {
        in_flight.push(load.in_flight.load(std::sync::atomic::Ordering::SeqCst));
        let out = sup.upgrade(&["--json"]);
        assert_eq!(out.code, 0, "{label}: upgrade {i} failed: {out:?}");
        let j = out.json();
        assert_eq!(j["ok"], true, "{j}");
        let generation = j["to_generation"].as_u64().unwrap();
        pids.insert(j["new_pid"].as_u64().unwrap() as u32);
        // The load reaches the new generation before the next upgrade.
        wait_for(T, "the load to reach the new generation", || {
            load.snapshot()
                .generations
                .contains(&generation)
                .then_some(())
        });
        load.wait_progress(20, T);
    }
    let stats = load.stop();
    eprintln!(
        "{label}: {} requests over 10 upgrades: {} ok, {} failed, {} wrong; {} generations answered, {} distinct pids answered; in flight at each upgrade: {in_flight:?}; errors: {:?}",
        stats.ok + stats.failed + stats.wrong,
        stats.ok,
        stats.failed,
        stats.wrong,
        stats.generations.len(),
        stats.pids.len(),
        stats.errors
    );
    (stats, pids)
}

fn assert_clean(label: &str, stats: &Stats, pids: &BTreeSet<u32>) {
    assert_eq!(
        stats.failed, 0,
        "{label}: failed requests: {:?}",
        stats.errors
    );
    assert_eq!(stats.wrong, 0, "{label}: wrong answers: {:?}", stats.errors);
    assert_eq!(pids.len(), 11, "{label}: generation pids {pids:?}");
    assert_eq!(
        stats.generations.len(),
        11,
        "{label}: generations answered {:?}",
        stats.generations
    );
}

#[test]
fn gunicorn_sync_workers_ten_upgrades_under_load_fail_nothing() {
    let sup = Supervised::start(
        "gunicorn",
        RunOpts {
            ready: Some("http://{addr}/health".into()),
            command: vec![
                apps::venv_tool("gunicorn").display().to_string(),
                "--workers".into(),
                "2".into(),
                "--worker-class".into(),
                "sync".into(),
                "--graceful-timeout".into(),
                "10".into(),
                "--log-level".into(),
                "warning".into(),
                "--chdir".into(),
                apps::apps_dir().display().to_string(),
                "wsgi_app:app".into(),
            ],
            ..RunOpts::default()
        },
    );
    let (stats, pids) = ten_upgrades_under_load(&sup, "gunicorn (sync workers)");
    assert_clean("gunicorn", &stats, &pids);
    // Every generation's workers are gone with their master.
    let st = sup.status();
    let live: Vec<u32> = proc::descendants(sup.pid);
    assert!(
        live.iter()
            .all(|p| *p == st.pid || proc::ppid(*p) == Some(st.pid)),
        "only the serving master and its workers are left: {live:?}"
    );
}

fn uvicorn(label: &str, extra: &[&str]) -> (Stats, BTreeSet<u32>) {
    let mut args = s(extra);
    args.extend(s(&["--drain-timeout", "20s"]));
    let sup = Supervised::start(
        label,
        RunOpts {
            args,
            command: vec![
                apps::venv_tool("uvicorn").display().to_string(),
                "--fd".into(),
                "3".into(),
                "--app-dir".into(),
                apps::apps_dir().display().to_string(),
                "--lifespan".into(),
                "off".into(),
                "--log-level".into(),
                "warning".into(),
                "asgi_app:app".into(),
            ],
            ..RunOpts::default()
        },
    );
    ten_upgrades_under_load(&sup, label)
}

/// Steer before stop: uvicorn closes connections it accepted but had not
/// read when it gets SIGTERM. With a plain handover on one shared socket
/// that loses requests; with steering it must lose none. Both runs are
/// printed side by side.
#[test]
fn uvicorn_ten_upgrades_lose_nothing_with_steering_compared_with_plain_sigterm() {
    let (plain, _) = uvicorn("uvicorn-plain", &["--no-steer", "--ready", "delay=1s"]);
    let (steered, pids) = uvicorn("uvicorn-steered", &[]);
    eprintln!(
        "\nuvicorn, 10 upgrades each, no-retry Connection: close load (8 clients):\n  \
         plain SIGTERM handover (--no-steer): {:>6} requests, {:>3} failed\n  \
         steer before stop (default):         {:>6} requests, {:>3} failed\n",
        plain.ok + plain.failed + plain.wrong,
        plain.failed + plain.wrong,
        steered.ok + steered.failed + steered.wrong,
        steered.failed + steered.wrong,
    );
    assert_clean("uvicorn with steering", &steered, &pids);
}

#[test]
fn node_http_ten_upgrades_under_load_fail_nothing() {
    let sup = Supervised::start(
        "node",
        RunOpts {
            ready: Some("http://{addr}/health".into()),
            command: vec![
                apps::node().display().to_string(),
                apps::apps_dir()
                    .join("node_server.js")
                    .display()
                    .to_string(),
            ],
            ..RunOpts::default()
        },
    );
    let (stats, pids) = ten_upgrades_under_load(&sup, "node http");
    assert_clean("node", &stats, &pids);
}

#[test]
fn go_net_http_ten_upgrades_under_load_fail_nothing() {
    let bin = apps::go_server();
    let sup = Supervised::start(
        "go",
        RunOpts {
            ready: Some("tcp".into()),
            command: vec![bin.display().to_string()],
            ..RunOpts::default()
        },
    );
    let (stats, pids) = ten_upgrades_under_load(&sup, "go net/http");
    assert_clean("go", &stats, &pids);
}
