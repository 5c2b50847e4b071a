//! Issue 5 (supervisor mode): generations that fail. One that exits at
//! start fails its upgrade; one that crashes while serving is restarted
//! (connections queue meanwhile) from the last command and executable that
//! worked, and a replaced script is not restarted at all.

use std::time::{Duration, Instant};

use baton_tests::apps::{pyapp, strings as s};
use baton_tests::supervisor::{RunOpts, Supervised};
use baton_tests::{apps, http, proc, wait_for};
use rustix::process::Signal;

const T: Duration = Duration::from_secs(30);

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
