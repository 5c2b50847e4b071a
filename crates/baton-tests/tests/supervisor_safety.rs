//! Issue 6 (supervisor mode): `baton run`'s admission gates, observation
//! window, canary, and kill -9 at every phase of an upgrade. Real processes
//! (a stdlib Python server, a Go net/http server), real load, exact counts.
//!
//! Soak: `BATON_SOAK=1 cargo nextest run -p baton-tests -E 'binary(supervisor_safety)' --run-ignored all`
//! runs 25 kills per phase and 1000 upgrades in a row.

use std::time::{Duration, Instant};

use baton_tests::load::{Load, Mode};
use baton_tests::supervisor::{CliOut, RunOpts, Supervised};
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

fn wait_load(load: &Load, n: u64) {
    let start = load.done();
    wait_for(T, "load progress", || {
        (load.done() >= start + n).then_some(())
    });
}

fn refused(out: &CliOut, what: &str) {
    assert_eq!(out.code, 3, "{what}: {out:?}");
    let j = out.json();
    assert_eq!(j["result"], "refused", "{what}: {j}");
    let m = j["message"].as_str().unwrap();
    eprintln!("  refused: {m}");
    assert!(m.contains(what), "{what}: {m}");
    assert!(m.contains("nothing changed"), "{m}");
}

/// Missing binary, non-executable file, failing `--check`, wrong SHA-256:
/// each refused (exit 3) with its reason, nothing spawned, the service
/// unchanged under load. Then the right SHA-256: the file that was hashed
/// is the one executed, even though the `--check` command swaps another
/// file in between.
#[test]
fn preflight_refusals_change_nothing_and_the_hashed_file_is_the_one_executed() {
    let dir = TestDir::new("sup-preflight-app");
    let app = dir.join("app");
    baton_tests::copy_exe(&apps::go_server(), &app);
    let check = dir.join("check.sh");
    let flag = dir.join("ok");
    std::fs::write(&check, format!("test -e {}\n", flag.display())).unwrap();
    let sup = Supervised::start(
        "sup-preflight",
        RunOpts {
            args: s(&["--check", &format!("sh {}", check.display())]),
            command: vec![app.display().to_string()],
            ..RunOpts::default()
        },
    );
    let before = sup.version();
    let load = Load::start(sup.addr, Mode::Close, 8, Duration::from_secs(120), u64::MAX);
    wait_load(&load, 20);

    // A failing --check.
    refused(&sup.upgrade(&["--json"]), "pre-flight check");
    std::fs::write(&flag, "").unwrap();
    // A wrong SHA-256.
    refused(
        &sup.upgrade(&["--json", "--expect-sha256", &"0".repeat(64)]),
        "SHA-256",
    );
    // Not a SHA-256 at all: a usage error, before anything is asked.
    let out = sup.upgrade(&["--expect-sha256", "xyz"]);
    assert_eq!(out.code, 2, "{out:?}");
    // A non-executable file.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(&sup.upgrade(&["--json"]), "not executable");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A missing binary.
    let aside = dir.join("app.aside");
    std::fs::rename(&app, &aside).unwrap();
    refused(&sup.upgrade(&["--json"]), "cannot be used");
    std::fs::rename(&aside, &app).unwrap();
    // A command that is not in PATH.
    refused(
        &sup.upgrade(&["--json", "--", "no-such-server-anywhere"]),
        "not found in PATH",
    );

    wait_load(&load, 20);
    let v = sup.version();
    assert_eq!(
        (v.pid, v.generation),
        (before.pid, before.generation),
        "nothing changed"
    );
    assert_eq!(
        proc::children(sup.pid),
        vec![before.pid],
        "no process was spawned"
    );

    // The right SHA-256, and a --check that replaces the file after it was
    // hashed: the hashed content runs (the Go server), not the new file
    // (`sleep`, which would never become ready).
    let sha = baton::admission::sha256_path(&app).unwrap();
    std::fs::write(
        &check,
        format!(
            "cp /bin/sleep {dir}/app.new && mv {dir}/app.new {app}\n",
            dir = dir.path.display(),
            app = app.display()
        ),
    )
    .unwrap();
    let out = sup.upgrade(&["--json", "--expect-sha256", &sha]);
    assert_eq!(out.code, 0, "{out:?}\n{}", sup.log_text());
    let j = out.json();
    let new_pid = j["new_pid"].as_u64().unwrap() as u32;
    let v = sup.wait_generation(2, T);
    assert_eq!((v.pid, v.version.as_str()), (new_pid, "go-app"));
    let exe = std::fs::read_link(format!("/proc/{new_pid}/exe")).unwrap();
    assert!(
        exe.to_string_lossy().ends_with("(deleted)"),
        "runs the hashed file, which was replaced on disk since: {}",
        exe.display()
    );
    // argv[0] is the command as given, not /proc/self/fd/N, and the pinned
    // fd did not reach the app.
    let cmdline = std::fs::read(format!("/proc/{new_pid}/cmdline")).unwrap();
    let argv0 = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap()).into_owned();
    assert_eq!(argv0, app.display().to_string());
    for fd in std::fs::read_dir(format!("/proc/{new_pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        assert!(
            !target.starts_with(&dir.path),
            "the app has the executable open: {}",
            target.display()
        );
    }
    wait_load(&load, 20);
    let stats = load.stop();
    eprintln!(
        "pre-flight: load {} ok, {} failed {:?}",
        stats.ok, stats.failed, stats.errors
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    let st = sup.status();
    assert_eq!(st.counters.upgrades_refused, 5, "{:?}", st.counters);
    assert_eq!(st.counters.upgrades_succeeded, 1);
}

/// `--memory-limit` below current use + estimate refuses with the numbers;
/// above, the upgrade proceeds. During the overlap the newcomer has the
/// higher `oom_score_adj`; afterwards it is back to baton's.
#[test]
fn memory_headroom_refuses_with_numbers_and_the_newcomer_goes_first_under_oom() {
    let sup = Supervised::start(
        "sup-mem-low",
        RunOpts {
            args: s(&["--memory-limit", "1M"]),
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    let before = sup.version();
    let out = sup.upgrade(&["--json"]);
    refused(&out, "not enough memory");
    let m = out.json()["message"].as_str().unwrap().to_owned();
    assert!(
        m.contains("estimated") && m.contains("configured memory limit") && m.contains("MiB"),
        "{m}"
    );
    assert_eq!(sup.version().pid, before.pid);
    drop(sup);

    let sup = Supervised::start(
        "sup-mem-ok",
        RunOpts {
            args: s(&["--memory-limit", "64G", "--drain-timeout", "20s"]),
            command: pyapp(&[]),
            ..RunOpts::default()
        },
    );
    let old = sup.version();
    // A slow request keeps the old generation alive after its stop signal.
    let addr = sup.addr;
    let slow = std::thread::spawn(move || http::get(addr, "/slow?ms=3000"));
    std::thread::sleep(Duration::from_millis(200));
    let control = sup.control.clone();
    let upgrade = std::thread::spawn(move || {
        baton_tests::supervisor::baton_cli(&[
            "upgrade",
            "--json",
            "--control",
            &control.display().to_string(),
        ])
    });
    let adj = |pid: u32| -> i32 {
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let baton_adj = adj(sup.pid);
    let new = wait_for(T, "the new generation to serve", || {
        sup.try_version().filter(|v| v.pid != old.pid)
    });
    assert!(proc::alive(old.pid), "the old generation still drains");
    let (old_adj, new_adj) = (adj(old.pid), adj(new.pid));
    eprintln!("oom_score_adj during the overlap: old {old_adj}, new {new_adj}");
    assert_eq!(old_adj, baton_adj);
    assert_eq!(
        new_adj,
        (baton_adj + 100).min(1000),
        "the newcomer goes first"
    );
    let out = upgrade.join().unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(slow.join().unwrap().unwrap().status, 200);
    assert_eq!(adj(new.pid), baton_adj, "back to baton's after the overlap");
    assert!(
        sup.log_text().contains("memory:"),
        "the admitted numbers are logged"
    );
}

/// A `baton run` of pyapp with a fault file, for the window tests.
fn windowed(name: &str, args: &[&str]) -> (Supervised, std::path::PathBuf, TestDir) {
    let fault = TestDir::new(&format!("{name}-fault"));
    let fault_file = fault.join("fault");
    let mut a = s(&[
        "--ready",
        "tcp",
        "--health",
        "http://{addr}/health",
        "--health-interval",
        "200ms",
    ]);
    a.extend(s(args));
    let sup = Supervised::start(
        name,
        RunOpts {
            args: a,
            command: pyapp(&["--fault-file", &fault_file.display().to_string()]),
            ..RunOpts::default()
        },
    );
    (sup, fault_file, fault)
}

/// The observation window: a new generation whose health turns bad 3 s
/// after it started is rolled back (the old one, idle meanwhile, takes the
/// new connections again); a healthy one stays. 0 failed requests for a
/// no-retry `Connection: close` client either way.
fn observation(bad: bool) {
    let name = if bad {
        "sup-observe-bad"
    } else {
        "sup-observe-good"
    };
    let (sup, fault_file, _fault) = windowed(name, &["--observe", "6s"]);
    let load = Load::start(sup.addr, Mode::Close, 8, Duration::from_secs(120), u64::MAX);
    wait_load(&load, 20);
    let old = sup.version();
    if bad {
        std::fs::write(&fault_file, "health-bad-after:3\n").unwrap();
    }
    let t = Instant::now();
    let out = sup.upgrade(&["--json"]);
    let elapsed = t.elapsed();
    wait_load(&load, 50);
    let stats = load.stop();
    eprintln!(
        "observe (bad={bad}) after {elapsed:?}: {out:?}\n  load {} ok, {} failed {:?}; pids {:?}",
        stats.ok, stats.failed, stats.errors, stats.pids
    );
    assert_eq!(
        stats.failed, 0,
        "no failed request for a Connection: close client: {:?}",
        stats.errors
    );
    let j = out.json();
    let new_pid = j["events"][0]["pid"].as_u64().unwrap() as u32;
    assert!(
        stats.pids.contains(&new_pid),
        "the new generation served during the window: {:?}",
        stats.pids
    );
    if bad {
        assert_eq!(out.code, 1, "{out:?}");
        let m = j["message"].as_str().unwrap();
        assert!(
            m.contains("health check") && m.contains("observation window"),
            "{m}"
        );
        assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
        assert!(
            elapsed < Duration::from_secs(6),
            "rolled back before the window ended: {elapsed:?}"
        );
        let v = sup.version();
        assert_eq!(v.pid, old.pid, "the old generation serves again");
        wait_for(T, "the rolled-back generation to exit", || {
            (!proc::alive(new_pid)).then_some(())
        });
        let st = sup.status();
        assert_eq!(
            (st.pid, st.generation, st.phase.as_str()),
            (old.pid, old.generation, "serving")
        );
    } else {
        assert_eq!(out.code, 0, "{out:?}");
        assert!(elapsed >= Duration::from_secs(6), "{elapsed:?}");
        assert_eq!(sup.version().pid, new_pid);
        assert!(!proc::alive(old.pid), "the old generation is gone");
    }
}

#[test]
fn observation_window_rolls_back_a_generation_whose_health_turns_bad() {
    observation(true);
}

#[test]
fn observation_window_keeps_a_healthy_generation() {
    observation(false);
}

/// The canary: both generations answer new connections for the window; a
/// new generation whose health check fails is rolled back, a healthy one is
/// promoted.
fn canary(bad: bool) {
    let name = if bad {
        "sup-canary-bad"
    } else {
        "sup-canary-good"
    };
    let (sup, fault_file, _fault) = windowed(name, &["--canary", "3s", "--canary-percent", "50"]);
    let load = Load::start(sup.addr, Mode::Close, 8, Duration::from_secs(120), u64::MAX);
    wait_load(&load, 20);
    let old = sup.version();
    if bad {
        std::fs::write(&fault_file, "health-bad-after:1\n").unwrap();
    }
    let out = sup.upgrade(&["--json"]);
    wait_load(&load, 50);
    let stats = load.stop();
    eprintln!(
        "canary (bad={bad}): {out:?}\n  load {} ok, {} failed {:?}; pids {:?}",
        stats.ok, stats.failed, stats.errors, stats.pids
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    let j = out.json();
    let new_pid = j["events"][0]["pid"].as_u64().unwrap() as u32;
    assert!(
        stats.pids.contains(&new_pid) && stats.pids.contains(&old.pid),
        "both generations answered: {:?}",
        stats.pids
    );
    assert!(
        j["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"].as_str().is_some_and(|m| m.contains("canary"))),
        "{j}"
    );
    if bad {
        assert_eq!(out.code, 1, "{out:?}");
        let m = j["message"].as_str().unwrap();
        assert!(m.contains("health check") && m.contains("canary"), "{m}");
        assert_eq!(
            sup.version().pid,
            old.pid,
            "rolled back to the old generation"
        );
        wait_for(T, "the canary to exit", || {
            (!proc::alive(new_pid)).then_some(())
        });
    } else {
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(sup.version().pid, new_pid, "promoted");
        assert!(!proc::alive(old.pid));
    }
}

#[test]
fn a_canary_whose_health_check_fails_is_rolled_back() {
    canary(true);
}

#[test]
fn a_healthy_canary_is_promoted() {
    canary(false);
}
