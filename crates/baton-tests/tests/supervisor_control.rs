//! Issue 5 (supervisor mode): the control socket and the `baton
//! upgrade|status|stop` client. Exit codes and JSON, the socket's path
//! and permissions, other uids refused, and a library-mode server driven
//! by the same client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_tests::apps::pyapp;
use baton_tests::supervisor::{RunOpts, Supervised, baton_cli, upgrade_in_thread};
use baton_tests::{apps, wait_for};

const T: Duration = Duration::from_secs(30);
const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");

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

/// `sh` waiting for `gate` to exist, then running `then` (the app, or an
/// exit): a generation that starts for as long as the test wants.
fn gated(gate: &Path, then: &str) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "while [ ! -e '{}' ]; do sleep 0.02; done; {then}",
            gate.display()
        ),
    ]
}

/// Issue 14, item 3: `baton upgrade` while the first generation starts
/// waits for it (the status names the starting generation and its pid),
/// then upgrades; `--no-wait` is refused at once, and so is a second
/// upgrade while one waits (exit 4).
#[test]
fn an_upgrade_asked_for_during_the_start_waits_for_it_then_runs() {
    let gates = baton_tests::TestDir::new("upgrade-during-start-gate");
    let gate = gates.join("gate");
    let app = format!("exec {}", apps::go_server().display());
    let sup = Supervised::start(
        "upgrade-during-start",
        RunOpts {
            ready: Some("tcp".into()),
            command: gated(&gate, &app),
            no_wait: true,
            ..RunOpts::default()
        },
    );
    let st = wait_for(T, "status during the start", || {
        sup.try_status()
            .filter(|s| s.phase == "starting" && s.pid != 0)
    });
    assert_eq!(st.generation, 1, "{st:?}");
    assert!(baton_tests::proc::alive(st.pid), "{st:?}");

    let out = sup.upgrade(&["--no-wait"]);
    assert_eq!(out.code, 4, "--no-wait is refused at once: {out:?}");
    assert!(out.stderr.contains("starting for"), "{out:?}");

    let waiter = upgrade_in_thread(&sup, &[]);
    let line = format!("waiting for generation 1 (pid {})", st.pid);
    wait_for(T, "the upgrade to wait for the start", || {
        sup.log_text().contains(&line).then_some(())
    });
    let second = sup.upgrade(&[]);
    assert_eq!(second.code, 4, "one upgrade waits at a time: {second:?}");
    assert!(second.stderr.contains("already waiting"), "{second:?}");

    std::fs::write(&gate, "").unwrap();
    let out = waiter.join().unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains(&line),
        "it said what it waited for: {out:?}"
    );
    let st = sup.status();
    assert_eq!((st.generation, st.phase.as_str()), (2, "serving"), "{st:?}");
    sup.wait_generation(2, T);
}

/// Issue 14, item 3: when the start an upgrade waits for fails, the
/// upgrade runs as the start (with its own command line).
#[test]
fn an_upgrade_waiting_for_a_failed_start_runs_as_the_start() {
    let gates = baton_tests::TestDir::new("upgrade-after-failed-start-gate");
    let gate = gates.join("gate");
    let sup = Supervised::start(
        "upgrade-after-failed-start",
        RunOpts {
            ready: Some("tcp".into()),
            command: gated(&gate, "exit 3"),
            no_wait: true,
            ..RunOpts::default()
        },
    );
    wait_for(T, "status during the start", || {
        sup.try_status()
            .filter(|s| s.phase == "starting" && s.pid != 0)
    });
    let go = apps::go_server().display().to_string();
    let waiter = upgrade_in_thread(&sup, &["--", &go]);
    wait_for(T, "the upgrade to wait for the start", || {
        sup.log_text()
            .contains("waiting for generation 1")
            .then_some(())
    });
    std::fs::write(&gate, "").unwrap();
    let out = waiter.join().unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    let v = sup.wait_generation(2, T);
    assert_eq!(sup.status().generation, 2, "{v:?}");
}
