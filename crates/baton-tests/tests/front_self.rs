//! Issue 17: `baton upgrade --self`. baton re-executes itself in place
//! (same pid, the app stays its child), carrying its listeners, the control
//! socket, its state and, with `--front http`, the clients' idle keep-alive
//! connections. Each test runs baton from a copy of the binary that it
//! replaces before `--self`, so the new image is another file (its inode
//! shows in `baton status`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_tests::apps::{self, strings as s};
use baton_tests::keepalive::{Client, KINDS, compile_java};
use baton_tests::load::{Load, Mode};
use baton_tests::supervisor::{CliOut, RunOpts, Supervised};
use baton_tests::{TestDir, proc, wait_for};

const T: Duration = Duration::from_secs(30);

fn node_app() -> Vec<String> {
    vec![
        apps::node().display().to_string(),
        apps::apps_dir()
            .join("node_server.js")
            .display()
            .to_string(),
    ]
}

/// A copy of the freshly built baton at `dir/bin/baton`.
fn baton_copy(dir: &TestDir) -> PathBuf {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let p = dir.join("bin/baton");
    baton_tests::copy_exe(&apps::baton_bin(), &p);
    p
}

/// Put a new copy of baton at `path` (a new file: renamed over the running
/// one, as a package manager does). Returns its inode.
fn replace_binary(path: &Path) -> u64 {
    let tmp = path.with_extension("new");
    baton_tests::copy_exe(&apps::baton_bin(), &tmp);
    std::fs::rename(&tmp, path).unwrap();
    std::fs::metadata(path).unwrap().ino()
}

/// A field of baton's note about itself in `baton status`.
fn self_field(sup: &Supervised, field: &str) -> String {
    let st = sup.status();
    let note = st
        .notes
        .iter()
        .find_map(|n| n.strip_prefix("baton: "))
        .unwrap_or_else(|| panic!("no `baton:` note in {:?}", st.notes))
        .to_owned();
    if field == "last" {
        return note.split_once(" last=").map(|x| x.1.to_owned()).unwrap();
    }
    note.split(' ')
        .find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {field} in {note}"))
        .to_owned()
}

fn self_upgrade(sup: &Supervised) -> CliOut {
    sup.upgrade(&["--self", "--json"])
}

#[test]
fn self_upgrade_without_front_keeps_the_app_the_listeners_and_the_fds() {
    let bin_dir = TestDir::new("self-plain-bin");
    let bin = baton_copy(&bin_dir);
    let sup = Supervised::start(
        "self-plain",
        RunOpts {
            ready: Some("http://{addr}/health".into()),
            command: node_app(),
            bin: Some(bin.clone()),
            ..RunOpts::default()
        },
    );
    let load = Load::start(
        sup.addr,
        Mode::KeepAlive,
        4,
        Duration::from_secs(120),
        200_000,
    );
    load.wait_progress(20, T);
    let before = sup.status();
    let fds_before = proc::open_fds(sup.pid);
    assert_eq!(self_field(&sup, "execs"), "0");
    let mut fds_after = Vec::new();
    for i in 1..=3u64 {
        let ino = replace_binary(&bin);
        let out = self_upgrade(&sup);
        assert_eq!(out.code, 0, "--self {i}: {out:?}\n{}", sup.log_text());
        let j = out.json();
        assert_eq!(j["pid"], sup.pid, "{j}");
        assert_eq!(j["execs"], i, "{j}");
        assert_eq!(j["app_pid"], before.pid, "{j}");
        // The new image is the new file.
        assert_eq!(self_field(&sup, "exe_ino"), ino.to_string());
        assert_eq!(self_field(&sup, "last"), "ok");
        fds_after.push(proc::open_fds(sup.pid));
        load.wait_progress(20, T);
    }
    let after = sup.status();
    assert_eq!(after.answered_by, sup.pid);
    assert_eq!(
        (after.generation, after.pid),
        (before.generation, before.pid)
    );
    // The app owns the client connections here: --self does not touch
    // them. (Stopped before the app upgrade, which without --front closes
    // idle keep-alive connections: the race the front removes.)
    let st = load.stop();
    assert_eq!(
        (st.failed, st.wrong),
        (0, 0),
        "{:?} {:?}",
        st.failures,
        st.errors
    );
    assert_eq!(
        st.pids.iter().copied().collect::<Vec<_>>(),
        vec![before.pid]
    );
    // It still supervises: an upgrade of the app works.
    let v = sup.upgrade_ok();
    assert_eq!(v.generation, 2);
    let out = self_upgrade(&sup);
    assert_eq!(out.code, 0, "--self after the app upgrade: {out:?}");
    assert_eq!(out.json()["app_pid"], v.pid);
    fds_after.push(proc::open_fds(sup.pid));
    // Repeated --self (and an app upgrade in between) leak nothing. The
    // first image may hold more: fds its parent left open (marked
    // close-on-exec at start, gone at the first exec) and tokio's handle of
    // a child it spawned itself.
    assert!(
        fds_after
            .iter()
            .all(|&n| n == fds_after[0] && n <= fds_before),
        "fds of baton: {fds_before} before, {fds_after:?} after each --self"
    );
}

#[test]
fn a_failed_exec_leaves_the_old_image_serving_with_a_clear_error() {
    let bin_dir = TestDir::new("self-fail-bin");
    let bin = baton_copy(&bin_dir);
    let sup = Supervised::start(
        "self-fail",
        RunOpts {
            ready: Some("http://{addr}/health".into()),
            args: s(&["--front", "http"]),
            command: node_app(),
            bin: Some(bin.clone()),
            ..RunOpts::default()
        },
    );
    let load = Load::start(
        sup.addr,
        Mode::KeepAlive,
        4,
        Duration::from_secs(120),
        200_000,
    );
    load.wait_progress(20, T);
    let before = sup.status();
    let fds_before = proc::open_fds(sup.pid);
    // Executable, but not a program: execve fails (ENOEXEC) after the front
    // froze.
    let tmp = bin.with_extension("bad");
    baton_tests::write_exe(&tmp, b"this is not a program\n");
    std::fs::rename(&tmp, &bin).unwrap();
    let out = self_upgrade(&sup);
    assert_eq!(out.code, 1, "{out:?}");
    let msg = out.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        msg.contains("executing") && msg.contains("keeps running as before"),
        "{msg}"
    );
    assert!(self_field(&sup, "last").starts_with("failed:"));
    assert_eq!(self_field(&sup, "execs"), "0");
    // The front thawed: idle connections go on.
    load.wait_progress(50, T);
    // Not executable at all: refused before anything is touched.
    let tmp = bin.with_extension("noexec");
    std::fs::write(&tmp, b"x").unwrap();
    std::fs::rename(&tmp, &bin).unwrap();
    let out = self_upgrade(&sup);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not an executable file")
    );
    let after = sup.status();
    assert_eq!(after.answered_by, sup.pid);
    assert_eq!(
        (after.generation, after.pid),
        (before.generation, before.pid)
    );
    assert_eq!(proc::open_fds(sup.pid), fds_before, "fds of baton");
    // A good binary again: it works.
    replace_binary(&bin);
    let out = self_upgrade(&sup);
    assert_eq!(out.code, 0, "{out:?}\n{}", sup.log_text());
    load.wait_progress(20, T);
    let st = load.stop();
    assert_eq!(
        (st.failed, st.wrong),
        (0, 0),
        "{:?} {:?}",
        st.failures,
        st.errors
    );
}

#[test]
fn keepalive_clients_through_the_front_see_no_errors_across_self_upgrades() {
    let bin_dir = TestDir::new("self-front-bin");
    let bin = baton_copy(&bin_dir);
    let sup = Supervised::start(
        "self-front",
        RunOpts {
            ready: Some("http://{addr}/health".into()),
            args: s(&["--front", "http"]),
            command: node_app(),
            bin: Some(bin.clone()),
            ..RunOpts::default()
        },
    );
    let java_cp = compile_java(&sup.dir.path);
    // At rest, after a first --self (see the test without the front).
    assert_eq!(self_upgrade(&sup).code, 0);
    let fds_at_rest = proc::open_fds(sup.pid);
    let before = sup.status();
    let url = format!("http://{}/", sup.addr);
    let clients: Vec<Client> = ["GET", "POST"]
        .iter()
        .flat_map(|m| KINDS.map(|k| (k, *m)))
        .map(|(k, m)| Client::start(k, m, &url, &sup.dir, &java_cp))
        .collect();
    let progressed = |base: &[(u64, u64)], n: u64| {
        clients
            .iter()
            .zip(base)
            .all(|(c, b)| c.progress().0 + c.progress().1 >= b.0 + b.1 + n)
    };
    let zero = vec![(0, 0); clients.len()];
    wait_for(T, "every client to complete requests", || {
        progressed(&zero, 20).then_some(())
    });
    for i in 2..=5u64 {
        let ino = replace_binary(&bin);
        let out = self_upgrade(&sup);
        assert_eq!(out.code, 0, "--self {i}: {out:?}\n{}", sup.log_text());
        let j = out.json();
        assert_eq!(j["pid"], sup.pid, "{j}");
        assert_eq!(j["app_pid"], before.pid, "{j}");
        assert_eq!(self_field(&sup, "exe_ino"), ino.to_string());
        let carried: u64 = self_field(&sup, "carried").parse().unwrap();
        assert!(carried > 0, "--self {i} carried no idle connection");
        eprintln!("--self {i}: carried {carried} idle client connections");
        let base: Vec<(u64, u64)> = clients.iter().map(Client::progress).collect();
        wait_for(T, "every client to go on after --self", || {
            progressed(&base, 10).then_some(())
        });
    }
    // The new image still supervises: an app upgrade through the front.
    let v = sup.upgrade_ok();
    assert_eq!(v.generation, 2);
    let base: Vec<(u64, u64)> = clients.iter().map(Client::progress).collect();
    wait_for(T, "every client to go on after the app upgrade", || {
        progressed(&base, 10).then_some(())
    });
    let counts: Vec<_> = clients.into_iter().map(Client::finish).collect();
    for c in &counts {
        eprintln!(
            "self-front: {}: {} ok, {} errors {} {}",
            c.label, c.ok, c.errors, c.kinds, c.samples
        );
    }
    for c in &counts {
        assert!(c.ok > 0, "{} completed no request", c.label);
        assert_eq!(
            c.errors, 0,
            "{} failed {} requests: {} {}",
            c.label, c.errors, c.kinds, c.samples
        );
    }
    assert_eq!(sup.status().answered_by, sup.pid);
    let out = self_upgrade(&sup);
    assert_eq!(out.code, 0, "--self at rest: {out:?}");
    // Once the clients are gone and the front's upstream connections idled
    // out, baton holds exactly the fds it held before the load.
    wait_for(T, "baton's fds to come back to their count at rest", || {
        (proc::open_fds(sup.pid) == fds_at_rest).then_some(())
    });
}
