//! Issue 7 (supervisor mode): `baton run`'s Prometheus metrics and systemd
//! notifications; delegate mode and PID 1 inside a PID namespace.

use std::time::Duration;

use baton_tests::apps::{pyapp, strings as s, which};
use baton_tests::load::{Load, Mode};
use baton_tests::notify::NotifySocket;
use baton_tests::openmetrics::Metrics;
use baton_tests::supervisor::{RunOpts, Supervised};
use baton_tests::{TestDir, apps, http, proc, wait_for};

const T: Duration = Duration::from_secs(60);

/// Scrape `/metrics`: it must parse as OpenMetrics (prometheus_client's
/// parser) and have every family `baton run` documents.
fn scrape(addr: std::net::SocketAddr) -> (Metrics, String) {
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
    let m = baton_tests::openmetrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    m.expect_families(&[
        ("baton_upgrades", "counter"),
        ("baton_upgrade_duration_seconds", "histogram"),
        ("baton_upgrade_ready_seconds", "histogram"),
        ("baton_drain_duration_seconds", "histogram"),
        ("baton_restarts", "counter"),
        ("baton_connections_closed_at_drain", "counter"),
        ("baton_connections_relayed", "counter"),
        ("baton_generation", "gauge"),
        ("baton_process_start_time_seconds", "gauge"),
    ]);
    (m, text)
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
        before.get("baton_upgrades_total{result=\"success\"}"),
        Some(0.0)
    );
    assert_eq!(before.get("baton_generation"), Some(1.0));
    let start = before.get("baton_process_start_time_seconds").unwrap();
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
    let get = |n: &str| after.get(n);
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

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");

/// A command inside a new PID namespace, killed with everything it started
/// if the test fails.
struct InNamespace {
    child: Option<std::process::Child>,
    /// The pid of `unshare` (outside the namespace).
    unshare: u32,
}

impl InNamespace {
    fn start(
        args: &[String],
        env: &[(&str, &std::path::Path)],
        log: &std::path::Path,
    ) -> InNamespace {
        let unshare = which("unshare").expect("unshare is required (apt-get install util-linux)");
        let mut cmd = std::process::Command::new(unshare);
        cmd.args(["--pid", "--fork", "--mount-proc"])
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("BATON_LOG")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        let child = baton_tests::spawn_owned(&mut cmd).expect("starting unshare");
        let unshare = child.id();
        InNamespace {
            child: Some(child),
            unshare,
        }
    }

    /// baton, PID 1 inside: its pid outside.
    fn baton(&self) -> u32 {
        wait_for(T, "baton to start in the namespace", || {
            proc::children(self.unshare).into_iter().next()
        })
    }

    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        baton_tests::wait_owned(self.child.as_mut()?, timeout)
    }
}

impl Drop for InNamespace {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take()
            && c.try_wait().ok().flatten().is_none()
        {
            baton_tests::supervisor::kill_tree(self.unshare);
            let _ = baton_tests::wait_owned(&mut c, Duration::from_secs(10));
        }
    }
}

/// The pid a process has inside its own (innermost) PID namespace.
fn ns_pid(host_pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

fn zombies(pid: u32) -> Vec<u32> {
    proc::children(pid)
        .into_iter()
        .filter(|c| proc::state(*c) == Some('Z'))
        .collect()
}

/// As PID 1 of a PID namespace (a container), `baton run` reaps every
/// zombie, not only its own children: the app leaves orphans behind, they
/// are reparented to baton and collected when they exit. SIGTERM stops the
/// app gracefully, and baton exits with the app's exit status.
#[test]
fn as_pid_1_baton_run_reaps_every_zombie_and_exits_with_the_apps_status() {
    let dir = TestDir::new("sup-pid1");
    let port = baton_tests::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let control = dir.join("ctl/c.sock");
    let log = dir.join("baton.log");
    let mut args = vec![
        apps::baton_bin().display().to_string(),
        "run".into(),
        "--name".into(),
        "pid1".into(),
        "--control".into(),
        control.display().to_string(),
        "--listen".into(),
        format!("http={addr}"),
        "--".into(),
    ];
    args.extend(pyapp(&[
        "--orphans",
        "5",
        "--orphan-life",
        "2",
        "--exit-on-term",
        "7",
    ]));
    let mut ns = InNamespace::start(&args, &[], &log);
    let baton = ns.baton();
    let v = wait_for(T, "the app to serve", || {
        let r = http::get(addr, "/version").ok()?;
        baton_tests::Version::parse(&r.body)
    });
    assert_eq!(ns_pid(baton), Some(1), "baton is PID 1 in the namespace");
    // The orphans: reparented to baton, then reaped when they exit.
    let app = wait_for(T, "the app's pid outside", || {
        proc::children(baton)
            .into_iter()
            .find(|c| ns_pid(*c) == Some(v.pid))
    });
    let orphans: Vec<u32> = proc::children(baton)
        .into_iter()
        .filter(|c| *c != app)
        .collect();
    eprintln!("baton (pid {baton} outside, 1 inside): app {app}, orphans {orphans:?}");
    assert_eq!(orphans.len(), 5, "the orphans are baton's children now");
    wait_for(T, "the orphans to exit and be reaped", || {
        (proc::children(baton) == vec![app]).then_some(())
    });
    assert!(zombies(baton).is_empty());
    for o in &orphans {
        assert_eq!(proc::state(*o), None, "orphan {o} was reaped");
    }
    // An upgrade as PID 1 works as anywhere.
    let out = baton_tests::supervisor::baton_cli(&[
        "upgrade",
        "--control",
        &control.display().to_string(),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    // The new generation left 5 orphans too: reaped as well.
    wait_for(T, "the new generation's orphans reaped", || {
        let kids = proc::children(baton);
        (kids.len() == 1 && kids[0] != app).then_some(())
    });
    // SIGTERM: a graceful stop, and baton's exit status is the app's (7).
    proc::signal(baton, rustix::process::Signal::TERM);
    let st = ns.wait(T).expect("baton exits");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("SIGTERM: stopping"),
        "the app stopped gracefully: {text}"
    );
    assert_eq!(st.code(), Some(7), "the app's exit status: {text}");
}

/// Delegate mode: baton is PID 1 of a namespace and runs a library-mode
/// server, which upgrades itself 5 times under load (through `baton
/// upgrade`, forwarded to its control socket, and through SIGHUP to baton,
/// turned into its SIGUSR2). baton follows each new main pid and reaps each
/// old generation; 0 failed requests; SIGTERM stops it gracefully.
#[test]
fn delegate_mode_follows_a_library_mode_server_that_upgrades_itself() {
    let dir = TestDir::new("sup-delegate");
    let port = baton_tests::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let control = dir.join("ctl/c.sock");
    let app_control = dir.join("app/control.sock");
    let log = dir.join("baton.log");
    let args: Vec<String> = vec![
        apps::baton_bin().display().to_string(),
        "run".into(),
        "--delegate".into(),
        "--name".into(),
        "delegate".into(),
        "--control".into(),
        control.display().to_string(),
        "--app-control".into(),
        app_control.display().to_string(),
        "--listen".into(),
        format!("http={addr}"),
        "--".into(),
        FIXTURE.into(),
        "--listen".into(),
        format!("http={addr}"),
        "--control".into(),
        app_control.display().to_string(),
    ];
    let fault = dir.join("fault");
    let mut ns = InNamespace::start(&args, &[("BATON_FIXTURE_FAULT_FILE", &fault)], &log);
    let baton = ns.baton();
    assert_eq!(ns_pid(baton), Some(1), "baton is PID 1 in the namespace");
    let status = || baton_tests::control_status(&control);
    let first = wait_for(T, "the server to serve", || {
        let st = baton_tests::try_control_status(&control)?;
        (st.phase == "serving").then_some(st)
    });
    assert_eq!(first.mode, "delegate");
    let v1 = http::get(addr, "/version").unwrap();
    let v1 = baton_tests::Version::parse(&v1.body).unwrap();
    assert_eq!(v1.pid, first.pid, "status names the server's pid (inside)");
    let load = Load::start(addr, Mode::KeepAlive, 8, Duration::from_secs(300), u64::MAX);
    wait_for(T, "load", || (load.done() > 50).then_some(()));
    let mut pids = vec![first.pid];
    for i in 0..5u64 {
        let before = status();
        if i % 2 == 0 {
            let out = baton_tests::supervisor::baton_cli(&[
                "upgrade",
                "--json",
                "--control",
                &control.display().to_string(),
            ]);
            assert_eq!(out.code, 0, "forwarded upgrade {i}: {out:?}");
            assert_eq!(out.json()["to_generation"], i + 2);
        } else {
            proc::signal(baton, rustix::process::Signal::HUP);
        }
        let after = wait_for(T, "baton to follow the new main pid", || {
            let st = status();
            (st.pid != before.pid
                && st.phase == "serving"
                && st.generation == before.generation + 1)
                .then_some(st)
        });
        let v = wait_for(T, "the new generation to answer", || {
            let r = http::get(addr, "/version").ok()?;
            baton_tests::Version::parse(&r.body).filter(|v| v.pid == after.pid)
        });
        assert_eq!(v.generation, i + 2, "the server's own generation number");
        pids.push(after.pid);
        // The old generation exits and is reaped: baton is left with one
        // child, the new main process.
        wait_for(T, "the old generation to be reaped", || {
            let kids = proc::children(baton);
            (kids.len() == 1 && ns_pid(kids[0]) == Some(after.pid)).then_some(())
        });
        let before_load = load.done();
        wait_for(T, "load progress", || {
            (load.done() > before_load + 50).then_some(())
        });
    }
    let stats = load.stop();
    eprintln!(
        "delegate: 5 self-upgrades followed, main pids (inside) {pids:?}; load {} ok, {} failed, {} closes {:?}",
        stats.ok, stats.failed, stats.closes, stats.errors
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    // The server hands its idle keep-alive connections to each successor:
    // none is closed (`Connection: close`), and every generation, the last
    // one included, answered on them.
    assert_eq!(
        stats.closes, 0,
        "keep-alive connections closed instead of handed over: {stats:?}"
    );
    assert_eq!(
        stats.pids,
        pids.iter()
            .copied()
            .collect::<std::collections::BTreeSet<u32>>(),
        "the pids the load saw (inside the namespace) are the 6 generations'"
    );
    let st = status();
    assert_eq!(st.counters.upgrades_succeeded, 5, "{st:?}");
    assert!(
        st.notes.iter().any(|n| n.starts_with("processes reaped: ")),
        "{:?}",
        st.notes
    );
    assert!(zombies(baton).is_empty());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        text.matches("following the server's upgrade").count(),
        5,
        "{text}"
    );
    // A forwarded upgrade that fails: its exit code and message come back,
    // and baton keeps following the same main pid.
    let upgrade = || {
        baton_tests::supervisor::baton_cli(&[
            "upgrade",
            "--json",
            "--control",
            &control.display().to_string(),
        ])
    };
    let serving = st.pid;
    std::fs::write(&fault, "exit-at-start\n").unwrap();
    let out = upgrade();
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(status().pid, serving);
    // The new generation dies right after its promotion: the old one takes
    // the service back (MAINPID=<its own pid>), and baton follows it back.
    // (A request held open keeps the old one draining meanwhile; a
    // `/slow?ms=2000` one could end first on a busy machine, and the old
    // generation exit before its successor died.)
    let held = http::hold(http::connect(addr).unwrap()).expect("a held request");
    std::fs::write(&fault, "exit-at:promoted\n").unwrap();
    let out = upgrade();
    let (r, _) = held.release().expect("the held request completes");
    assert_eq!(r.status, 200);
    eprintln!("new generation dies after promotion: {out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    let back = wait_for(T, "the old generation to serve again", || {
        let st = status();
        (st.phase == "serving" && st.pid == serving).then_some(st)
    });
    let r = http::get(addr, "/version").unwrap();
    assert_eq!(baton_tests::Version::parse(&r.body).unwrap().pid, back.pid);
    assert_eq!(back.counters.upgrades_failed, 2, "{back:?}");
    wait_for(T, "one process left besides baton", || {
        (proc::children(baton).len() == 1 && zombies(baton).is_empty()).then_some(())
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // SIGTERM: forwarded to the server, which drains and exits 0; so does
    // baton.
    proc::signal(baton, rustix::process::Signal::TERM);
    let code = ns.wait(T).expect("baton exits");
    assert_eq!(code.code(), Some(0), "{text}");
}
