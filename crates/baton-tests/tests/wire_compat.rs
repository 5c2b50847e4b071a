//! Wire compatibility with the previous release (issue 15): a build with
//! handoff protocol revision 2 upgrades from, and back to, the release
//! before it (`apps::PREVIOUS_RELEASE`, which speaks revision 1) under
//! keep-alive load, with 0 failed requests and the idle connections handed
//! over both ways. The previous release's fixture is built from this
//! repository's history the first time (`apps::previous_release_fixture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use baton::control::Reply;
use baton_tests::load::{Load, Mode};
use baton_tests::ws::{Lang, WsClients};
use baton_tests::{Server, ServerOpts, control_upgrade, proc, wait_for};

const T: Duration = Duration::from_secs(30);

fn this_release() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_baton-fixture"))
}

/// Replace the binary on disk with `with`, upgrade, check the report.
fn upgrade_to(s: &Server, with: &std::path::Path, what: &str) -> baton::UpgradeReport {
    s.replace_binary(with);
    let r = match control_upgrade(&s.control) {
        Reply::Upgraded(r) => r,
        other => panic!("{what}: the upgrade failed: {other:?}\n{}", s.log()),
    };
    wait_for(T, "the old generation to exit", || {
        (!proc::alive(r.old_pid)).then_some(())
    });
    eprintln!(
        "{what}: pid {} -> {}, {} handed over, {} closed at the deadline",
        r.old_pid, r.new_pid, r.handed_over, r.closed_at_deadline
    );
    r
}

#[test]
fn upgrades_from_and_back_to_the_previous_release_under_load_fail_nothing() {
    let previous = baton_tests::apps::previous_release_fixture();
    let opts = ServerOpts {
        args: vec!["--drain-timeout".into(), "3s".into()],
        ..ServerOpts::default()
    };
    let s = Server::start_with(&previous, "wire-compat", opts);
    let load = Load::start(
        s.addr,
        Mode::KeepAlive,
        16,
        Duration::from_secs(240),
        u64::MAX,
    );
    load.wait_progress(200, T);
    let mut handed = 0;
    // previous → this → previous → this.
    let r = upgrade_to(&s, this_release(), "previous release -> this one");
    handed += r.handed_over;
    load.wait_progress(load.done() + 200, T);
    // WebSockets opened on this release cannot move to the previous one,
    // which takes no owned connections: they get 1012 at the deadline.
    let py = WsClients::start(
        Lang::Python,
        &format!("ws://{}/ws", s.addr),
        2,
        Duration::from_millis(50),
        Duration::from_secs(120),
    );
    py.wait_ready(T);
    let r = upgrade_to(&s, &previous, "this release -> previous one");
    handed += r.handed_over;
    assert_eq!(
        r.closed_at_deadline, 2,
        "the two WebSockets stayed, and only they"
    );
    let ws = py.wait_ended(T);
    for c in &ws {
        assert_eq!(c.closes, vec![1012], "client {}: {:?}", c.client, c.errors);
        assert_eq!(c.seq_errors, 0);
    }
    load.wait_progress(load.done() + 200, T);
    let r = upgrade_to(&s, this_release(), "previous release -> this one, again");
    handed += r.handed_over;
    load.wait_progress(load.done() + 200, T);
    let stats = load.stop();
    eprintln!(
        "3 upgrades across releases: {} ok, {} failed, {} handed over, pids {:?}",
        stats.ok, stats.failed, handed, stats.pids
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert_eq!(stats.wrong, 0, "{:?}", stats.errors);
    assert_eq!(stats.closes, 0, "no Connection: close across releases");
    assert!(
        handed >= 8 * 3,
        "the keep-alive connections moved at every upgrade ({handed})"
    );
    assert_eq!(
        stats.pids.len(),
        4,
        "every generation answered: {:?}",
        stats.pids
    );
}

/// Issue 16 across releases: HTTPS keep-alive load (Python `ssl`,
/// HTTP/1.1, no retries) through previous → this → this → previous →
/// this. The previous release closes its TLS connections politely
/// (`Connection: close` or close_notify when idle) and the clients
/// reconnect; this release hands them over with their keys to this
/// release, and never to the previous one, which cannot take them. Not one
/// request fails, and between the two builds of this release the
/// connections moved (responses say `handed_over`).
#[test]
fn tls_keep_alive_load_fails_nothing_across_upgrades_to_and_from_the_previous_release() {
    use baton_tests::tls::{PyLoad, TlsServer};
    let previous = baton_tests::apps::previous_release_fixture();
    let s = TlsServer::start(&previous, "wire-compat-tls", &["--drain-timeout", "5s"]);
    let load = PyLoad::start(&s, "h1", 4, Duration::from_secs(240));
    let progress = |n: u64| {
        let start = load.progress();
        wait_for(T, "the HTTPS load", || {
            (load.progress() >= start + n).then_some(())
        });
    };
    progress(200);
    let steps: [(&std::path::Path, &str); 4] = [
        (this_release(), "previous release -> this one"),
        (this_release(), "this release -> this one"),
        (&previous, "this release -> previous one"),
        (this_release(), "previous release -> this one, again"),
    ];
    for (bin, what) in steps {
        upgrade_to(&s.server, bin, what);
        progress(200);
    }
    let st = load.stop();
    eprintln!("HTTPS load across releases: {st:?}");
    assert_eq!(st.failed, 0, "failed requests: {:?}", st.errors);
    assert_eq!(st.wrong, 0, "wrong responses: {:?}", st.errors);
    assert_eq!(
        st.close_endings.keys().filter(|k| *k != "clean").count(),
        0,
        "every connection a generation ended, ended with close_notify: {:?}",
        st.close_endings
    );
    assert_eq!(st.pids.len(), 5, "every generation answered: {:?}", st.pids);
    assert!(
        st.handed_over > 0,
        "TLS connections moved with their keys between the two builds of this release \
         (responses on handed-over connections: {})",
        st.handed_over
    );
}
