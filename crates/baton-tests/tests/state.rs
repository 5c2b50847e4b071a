//! Issue 8: typed application state carried across upgrades.

use std::path::Path;
use std::time::Duration;

use baton::control::{FailureKind, Reply, UpgradeReport};
use baton_tests::load::{Load, Mode};
use baton_tests::{Server, ServerOpts, http, proc, wait_for};

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const T: Duration = Duration::from_secs(60);

fn upgrade(s: &Server) -> Reply {
    baton_tests::control_upgrade(&s.control)
}

fn upgrade_ok(s: &Server) -> UpgradeReport {
    match upgrade(s) {
        Reply::Upgraded(r) => {
            wait_for(T, "the old generation to exit", || {
                (!proc::alive(r.old_pid)).then_some(())
            });
            r
        }
        other => panic!("upgrade failed: {other:?}\n{}", s.log()),
    }
}

fn upgrade_fails(s: &Server) -> String {
    match upgrade(s) {
        Reply::Failed(f) => {
            assert_eq!(f.kind, FailureKind::Failed, "{f:?}");
            f.message
        }
        other => panic!("expected a failed upgrade, got {other:?}"),
    }
}

fn post(s: &Server, path: &str, body: &[u8]) -> http::Resp {
    let mut c = http::connect(s.addr).unwrap();
    c.request(
        if path.starts_with("/kv/") {
            "PUT"
        } else {
            "POST"
        },
        path,
        true,
        body,
    )
    .unwrap()
}

fn counter(s: &Server) -> u64 {
    http::get(s.addr, "/counter")
        .unwrap()
        .text()
        .trim()
        .parse()
        .unwrap()
}

fn state_json(s: &Server) -> serde_json::Value {
    serde_json::from_slice(&http::get(s.addr, "/state").unwrap().body).unwrap()
}

#[test]
fn counter_and_cache_survive_twenty_upgrades_exactly() {
    let s = Server::start(Path::new(FIXTURE), "state20");
    let mut expected = 0;
    for i in 0..20u64 {
        for _ in 0..=i {
            let r = post(&s, "/counter", b"");
            assert_eq!(r.status, 200);
            expected += 1;
            assert_eq!(r.text().trim().parse::<u64>().unwrap(), expected);
        }
        let r = post(
            &s,
            &format!("/kv/key{i}"),
            format!("value {i} {}", "v".repeat(i as usize)).as_bytes(),
        );
        assert_eq!(r.status, 200);
        let rep = upgrade_ok(&s);
        assert!(rep.state_bytes > 0);
        assert_eq!(counter(&s), expected, "after upgrade {}", i + 1);
        for k in 0..=i {
            let r = http::get(s.addr, &format!("/kv/key{k}")).unwrap();
            assert_eq!(r.status, 200, "key{k} after upgrade {}", i + 1);
            assert_eq!(r.text(), format!("value {k} {}", "v".repeat(k as usize)));
        }
    }
    assert_eq!(s.version().generation, 21);
    assert_eq!(counter(&s), 210);
}

#[test]
fn an_incompatible_schema_rolls_back_and_names_both_versions() {
    let s = Server::start(Path::new(FIXTURE), "schema3");
    for _ in 0..5 {
        post(&s, "/counter", b"");
    }
    post(&s, "/kv/a", b"1");
    let old = s.version();
    s.arm_fault("state-schema:3");
    let msg = upgrade_fails(&s);
    eprintln!("{msg}");
    assert!(
        msg.contains("v1") && msg.contains("v3"),
        "names both versions: {msg}"
    );
    // The old generation keeps its state and serves.
    assert_eq!(s.version().pid, old.pid);
    assert_eq!(counter(&s), 5);
    assert_eq!(http::get(s.addr, "/kv/a").unwrap().text(), "1");
    assert_eq!(post(&s, "/counter", b"").text().trim(), "6");
    wait_for(T, "no child left", || {
        proc::children(old.pid).is_empty().then_some(())
    });
}

#[test]
fn a_v1_state_migrates_to_v2() {
    let s = Server::start(Path::new(FIXTURE), "schema2");
    for _ in 0..7 {
        post(&s, "/counter", b"");
    }
    post(&s, "/kv/x", b"kept");
    s.arm_fault("state-schema:2");
    upgrade_ok(&s);
    let st = state_json(&s);
    assert_eq!(st["counter"], 7);
    assert_eq!(st["migrated_from_v1"], 1, "{st}");
    assert_eq!(http::get(s.addr, "/kv/x").unwrap().text(), "kept");
}

#[test]
fn a_hundred_megabytes_of_state_moves_through_a_memfd() {
    let s = Server::start(Path::new(FIXTURE), "state100mb");
    s.arm_fault("state-fill:104857600");
    upgrade_ok(&s); // generation 2 starts with 100 MB in its cache
    post(&s, "/counter", b"");
    let rep = upgrade_ok(&s); // generation 2 → 3 carries the 100 MB
    eprintln!(
        "100 MB state: ready after {} ms, total {} ms, {} bytes of state",
        rep.ready_ms, rep.total_ms, rep.state_bytes
    );
    assert!(rep.state_bytes > 100 * 1024 * 1024, "{rep:?}");
    let st = state_json(&s);
    assert_eq!(st["counter"], 1);
    let r = http::get(s.addr, "/kv/__filler").unwrap();
    assert_eq!(r.body.len(), 104_857_600);
    assert!(r.body.iter().all(|b| *b == 0x5a));
    // The memfd path was used (the inline path is capped at 96 KiB in all,
    // 64 KiB per blob); the old side logs which way the state went.
    let log = s.log();
    let sent = log
        .lines()
        .rfind(|l| l.contains("sending state"))
        .unwrap_or_else(|| panic!("no state transfer logged:\n{log}"));
    assert!(sent.contains("sealed memfds"), "{sent}");
}

#[test]
fn oversized_state_is_refused_with_a_clear_error_and_rolls_back() {
    let s = Server::start(Path::new(FIXTURE), "state-limit");
    s.arm_fault("state-fill:2000000");
    upgrade_ok(&s);
    let old = s.version();
    s.arm_fault("state-limit:100000");
    let msg = upgrade_fails(&s);
    eprintln!("{msg}");
    assert!(msg.contains("limit"), "{msg}");
    assert_eq!(s.version().pid, old.pid);
    assert_eq!(
        http::get(s.addr, "/kv/__filler").unwrap().body.len(),
        2_000_000
    );
}

#[test]
fn corrupt_state_is_refused_with_a_clear_error_and_rolls_back() {
    let s = Server::start(Path::new(FIXTURE), "state-corrupt");
    s.arm_fault("export-garbage");
    upgrade_ok(&s); // generation 2 exports garbage
    post(&s, "/counter", b"");
    let old = s.version();
    let msg = upgrade_fails(&s);
    eprintln!("{msg}");
    assert!(msg.contains("corrupt"), "{msg}");
    assert_eq!(s.version().pid, old.pid);
    assert_eq!(counter(&s), 1);
    assert!(!s.log().contains("panicked"), "no panic");
}

#[test]
fn exact_mode_counter_equals_successful_increments_across_ten_upgrades() {
    let s = Server::start_with(
        Path::new(FIXTURE),
        "exact",
        ServerOpts {
            args: vec!["--state-mode".into(), "exact".into()],
            ..ServerOpts::default()
        },
    );
    // Keep-alive clients (their connections are handed over) and
    // `Connection: close` clients (new connections arrive during the pause
    // and must wait in the queue, not be refused), no retries.
    let load = Load::start(
        s.addr,
        Mode::CounterKeepAlive,
        4,
        Duration::from_secs(120),
        u64::MAX,
    );
    let close = Load::start(
        s.addr,
        Mode::CounterClose,
        4,
        Duration::from_secs(120),
        u64::MAX,
    );
    wait_for(T, "load", || {
        (load.done() > 100 && close.done() > 100).then_some(())
    });
    let mut pauses = Vec::new();
    for _ in 0..10 {
        let (before, before_close) = (load.done(), close.done());
        let r = upgrade_ok(&s);
        pauses.push(r.pause_ms.expect("exact mode reports the pause"));
        wait_for(T, "load progress", || {
            (load.done() > before + 50 && close.done() > before_close + 50).then_some(())
        });
    }
    let stats = load.stop();
    let close_stats = close.stop();
    let final_counter = counter(&s);
    eprintln!(
        "exact mode: {} + {} successful increments (keep-alive + close), counter {final_counter}, pauses (ms) {pauses:?}, failed {} + {}",
        stats.ok, close_stats.ok, stats.failed, close_stats.failed
    );
    for st in [&stats, &close_stats] {
        assert_eq!(st.failed, 0, "{:?}", st.errors);
        assert_eq!(st.wrong, 0, "{:?}", st.errors);
    }
    assert_eq!(
        final_counter,
        stats.ok + close_stats.ok,
        "every successful increment is in the counter"
    );
}

#[test]
fn live_mode_reports_which_writes_it_can_miss() {
    // Not an assertion of loss (timing-dependent): it prints how many
    // increments landed on the old generation after its snapshot, which
    // is what the exact mode prevents.
    let s = Server::start(Path::new(FIXTURE), "live");
    let load = Load::start(
        s.addr,
        Mode::CounterKeepAlive,
        8,
        Duration::from_secs(60),
        u64::MAX,
    );
    wait_for(T, "load", || (load.done() > 200).then_some(()));
    for _ in 0..5 {
        let before = load.done();
        upgrade_ok(&s);
        wait_for(T, "load progress", || {
            (load.done() > before + 100).then_some(())
        });
    }
    let stats = load.stop();
    let c = counter(&s);
    eprintln!(
        "live mode: {} successful increments, counter {c}, missed {}",
        stats.ok,
        stats.ok - c
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert!(c <= stats.ok);
}
