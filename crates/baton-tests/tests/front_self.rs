//! Issue 17: `baton upgrade --self`. baton re-executes itself in place
//! (same pid, the app stays its child), carrying its listeners, the control
//! socket, its state and, with `--front http`, the clients' idle keep-alive
//! connections. Each test runs baton from a copy of the binary that it
//! replaces before `--self`, so the new image is another file (its inode
//! shows in `baton status`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use apps::node_server_cmd as node_app;
use baton_tests::apps::{self, strings as s};
use baton_tests::keepalive::{Clients, compile_java};
use baton_tests::load::{Load, Mode};
use baton_tests::supervisor::{CliOut, RunOpts, Supervised};
use baton_tests::{TestDir, proc, wait_for};

const T: Duration = Duration::from_secs(30);

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

/// baton's open fds: number -> what (for messages).
fn fd_list(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                Some(format!(
                    "{} -> {}",
                    e.file_name().to_string_lossy(),
                    target.display()
                ))
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The inode of a `socket:[INODE]` fd in [`fd_list`]'s form.
fn socket_inode(fd: &str) -> Option<&str> {
    fd.split_once("socket:[")?.1.strip_suffix(']')
}

/// The inodes of connections in the network namespace of `pid`:
/// established TCP sockets and connected Unix stream sockets.
fn connection_inodes(pid: u32) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    // /proc/net/unix: Num RefCount Protocol Flags Type St Inode [Path];
    // St 03 = connected.
    let unix = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    for l in unix.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let (Some(&"03"), Some(ino)) = (f.get(5), f.get(6)) {
            out.insert((*ino).to_owned());
        }
    }
    // /proc/net/tcp{,6}: sl local remote st ... inode (field 9); st 01 =
    // ESTABLISHED.
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if let (Some(&"01"), Some(ino)) = (f.get(3), f.get(9)) {
                out.insert((*ino).to_owned());
            }
        }
    }
    out
}

/// baton's fds other than connections: established TCP ones (with
/// `--front`, client and pooled upstream connections come and go with the
/// load) and connected Unix ones (a `baton` command's control connection
/// closing, tokio's signal socketpair). One listing of the fds, classified
/// by the socket tables read after it: a connection that opens meanwhile is
/// not in the listing, one that closes meanwhile counts once, as a non-
/// connection, so a count is never low, only high for a moment.
fn fds_but_connections(pid: u32) -> usize {
    let fds = fd_list(pid);
    let conns = connection_inodes(pid);
    fds.iter()
        .filter(|l| !socket_inode(l).is_some_and(|i| conns.contains(i)))
        .count()
}

/// Wait (bounded) until baton holds at most `want` fds besides its
/// connections: a connection that just ended may take a moment to close.
fn assert_fds_settle(pid: u32, want: usize, what: &str) {
    let got = baton_tests::wait_for_opt(T, || (fds_but_connections(pid) <= want).then_some(()));
    assert!(
        got.is_some(),
        "{what}: baton holds {} fds besides connections, expected at most {want}: {:#?}",
        fds_but_connections(pid),
        fd_list(pid)
    );
}

/// `baton run` (`--front http` if `front`) of the Node app, ready by
/// HTTP, started from a copy of baton in a directory of its own (the test
/// replaces that copy before `--self`): the directory, the copy's path,
/// the supervisor.
fn node_from_a_copy(name: &str, front: bool) -> (TestDir, PathBuf, Supervised) {
    let bin_dir = TestDir::new(&format!("{name}-bin"));
    let bin = baton_copy(&bin_dir);
    let sup = Supervised::start(
        name,
        RunOpts {
            ready: Some("http://{addr}/health".into()),
            args: if front {
                s(&["--front", "http"])
            } else {
                vec![]
            },
            command: node_app(),
            bin: Some(bin.clone()),
            ..RunOpts::default()
        },
    );
    (bin_dir, bin, sup)
}

/// 4 keep-alive clients (bounded: 2 min, 200,000 requests), once they
/// have completed 20 requests.
fn keepalive_load(sup: &Supervised) -> Load {
    let load = Load::start(
        sup.addr,
        Mode::KeepAlive,
        4,
        Duration::from_secs(120),
        200_000,
    );
    load.wait_progress(20, T);
    load
}

fn self_upgrade(sup: &Supervised) -> CliOut {
    sup.upgrade(&["--self", "--json", "--timeout", "60s"])
}

#[test]
fn self_upgrade_without_front_keeps_the_app_the_listeners_and_the_fds() {
    let (_bin_dir, bin, sup) = node_from_a_copy("self-plain", false);
    let load = keepalive_load(&sup);
    let before = sup.status();
    let fds_before = fds_but_connections(sup.pid);
    assert_eq!(self_field(&sup, "execs"), "0");
    let mut baseline: Option<(usize, Vec<String>)> = None;
    for i in 1..=4u64 {
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
        // Repeated --self leaks nothing. The first image may hold more: fds
        // its parent left open (marked close-on-exec at start, gone at the
        // first exec) and tokio's handle of a child it spawned itself. The
        // count after the second exec is the baseline (an image started by
        // an exec, as every later one); a leak of one fd per exec shows at
        // the third or the fourth. (A count can be one high for a moment —
        // a connection closing as it is read — never low, so the later
        // ones must settle at or below the baseline: were the baseline one
        // high, a leak still shows at the fourth.)
        let n = fds_but_connections(sup.pid);
        match (i, &baseline) {
            (1, _) => assert!(
                n <= fds_before,
                "{n} fds after --self 1, {fds_before} before: {:#?}",
                fd_list(sup.pid)
            ),
            (2, _) => baseline = Some((n, fd_list(sup.pid))),
            (_, Some((want, list))) => assert_fds_settle(
                sup.pid,
                *want,
                &format!("after --self {i} (after --self 2: {list:#?})"),
            ),
            (_, None) => unreachable!("the baseline is taken at the second exec"),
        }
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
    sup.status();
    // An app upgrade in between leaks nothing either.
    assert_fds_settle(
        sup.pid,
        baseline.map(|(n, _)| n).unwrap_or_default(),
        "after an app upgrade and --self",
    );
}

#[test]
fn a_failed_exec_leaves_the_old_image_serving_with_a_clear_error() {
    let (_bin_dir, bin, sup) = node_from_a_copy("self-fail", true);
    sup.status();
    let fds_before = fds_but_connections(sup.pid);
    let load = keepalive_load(&sup);
    let before = sup.status();
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
    let st = load.stop();
    // Once the load's connections are gone: the fds of before it.
    assert_fds_settle(sup.pid, fds_before, "after the failed exec");
    // A good binary again: it works.
    replace_binary(&bin);
    let out = self_upgrade(&sup);
    assert_eq!(out.code, 0, "{out:?}\n{}", sup.log_text());
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
    let (_bin_dir, bin, sup) = node_from_a_copy("self-front", true);
    let java_cp = compile_java(&sup.dir.path);
    // At rest, after a first --self (see the test without the front).
    assert_eq!(self_upgrade(&sup).code, 0);
    sup.status();
    let fds_at_rest = fds_but_connections(sup.pid);
    let before = sup.status();
    let url = format!("http://{}/", sup.addr);
    let clients = Clients::start(&["GET", "POST"], &url, &sup.dir, &java_cp);
    clients.wait_total(20, "every client to complete requests");
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
        clients.wait_more(10, "every client to go on after --self");
    }
    // The new image still supervises: an app upgrade through the front.
    let v = sup.upgrade_ok();
    assert_eq!(v.generation, 2);
    clients.wait_more(10, "every client to go on after the app upgrade");
    let counts = clients.finish();
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
    assert_fds_settle(sup.pid, fds_at_rest, "at rest after the load");
}

#[test]
fn a_new_baton_that_cannot_read_the_state_goes_back_to_the_old_one() {
    let (_bin_dir, bin, sup) = node_from_a_copy("self-back", true);
    let load = keepalive_load(&sup);
    let before = sup.status();
    // The "new baton": the real one, but the state's length in the
    // environment is wrong, so it cannot read the state.
    let script = format!(
        "#!/bin/sh\nBATON_SELF_STATE=\"${{BATON_SELF_STATE%%:*}}:1\" exec {} \"$@\"\n",
        apps::baton_bin().display()
    );
    let tmp = bin.with_extension("script");
    baton_tests::write_exe(&tmp, script.as_bytes());
    std::fs::rename(&tmp, &bin).unwrap();
    let out = self_upgrade(&sup);
    assert_eq!(out.code, 1, "{out:?}\n{}", sup.log_text());
    let msg = out.json()["last"].as_str().unwrap_or_default().to_owned();
    assert!(
        msg.starts_with("returned: the new baton could not read the state"),
        "{msg}"
    );
    assert_eq!(self_field(&sup, "execs"), "0");
    let after = sup.status();
    assert_eq!(after.answered_by, sup.pid);
    assert_eq!(
        (after.generation, after.pid),
        (before.generation, before.pid)
    );
    // The previous image took its idle connections back: the load goes on
    // without an error.
    load.wait_progress(50, T);
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

/// A field of the front's line in `baton status`'s notes.
fn front_count(sup: &Supervised, field: &str) -> u64 {
    let note = sup
        .status()
        .notes
        .into_iter()
        .find(|n| n.starts_with("front:"))
        .expect("a front line in the status notes");
    note.split_whitespace()
        .find_map(|w| w.strip_prefix(field)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {note}"))
}

/// One HTTP/1.1 response read from `c` (headers and a Content-Length
/// body).
fn read_response(c: &mut std::net::TcpStream) -> String {
    use std::io::Read as _;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = c.read(&mut byte).expect("reading a response head");
        assert_eq!(
            n,
            1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).expect("reading a response body");
    head + &String::from_utf8_lossy(&body)
}

#[test]
fn a_request_in_flight_finishes_before_the_exec_and_its_connection_is_carried() {
    use std::io::Write as _;
    let bin_dir = TestDir::new("self-slow-bin");
    let bin = baton_copy(&bin_dir);
    let sup = Supervised::start(
        "self-slow",
        RunOpts {
            args: s(&["--front", "http"]),
            command: node_app(),
            bin: Some(bin.clone()),
            ..RunOpts::default()
        },
    );
    let mut c = std::net::TcpStream::connect(sup.addr).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(b"GET /slow/1500 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    wait_for(T, "the slow request to be in flight upstream", || {
        (front_count(&sup, "upstream_busy") == 1).then_some(())
    });
    replace_binary(&bin);
    let out = self_upgrade(&sup);
    assert_eq!(out.code, 0, "{out:?}\n{}", sup.log_text());
    // The exec waited for it: answered in full by the old image.
    let first = read_response(&mut c);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(self_field(&sup, "carried"), "1");
    // Same connection, next request: the new image answers it.
    c.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let second = read_response(&mut c);
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(self_field(&sup, "execs"), "1");
}

/// Replace baton's binary at `bin` with a script that, run by `baton
/// upgrade --self` in baton's pid, writes `reached` and waits on the FIFO
/// `gate` before it execs the real baton: the exec is held open on
/// demand. Returns (reached, gate).
fn hold_the_exec(bin: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let reached = dir.join("exec.reached");
    let gate = dir.join("exec.gate");
    let st = std::process::Command::new("mkfifo")
        .arg(&gate)
        .status()
        .unwrap();
    assert!(st.success(), "mkfifo {}", gate.display());
    let script = format!(
        "#!/bin/sh\n: > '{}'\nread _ < '{}'\nexec '{}' \"$@\"\n",
        reached.display(),
        gate.display(),
        apps::baton_bin().display()
    );
    let tmp = bin.with_extension("script");
    baton_tests::write_exe(&tmp, script.as_bytes());
    std::fs::rename(&tmp, bin).unwrap();
    (reached, gate)
}

/// A SIGHUP (upgrade the app) and a SIGTERM (stop) sent to baton while
/// its new image is being executed are not lost, and do not kill it: they
/// wait, blocked, for the new image's handlers.
#[test]
fn signals_sent_during_the_exec_reach_the_new_image() {
    use rustix::process::Signal;
    let (bin_dir, bin, mut sup) = node_from_a_copy("self-signal", false);
    let g1 = sup.status();
    // SIGHUP during the exec: the new image upgrades the app.
    let (reached, gate) = hold_the_exec(&bin, &bin_dir.path);
    let cli =
        baton_tests::supervisor::upgrade_in_thread(&sup, &["--self", "--json", "--timeout", "60s"]);
    wait_for(T, "the exec to be held", || reached.exists().then_some(()));
    sup.signal(Signal::HUP);
    std::fs::write(&gate, "go\n").unwrap();
    let out = cli.join().unwrap();
    assert_eq!(out.code, 0, "--self: {out:?}\n{}", sup.log_text());
    assert_eq!(out.json()["pid"], sup.pid, "{out:?}");
    let g2 = sup.wait_generation(2, T);
    assert_ne!(g2.pid, g1.pid);
    assert_eq!(self_field(&sup, "execs"), "1");
    // SIGTERM during the exec: the new image stops baton and the app, as
    // a SIGTERM does.
    std::fs::remove_file(&reached).unwrap();
    std::fs::remove_file(&gate).unwrap();
    let (reached, gate) = hold_the_exec(&bin, &bin_dir.path);
    let cli =
        baton_tests::supervisor::upgrade_in_thread(&sup, &["--self", "--json", "--timeout", "60s"]);
    wait_for(T, "the exec to be held", || reached.exists().then_some(()));
    sup.signal(Signal::TERM);
    std::fs::write(&gate, "go\n").unwrap();
    let exit = sup.wait_exit(T).expect("baton to exit after the SIGTERM");
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", sup.log_text());
    wait_for(T, "the app to be stopped", || {
        (!proc::alive(g2.pid)).then_some(())
    });
    let out = cli.join().unwrap();
    assert!(
        sup.log_text().contains("SIGTERM"),
        "the log says why baton stopped: {out:?}\n{}",
        sup.log_text()
    );
}

/// The app's `NOTIFY_SOCKET` is carried: its last `STATUS=` line stays in
/// `baton status`, and a line it sends after the exec reaches the new
/// image (the socket path it has is still bound, by the same socket).
#[test]
fn the_apps_notify_socket_and_status_are_carried() {
    let bin_dir = TestDir::new("self-notify-bin");
    let bin = baton_copy(&bin_dir);
    let sup = Supervised::start(
        "self-notify",
        RunOpts {
            ready: Some("notify".into()),
            command: apps::pyapp(&["--notify"]),
            bin: Some(bin.clone()),
            ..RunOpts::default()
        },
    );
    let app_status = |sup: &Supervised| -> Option<String> {
        sup.status()
            .notes
            .iter()
            .find_map(|n| Some(n.strip_prefix("app status (STATUS=): ")?.to_owned()))
    };
    let before = wait_for(T, "the app's STATUS= line", || app_status(&sup));
    assert!(before.contains("serving"), "{before}");
    replace_binary(&bin);
    let out = self_upgrade(&sup);
    assert_eq!(out.code, 0, "--self: {out:?}\n{}", sup.log_text());
    assert_eq!(
        app_status(&sup).as_deref(),
        Some(before.as_str()),
        "the STATUS= line after --self\n{}",
        sup.log_text()
    );
    let r = baton_tests::http::get(sup.addr, "/notify?line=STATUS%3Dafter-self").unwrap();
    assert_eq!(
        r.status,
        200,
        "the app's sd_notify: {}",
        String::from_utf8_lossy(&r.body)
    );
    wait_for(T, "the new image to read the app's STATUS=", || {
        (app_status(&sup).as_deref() == Some("after-self")).then_some(())
    });
}
