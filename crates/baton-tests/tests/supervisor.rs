//! Issue 5: `baton run`, the supervisor for servers in any language, and the
//! `baton upgrade|status|stop` client. Real processes (gunicorn, uvicorn,
//! Node, Go, a stdlib Python server), real load, exact counts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_tests::apps::{pyapp, strings as s};
use baton_tests::load::{Load, Mode, Stats};
use baton_tests::supervisor::{RunOpts, Supervised, baton_cli, upgrade_in_thread};
use baton_tests::{apps, http, proc, wait_for};
use rustix::process::Signal;

const T: Duration = Duration::from_secs(30);
const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");

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

/// The next generation's pid, once it is spawned.
fn wait_next_generation_pid(sup: &Supervised, serving: u32) -> u32 {
    wait_for(T, "the next generation to be spawned", || {
        proc::descendants(sup.pid).into_iter().find(|p| {
            *p != serving
                && proc::ppid(*p) == Some(sup.pid)
                && std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.contains("pyapp"))
        })
    })
}

#[test]
fn notify_readiness_waits_for_a_late_ready_from_the_generation_itself() {
    let fault = baton_tests::TestDir::new("notify-fault");
    let fault_file = fault.join("fault");
    let sup = Supervised::start(
        "notify",
        RunOpts {
            ready: Some("notify".into()),
            command: pyapp(&[
                "--notify",
                "--fault-file",
                &fault_file.display().to_string(),
            ]),
            ..RunOpts::default()
        },
    );
    let st = sup.status();
    assert!(
        st.notes
            .iter()
            .any(|n| n.contains("STATUS=") && n.contains("serving")),
        "the app's STATUS= line is in status: {:?}",
        st.notes
    );
    let load = Load::start(sup.addr, Mode::Close, 4, Duration::from_secs(60), u64::MAX);
    load.wait_progress(20, T);
    // The next generation serves at once but says READY=1 only after 3 s.
    std::fs::write(&fault_file, "notify-delay:3\n").unwrap();
    let t = Instant::now();
    let upgrade = upgrade_in_thread(&sup, &["--json"]);
    let new_pid = wait_next_generation_pid(&sup, st.pid);
    // READY=1 from another process (this test), to the new generation's own
    // notify socket: ignored (the sender is checked with SCM_CREDENTIALS).
    let addr = wait_for(T, "NOTIFY_SOCKET of the new generation", || {
        proc::env_var(new_pid, "NOTIFY_SOCKET")
    });
    assert!(addr.starts_with('/'), "{addr}");
    std::thread::sleep(Duration::from_millis(300));
    let forged = std::os::unix::net::UnixDatagram::unbound().unwrap();
    forged.send_to(b"READY=1", &addr).unwrap();
    let out = upgrade.join().unwrap();
    let elapsed = t.elapsed();
    assert_eq!(out.code, 0, "{out:?}");
    let j = out.json();
    let ready_ms = j["ready_ms"].as_u64().unwrap();
    assert!(
        ready_ms >= 2800,
        "ready after {ready_ms} ms: the forged READY=1 must not count"
    );
    assert!(elapsed >= Duration::from_millis(2800));
    assert!(
        sup.log_text().contains("outside generation"),
        "the forged notification is logged"
    );
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert_eq!(sup.version().pid, new_pid);
}

#[test]
fn http_readiness_reaches_the_new_generation_not_the_old_one() {
    // Each generation answers /health 503 for its first 2 s. The old one
    // answers 200 on the same address all along: a probe it could answer
    // would make the upgrade "ready" at once.
    let sup = Supervised::start(
        "http-ready",
        RunOpts {
            ready: Some("http://{addr}/health".into()),
            command: pyapp(&["--unhealthy-for", "2"]),
            ..RunOpts::default()
        },
    );
    let out = sup.upgrade(&["--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let ready_ms = out.json()["ready_ms"].as_u64().unwrap();
    assert!(ready_ms >= 1900, "ready after {ready_ms} ms");
    assert!(ready_ms < 10_000, "ready after {ready_ms} ms");
}

#[test]
fn http_readiness_on_a_per_generation_probe_port() {
    let sup = Supervised::start(
        "http-probe-port",
        RunOpts {
            ready: Some("http://127.0.0.1:{port}/health".into()),
            command: pyapp(&["--probe-port", "--unhealthy-for", "1"]),
            ..RunOpts::default()
        },
    );
    let st = sup.status();
    let port = proc::env_var(st.pid, "BATON_PROBE_PORT").expect("BATON_PROBE_PORT");
    let out = sup.upgrade(&["--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.json()["ready_ms"].as_u64().unwrap() >= 900);
    let st2 = sup.status();
    let port2 = proc::env_var(st2.pid, "BATON_PROBE_PORT").unwrap();
    assert_ne!(port, port2, "each generation has its own probe port");
}

#[test]
fn tcp_readiness_waits_until_the_app_accepts() {
    let fault = baton_tests::TestDir::new("tcp-fault");
    let fault_file = fault.join("fault");
    let sup = Supervised::start(
        "tcp-ready",
        RunOpts {
            ready: Some("tcp".into()),
            command: pyapp(&["--fault-file", &fault_file.display().to_string()]),
            ..RunOpts::default()
        },
    );
    let load = Load::start(sup.addr, Mode::Close, 4, Duration::from_secs(60), u64::MAX);
    load.wait_progress(20, T);
    // The kernel completes a connect to the new socket at once; the app
    // accepts only after 2 s.
    std::fs::write(&fault_file, "start-delay:2\n").unwrap();
    let out = sup.upgrade(&["--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let ready_ms = out.json()["ready_ms"].as_u64().unwrap();
    assert!(ready_ms >= 1900, "ready after {ready_ms} ms");
    load.wait_progress(20, T);
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
}

/// A generation that never becomes ready is killed after `--ready-timeout`
/// and the old one keeps serving — in every readiness mode.
#[test]
fn a_never_ready_generation_is_killed_and_the_old_one_keeps_serving_in_every_mode() {
    let modes: [(&str, &str, &[&str]); 5] = [
        ("notify", "notify", &["--notify"]),
        ("tcp", "tcp", &[]),
        ("http", "http://{addr}/health", &[]),
        (
            "http-port",
            "http://127.0.0.1:{port}/health",
            &["--probe-port"],
        ),
        ("delay", "delay=300ms", &[]),
    ];
    for (label, ready, app_args) in modes {
        let fault = baton_tests::TestDir::new("never-fault");
        let fault_file = fault.join("fault");
        let mut args = s(app_args);
        args.extend(s(&["--fault-file", &fault_file.display().to_string()]));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let sup = Supervised::start(
            &format!("never-{label}"),
            RunOpts {
                ready: Some(ready.into()),
                args: s(&["--ready-timeout", "2s"]),
                command: pyapp(&args),
                ..RunOpts::default()
            },
        );
        let old = sup.version();
        let load = Load::start(sup.addr, Mode::Close, 4, Duration::from_secs(60), u64::MAX);
        load.wait_progress(20, T);
        std::fs::write(&fault_file, "hang\n").unwrap();
        let t = Instant::now();
        let out = sup.upgrade(&["--json"]);
        let elapsed = t.elapsed();
        eprintln!("{label}: {out:?} after {elapsed:?}");
        assert_eq!(out.code, 1, "{label}: {out:?}");
        let j = out.json();
        assert_eq!(j["result"], "failed", "{label}: {j}");
        let msg = j["message"].as_str().unwrap().to_owned();
        assert!(msg.contains("--ready-timeout"), "{label}: {msg}");
        assert!(msg.contains("still serves"), "{label}: {msg}");
        assert!(elapsed >= Duration::from_secs(2), "{label}: {elapsed:?}");
        assert!(elapsed < Duration::from_secs(15), "{label}: {elapsed:?}");
        let hung = j["events"][0]["pid"].as_u64().unwrap() as u32;
        wait_for(T, "the hung generation to be gone", || {
            (!proc::alive(hung)).then_some(())
        });
        load.wait_progress(20, T);
        let stats = load.stop();
        assert_eq!(stats.failed, 0, "{label}: {:?}", stats.errors);
        let v = sup.version();
        assert_eq!((v.pid, v.generation), (old.pid, old.generation), "{label}");
        let st = sup.status();
        assert_eq!(st.phase, "serving");
        assert_eq!(st.last_upgrade.unwrap().result, "failed");
        // And the next upgrade works.
        let v2 = sup.upgrade_ok();
        assert_eq!(v2.generation, old.generation + 2, "{label}");
    }
}

#[test]
fn a_generation_that_exits_at_start_fails_the_upgrade() {
    let sup = Supervised::start(
        "exits",
        RunOpts {
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    let old = sup.version();
    let out = sup.upgrade(&["--", "sh", "-c", "echo broken >&2; exit 3"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("exited before it was ready (exit code 3)"),
        "{out:?}"
    );
    assert_eq!(sup.version().pid, old.pid);
}

/// The serving generation dies: it is restarted, and connections made
/// while no process serves wait in the queue instead of being refused.
#[test]
fn a_crashed_generation_is_restarted_and_connections_queue_meanwhile() {
    let sup = Supervised::start(
        "crash",
        RunOpts {
            // Every start takes a second: the restart window is wide.
            command: pyapp(&["--start-delay", "1"]),
            ..RunOpts::default()
        },
    );
    let old = sup.version();
    proc::signal(old.pid, Signal::KILL);
    let t = Instant::now();
    // 20 clients, each connecting while nothing serves.
    let addr = sup.addr;
    let clients: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20 * i));
                let started = t.elapsed();
                (started, http::get(addr, "/version"))
            })
        })
        .collect();
    let mut during_restart = 0;
    let new = wait_for(T, "the restarted generation", || {
        let st = sup.try_status()?;
        (st.phase == "serving" && st.generation == 2).then_some(st)
    });
    for c in clients {
        let (started, r) = c.join().unwrap();
        let r =
            r.unwrap_or_else(|e| panic!("a request made {started:?} after the crash failed: {e}"));
        assert_eq!(r.status, 200);
        let v = baton_tests::Version::parse(&r.body).unwrap();
        assert_eq!(v.pid, new.pid, "served by the restarted generation");
        if started < Duration::from_millis(900) {
            during_restart += 1;
        }
    }
    assert!(
        during_restart >= 10,
        "{during_restart} requests were made during the restart"
    );
    assert_eq!(new.counters.restarts, 1, "{new:?}");
    assert!(
        new.notes
            .iter()
            .any(|n| n.contains("died") && n.contains("killed by signal 9")),
        "{:?}",
        new.notes
    );
    let log = sup.log_text();
    assert!(log.contains("the serving generation died"), "{log}");
}

/// Wait until a generation other than `old_pid` serves (status says so,
/// and it answers).
fn wait_restarted(sup: &Supervised, old_pid: u32) -> baton_tests::Version {
    wait_for(T, "the restarted generation to serve", || {
        let st = sup.try_status()?;
        if st.phase != "serving" || st.pid == old_pid {
            return None;
        }
        sup.try_version().filter(|v| v.pid == st.pid)
    })
}

/// After a failed upgrade, a crash restarts the last command that worked,
/// not the broken one; after a good upgrade with a new command line, the
/// new one.
#[test]
fn restarts_use_the_last_command_that_worked() {
    let sup = Supervised::start(
        "last-good",
        RunOpts {
            args: s(&["--ready-timeout", "2s"]),
            command: pyapp(&["--version", "v1"]),
            ..RunOpts::default()
        },
    );
    // A failed upgrade to another command line.
    let out = sup.upgrade(&["--", "sleep", "600"]);
    assert_eq!(out.code, 1, "{out:?}");
    let v = sup.version();
    proc::signal(v.pid, Signal::KILL);
    let v = wait_restarted(&sup, v.pid);
    assert_eq!(v.version, "v1", "restarted the last command that worked");
    // A good upgrade with a new command line, then a crash.
    let mut cmd = vec!["--".to_string()];
    cmd.extend(pyapp(&["--version", "v2"]));
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = sup.upgrade(&cmd);
    assert_eq!(out.code, 0, "{out:?}");
    let v = sup.version();
    assert_eq!(v.version, "v2");
    proc::signal(v.pid, Signal::KILL);
    let v = wait_restarted(&sup, v.pid);
    assert_eq!(v.version, "v2");
}

/// A native binary replaced on disk by a broken one: the upgrade fails, and
/// a later crash restarts the kept copy of the binary that worked.
#[test]
fn a_crash_after_a_broken_deploy_restarts_the_kept_executable() {
    let dir = baton_tests::TestDir::new("kept-exe");
    let app = dir.join("app");
    baton_tests::copy_exe(&apps::go_server(), &app);
    let sup = Supervised::start(
        "kept",
        RunOpts {
            args: s(&["--ready-timeout", "3s"]),
            command: vec![app.display().to_string()],
            ..RunOpts::default()
        },
    );
    let v1 = sup.version();
    // A broken deploy.
    let tmp = dir.join("app.new");
    baton_tests::write_exe(&tmp, b"#!/bin/sh\necho 'broken release' >&2\nexit 1\n");
    std::fs::rename(&tmp, &app).unwrap();
    let out = sup.upgrade(&[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(sup.version().pid, v1.pid);
    proc::signal(v1.pid, Signal::KILL);
    let v = wait_restarted(&sup, v1.pid);
    assert_eq!(v.version, "go-app");
    let exe = std::fs::read_link(format!("/proc/{}/exe", v.pid)).unwrap();
    assert!(
        exe.to_string_lossy().contains("(deleted)") || !exe.starts_with(&dir.path),
        "runs the kept copy, not the script on disk: {}",
        exe.display()
    );
    assert!(sup.log_text().contains("kept copy"), "{}", sup.log_text());
}

#[test]
fn upgrade_exit_codes_and_json() {
    let fault = baton_tests::TestDir::new("codes-fault");
    let fault_file = fault.join("fault");
    let sup = Supervised::start(
        "codes",
        RunOpts {
            command: pyapp(&["--fault-file", &fault_file.display().to_string()]),
            ..RunOpts::default()
        },
    );
    // 0: success, with progress lines.
    let out = sup.upgrade(&[]);
    assert_eq!(out.code, 0, "{out:?}");
    for line in [
        "spawned generation 2",
        "ready after",
        "drained in",
        "upgraded: generation 1",
    ] {
        assert!(out.stdout.contains(line), "{line}: {out:?}");
    }
    let out = sup.upgrade(&["--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let j = out.json();
    assert_eq!(j["ok"], true);
    assert_eq!(j["result"], "upgraded");
    assert_eq!(j["exit_code"], 0);
    assert_eq!(j["from_generation"], 2);
    assert_eq!(j["to_generation"], 3);
    assert!(j["ready_ms"].is_u64() && j["drain_ms"].is_u64() && j["total_ms"].is_u64());
    let kinds: Vec<&str> = j["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        kinds.starts_with(&["spawned", "ready"]) && kinds.ends_with(&["drained"]),
        "{kinds:?}"
    );
    // 1: failed and rolled back.
    let out = sup.upgrade(&["--json", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.json()["result"], "failed");
    // 3: refused (nothing started).
    let out = sup.upgrade(&["--json", "--", "/no/such/app"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(out.json()["result"], "refused");
    assert!(
        out.json()["message"]
            .as_str()
            .unwrap()
            .contains("does not exist")
    );
    // 2: usage.
    let out = sup.upgrade(&["--bogus"]);
    assert_eq!(out.code, 2, "{out:?}");
    // 5: cannot connect.
    let out = baton_cli(&["upgrade", "--json", "--control", "/nonexistent/baton.sock"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert_eq!(out.json()["result"], "cannot_connect");
    let out = baton_cli(&["status", "--control", "/nonexistent/baton.sock"]);
    assert_eq!(out.code, 5, "{out:?}");
    // 4: two concurrent upgrades: one succeeds, the other is told "in
    // progress".
    std::fs::write(&fault_file, "start-delay:2\n").unwrap();
    let first = upgrade_in_thread(&sup, &["--json"]);
    wait_for(T, "the first upgrade to run", || {
        sup.try_status().filter(|s| s.upgrade_in_progress)
    });
    let second = sup.upgrade(&["--json"]);
    assert_eq!(second.code, 4, "{second:?}");
    assert_eq!(second.json()["result"], "in_progress");
    let first = first.join().unwrap();
    assert_eq!(first.code, 0, "{first:?}");
    // 6: timeout (the upgrade itself goes on and succeeds).
    let before = sup.status().generation;
    std::fs::write(&fault_file, "start-delay:2\n").unwrap();
    let out = sup.upgrade(&["--json", "--timeout", "300ms"]);
    assert_eq!(out.code, 6, "{out:?}");
    assert_eq!(out.json()["result"], "timeout");
    sup.wait_generation(before + 1, T);
    // The codes are documented.
    let help = baton_cli(&["upgrade", "--help"]);
    for c in [
        "1  failed",
        "3  refused",
        "4  in progress",
        "5  cannot connect",
        "6  timeout",
    ] {
        assert!(help.stdout.contains(c), "{c} in {}", help.stdout);
    }
    // Status, human and JSON.
    let out = sup.cli("status", &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("supervisor \"codes\""), "{out:?}");
    assert!(out.stdout.contains("steered"), "{out:?}");
    let out = sup.cli("status", &["--json"]);
    let j = out.json();
    assert_eq!(j["mode"], "supervisor");
    assert_eq!(j["phase"], "serving");
    assert_eq!(j["counters"]["upgrades_succeeded"], 4);
    assert_eq!(j["counters"]["upgrades_failed"], 1);
}

/// The control socket answers its owner only: another uid cannot reach it
/// (private directory), and if the files were opened up, the server still
/// refuses it (peer credentials).
#[test]
fn another_uid_cannot_use_the_control_socket() {
    let sup = Supervised::start(
        "uid",
        RunOpts {
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "this test switches to uid 65534 with setpriv and must run as root"
    );
    let setpriv = apps::in_path("setpriv", "apt-get install util-linux");
    // A copy of baton that uid 65534 can execute.
    let bin = sup.path("baton-copy");
    baton_tests::copy_exe(&apps::baton_bin(), &bin);
    let as_nobody = |args: &[&str]| {
        baton_tests::supervisor::baton_cli_with(
            std::process::Command::new(&setpriv)
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(&bin)
                .args(args)
                .env_remove("XDG_RUNTIME_DIR"),
        )
    };
    let control = sup.control.display().to_string();
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    let ctl_dir: PathBuf = sup.control.parent().unwrap().to_path_buf();
    assert_eq!(mode(&ctl_dir), 0o700);
    assert_eq!(mode(&sup.control), 0o600);
    let out = as_nobody(&["status", "--control", &control]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("ermission denied"), "{out:?}");
    let out = as_nobody(&["upgrade", "--control", &control]);
    assert_eq!(out.code, 5, "{out:?}");
    // Open the files up: the server checks the peer's uid itself.
    let set = |p: &Path, m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    set(&ctl_dir, 0o711);
    set(&sup.control, 0o666);
    let out = as_nobody(&["upgrade", "--control", &control]);
    set(&ctl_dir, 0o700);
    set(&sup.control, 0o600);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("uid 65534 may not use this control socket"),
        "{out:?}"
    );
    assert_eq!(sup.status().generation, 1, "nothing happened");
    assert!(sup.log_text().contains("another uid refused"));
}

/// `baton upgrade --control` drives a library-mode server too (the demo
/// script does exactly this).
#[test]
fn baton_upgrade_drives_a_library_mode_server() {
    let server = baton_tests::Server::start(Path::new(FIXTURE), "cli-library");
    let control = server.control.display().to_string();
    let before = server.version();
    let out = baton_cli(&["upgrade", "--control", &control]);
    assert_eq!(out.code, 0, "{out:?}");
    for line in [
        "spawned generation 2",
        "ready after",
        "promoted",
        "drained in",
        "upgraded: generation 1",
    ] {
        assert!(out.stdout.contains(line), "{line}: {out:?}");
    }
    server.wait_upgraded(before.pid, before.generation, T);
    let out = baton_cli(&["upgrade", "--json", "--control", &control]);
    assert_eq!(out.code, 0, "{out:?}");
    let j = out.json();
    assert_eq!(j["to_generation"], 3);
    assert_eq!(j["new_pid"].as_u64().unwrap() as u32, {
        wait_for(T, "generation 3", || {
            server
                .try_pid()
                .filter(|p| *p as u64 == j["new_pid"].as_u64().unwrap())
        })
    });
    // A failing new generation: code 1, and the old one serves on.
    server.arm_fault("exit-at-start");
    let out = baton_cli(&["upgrade", "--json", "--control", &control]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.json()["result"], "failed");
    // A pre-flight refusal: code 3, the reason, nothing spawned.
    let zeros = "0".repeat(64);
    let out = baton_cli(&[
        "upgrade",
        "--json",
        "--control",
        &control,
        "--expect-sha256",
        &zeros,
    ]);
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(out.json()["result"], "refused", "{out:?}");
    assert!(out.stdout.contains("SHA-256"), "{out:?}");
    let out = baton_cli(&["status", "--json", "--control", &control]);
    assert_eq!(out.code, 0, "{out:?}");
    let j = out.json();
    assert_eq!(j["mode"], "library");
    assert_eq!(j["generation"], 3);
    let out = baton_cli(&["stop", "--control", &control]);
    assert_eq!(out.code, 0, "{out:?}");
    wait_for(T, "the library-mode server to stop", || {
        server.processes().is_empty().then_some(())
    });
}

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

/// Without `--control`, the control socket's path comes from `--name`:
/// `$XDG_RUNTIME_DIR/baton/NAME.sock` (or `$RUNTIME_DIRECTORY/NAME.sock`
/// under systemd), in a 0700 directory, mode 0600; `baton upgrade --name`
/// and `baton status --name` find it the same way.
#[test]
fn the_control_socket_path_follows_the_service_name() {
    use std::os::unix::fs::PermissionsExt;
    let sup = Supervised::start(
        "named",
        RunOpts {
            command: pyapp(&[]),
            default_control: true,
            ..RunOpts::default()
        },
    );
    let xdg = sup.dir.join("xdg");
    assert_eq!(sup.control, xdg.join("baton/named.sock"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sup.control), 0o600);
    assert_eq!(mode(&xdg.join("baton")), 0o700);
    let cli = |env: (&str, &Path), args: &[&str]| {
        let mut cmd = std::process::Command::new(apps::baton_bin());
        cmd.args(args)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("RUNTIME_DIRECTORY")
            .env(env.0, env.1);
        baton_tests::supervisor::baton_cli_with(&mut cmd)
    };
    let out = cli(("XDG_RUNTIME_DIR", &xdg), &["upgrade", "--name", "named"]);
    assert_eq!(out.code, 0, "{out:?}");
    // systemd's RuntimeDirectory= names the directory itself.
    let out = cli(
        ("RUNTIME_DIRECTORY", &xdg.join("baton")),
        &["status", "--name", "named", "--json"],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["generation"], 2, "{}", out.stdout);
    // Another name finds nothing, and says where it looked.
    let out = cli(("XDG_RUNTIME_DIR", &xdg), &["status", "--name", "other"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("other.sock"), "{out:?}");
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

/// A crash after a broken deploy of a *script*: baton cannot run a kept
/// copy of a script, so it refuses to restart, says why, and the next
/// `baton upgrade` starts the service again.
#[test]
fn a_replaced_script_is_not_restarted_and_an_upgrade_brings_the_service_back() {
    let dir = baton_tests::TestDir::new("script");
    let app = dir.join("app.sh");
    let good = format!(
        "#!/bin/sh\nexec {} {} \"$@\"\n",
        apps::venv_tool("python").display(),
        apps::apps_dir().join("pyapp.py").display()
    );
    baton_tests::write_exe(&app, good.as_bytes());
    let sup = Supervised::start(
        "script",
        RunOpts {
            args: s(&["--ready-timeout", "3s"]),
            command: vec![app.display().to_string()],
            ..RunOpts::default()
        },
    );
    let v1 = sup.version();
    let tmp = dir.join("app.new");
    baton_tests::write_exe(&tmp, b"#!/bin/sh\nexit 1\n");
    std::fs::rename(&tmp, &app).unwrap();
    let out = sup.upgrade(&[]);
    assert_eq!(out.code, 1, "{out:?}");
    proc::signal(v1.pid, Signal::KILL);
    let st = wait_for(T, "baton to give up restarting", || {
        sup.try_status().filter(|s| s.phase == "down")
    });
    assert!(
        st.notes
            .iter()
            .any(|n| n.contains("not restarting") && n.contains("app.sh")),
        "{:?}",
        st.notes
    );
    // Connections wait meanwhile; a good deploy and an upgrade serve them.
    let addr = sup.addr;
    let waiting = std::thread::spawn(move || http::get(addr, "/version"));
    baton_tests::write_exe(&tmp, good.as_bytes());
    std::fs::rename(&tmp, &app).unwrap();
    let out = sup.upgrade(&["--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let r = waiting
        .join()
        .unwrap()
        .expect("the queued request is served");
    assert_eq!(r.status, 200);
    assert_eq!(sup.status().phase, "serving");
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
