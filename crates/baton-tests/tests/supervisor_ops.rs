//! Issue 7 (supervisor mode): `baton run`'s Prometheus metrics and systemd
//! notifications; delegate mode and PID 1 inside a PID namespace.

use std::time::Duration;

use baton_tests::load::{Load, Mode};
use baton_tests::notify::NotifySocket;
use baton_tests::supervisor::{RunOpts, Supervised};
use baton_tests::{TestDir, apps, http, proc, wait_for};

const T: Duration = Duration::from_secs(60);

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `python pyapp.py ARGS...` from the venv.
fn pyapp(args: &[&str]) -> Vec<String> {
    let mut v = vec![
        apps::venv_tool("python").display().to_string(),
        apps::apps_dir().join("pyapp.py").display().to_string(),
    ];
    v.extend(s(args));
    v
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Scrape `/metrics`, check it parses, return the samples.
fn scrape(addr: std::net::SocketAddr) -> (Vec<(String, f64)>, String) {
    let r = http::get(addr, "/metrics").unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .contains("openmetrics"),
        "{:?}",
        r.header("content-type")
    );
    let text = r.text();
    let samples = baton_tests::openmetrics::check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    (samples, text)
}

fn sample(samples: &[(String, f64)], name: &str) -> Option<f64> {
    samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

#[test]
fn metrics_count_upgrades_restarts_and_parse() {
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{}", baton_tests::free_port())
        .parse()
        .unwrap();
    let sup = Supervised::start(
        "sup-metrics",
        RunOpts {
            args: s(&["--metrics", &maddr.to_string()]),
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    let (before, _) = scrape(maddr);
    assert_eq!(
        sample(&before, "baton_upgrades_total{result=\"success\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&before, "baton_generation"), Some(1.0));
    let start = sample(&before, "baton_process_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(start <= now && start > now - 600.0, "{start} vs {now}");

    for _ in 0..5 {
        sup.upgrade_ok();
    }
    // A failed upgrade and a refused one.
    assert_eq!(sup.upgrade(&["--", "sh", "-c", "exit 3"]).code, 1);
    assert_eq!(sup.upgrade(&["--", "/no/such/server"]).code, 3);
    // A crash: restarted.
    let v = sup.version();
    proc::signal(v.pid, rustix::process::Signal::KILL);
    wait_for(T, "the restart", || {
        sup.try_status()
            .filter(|st| st.phase == "serving" && st.pid != v.pid)
    });

    let (after, text) = scrape(maddr);
    eprintln!("{text}");
    let get = |n: &str| sample(&after, n);
    assert_eq!(
        get("baton_upgrades_total{result=\"success\"}"),
        Some(5.0),
        "baton_upgrades_total{{result=\"success\"}} after 5 upgrades"
    );
    assert_eq!(get("baton_upgrades_total{result=\"failed\"}"), Some(1.0));
    assert_eq!(get("baton_upgrades_total{result=\"refused\"}"), Some(1.0));
    for h in [
        "baton_upgrade_duration_seconds_count",
        "baton_upgrade_ready_seconds_count",
        "baton_drain_duration_seconds_count",
    ] {
        assert_eq!(get(h), Some(5.0), "{h}");
    }
    assert!(get("baton_upgrade_duration_seconds_sum").unwrap() > 0.0);
    assert_eq!(get("baton_restarts_total"), Some(1.0));
    assert_eq!(
        get("baton_generation"),
        Some(sup.status().generation as f64)
    );
    assert_eq!(
        get("baton_process_start_time_seconds"),
        Some(start),
        "baton's own start: it never changes"
    );
    assert_eq!(http::get(maddr, "/other").unwrap().status, 404);
    // promtool, when the machine has it, agrees.
    match which("promtool") {
        Some(promtool) => {
            let dir = TestDir::new("sup-promtool");
            let f = dir.join("m.txt");
            std::fs::write(&f, &text).unwrap();
            let out = baton_tests::output(
                std::process::Command::new(promtool)
                    .args(["check", "metrics"])
                    .stdin(std::fs::File::open(&f).unwrap()),
            )
            .unwrap();
            assert!(
                out.status.success(),
                "promtool: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => {
            eprintln!("promtool not installed: checked with the built-in OpenMetrics parser only")
        }
    }
}

/// `baton run` under systemd (`Type=notify`, `NotifyAccess=main`): its own
/// pid never changes, so it says READY=1 when the first generation serves,
/// RELOADING=1 + MONOTONIC_USEC= at an upgrade, READY=1 + STATUS= after it
/// (success or failure), STOPPING=1 at the end — and never MAINPID=.
#[test]
fn systemd_notifications_across_a_good_and_a_failed_upgrade() {
    let dir = TestDir::new("sup-notify");
    let sock = NotifySocket::bind(&dir.join("notify.sock"));
    let mut sup = Supervised::start(
        "sup-notify",
        RunOpts {
            env: vec![("NOTIFY_SOCKET".into(), sock.path.display().to_string())],
            command: pyapp(&["--notify"]),
            ready: Some("notify".into()),
            ..RunOpts::default()
        },
    );
    let baton = sup.pid;
    let start = sock.drain(Duration::from_millis(300));
    eprintln!("start: {start:?}");
    let ready = start
        .iter()
        .find(|n| n.has("READY=1"))
        .expect("READY=1 once the first generation serves");
    assert_eq!(ready.pid, baton, "sent by baton itself");
    assert!(
        ready
            .lines
            .iter()
            .any(|l| l.starts_with("STATUS=generation 1")),
        "{ready:?}"
    );
    assert!(
        start.iter().all(|n| n.pid == baton),
        "the app's own READY=1 goes to its own socket, not systemd's: {start:?}"
    );

    // A successful upgrade.
    let load = Load::start(sup.addr, Mode::Close, 4, Duration::from_secs(60), u64::MAX);
    let out = sup.upgrade(&["--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let notes = sock.drain(Duration::from_millis(500));
    eprintln!("upgrade: {notes:?}");
    assert!(notes.iter().all(|n| n.pid == baton), "{notes:?}");
    let pos = |f: &dyn Fn(&baton_tests::notify::Note) -> bool| notes.iter().position(f);
    let reloading = pos(&|n| n.has("RELOADING=1")).expect("RELOADING=1");
    assert!(
        notes[reloading].has("MONOTONIC_USEC="),
        "MONOTONIC_USEC with RELOADING=1"
    );
    let ready = pos(&|n| n.has("READY=1")).expect("READY=1 after the upgrade");
    assert!(reloading < ready, "order");
    let status = notes[ready]
        .lines
        .iter()
        .find(|l| l.starts_with("STATUS="))
        .expect("STATUS= with READY=1");
    assert!(
        status.contains("generation 2") && status.contains("succeeded"),
        "{status}"
    );
    assert!(
        !notes.iter().any(|n| n.has("MAINPID=")),
        "baton's pid never changes: no MAINPID="
    );

    // A failed upgrade.
    let out = sup.upgrade(&["--json", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.code, 1, "{out:?}");
    let notes = sock.drain(Duration::from_millis(500));
    eprintln!("failed upgrade: {notes:?}");
    assert!(notes.iter().all(|n| n.pid == baton), "{notes:?}");
    let reloading = notes
        .iter()
        .position(|n| n.has("RELOADING=1"))
        .expect("RELOADING=1");
    let ready = notes
        .iter()
        .position(|n| n.has("READY=1"))
        .expect("READY=1 again after the failure");
    assert!(reloading < ready);
    let status = notes[ready]
        .lines
        .iter()
        .find(|l| l.starts_with("STATUS="))
        .expect("STATUS=");
    assert!(
        status.contains("generation 2")
            && status.contains("failed")
            && status.contains("exit code 3"),
        "{status}"
    );
    // A refused upgrade changes nothing, so it says nothing.
    assert_eq!(sup.upgrade(&["--", "/no/such/server"]).code, 3);
    assert!(sock.drain(Duration::from_millis(300)).is_empty());
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);

    // Stop.
    sup.signal(rustix::process::Signal::TERM);
    sup.wait_exit(T).expect("baton exits");
    let notes = sock.drain(Duration::from_millis(300));
    assert!(
        notes.iter().any(|n| n.pid == baton && n.has("STOPPING=1")),
        "{notes:?}"
    );
}
