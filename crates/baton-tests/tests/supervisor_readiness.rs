//! Issue 5 (supervisor mode): readiness of a new generation in each
//! `--ready` mode (notify, http, http on a per-generation probe port, tcp,
//! delay), and `--ready-timeout` for one that never becomes ready.

use std::time::{Duration, Instant};

use baton_tests::apps::{pyapp, strings as s};
use baton_tests::load::{Load, Mode};
use baton_tests::supervisor::{RunOpts, Supervised, upgrade_in_thread};
use baton_tests::{proc, wait_for};

const T: Duration = Duration::from_secs(30);

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
