//! HTTP/2 across upgrades (issue 14, item 1): a client that behaves as
//! RFC 9113 allows — Node's `http2` module, 16 sessions × 8 concurrent
//! streams, a new session on GOAWAY — sees no failed and no refused stream
//! across 10 upgrades, over h2c (prior knowledge) and over TLS (ALPN h2).
//!
//! "Refused" is what the server refused: an RST_STREAM(REFUSED_STREAM), or
//! a stream above the last stream id of a GOAWAY. A stream the client never
//! sent, because its session had already received the first GOAWAY, is a
//! retry (nghttp2 reports it with REFUSED_STREAM too, but also reports that
//! its HEADERS could not be sent; `h2_client.js` tells the two apart).

use std::path::Path;
use std::time::Duration;

use baton::control::Reply;
use baton_tests::h2node::{NodeH2, NodeH2Stats, h2c_url};
use baton_tests::tls::TlsServer;
use baton_tests::{Server, proc, wait_for};

const FIXTURE: &str = env!("CARGO_BIN_EXE_baton-fixture");
const T: Duration = Duration::from_secs(30);
const UPGRADES: usize = 10;

/// Upgrade through the control socket and wait until the old generation is
/// gone and the new one knows it.
fn upgrade(s: &Server) -> u32 {
    match baton_tests::control_upgrade(&s.control) {
        Reply::Upgraded(r) => {
            wait_for(T, "the old generation to exit", || {
                (!proc::alive(r.old_pid)).then_some(())
            });
            wait_for(T, "the new generation to see its predecessor gone", || {
                let st = baton_tests::control_status(&s.control);
                (!st.notes.iter().any(|n| n.contains("still draining"))).then_some(())
            });
            r.new_pid
        }
        other => panic!("upgrade failed: {other:?}"),
    }
}

/// Ten upgrades under the Node load; every answered pid is one we started.
fn ten_upgrades_under_load(s: &Server, load: NodeH2) -> NodeH2Stats {
    load.wait_progress(500, T);
    let mut pids = vec![s.pid()];
    for _ in 0..UPGRADES {
        pids.push(upgrade(s));
        load.wait_progress(300, T);
    }
    let stats = load.stop();
    eprintln!(
        "HTTP/2 across {UPGRADES} upgrades: ok {} refused {} retry {} failed {}, {} sessions, {} GOAWAY frames, errors {:?}",
        stats.ok,
        stats.refused,
        stats.retry,
        stats.failed,
        stats.sessions,
        stats.goaways,
        stats.errors
    );
    for g in &stats.goaway_frames {
        eprintln!("  GOAWAY {g}");
    }
    assert!(
        stats.pids.iter().all(|p| pids.contains(p)),
        "answers only from our generations {pids:?}: {:?}",
        stats.pids
    );
    assert!(
        stats.pids.contains(pids.last().unwrap_or(&0)),
        "the last generation answered: {:?}",
        stats.pids
    );
    stats
}

fn assert_nothing_lost(stats: &NodeH2Stats) {
    assert_eq!(stats.failed, 0, "failed streams: {:?}", stats.errors);
    assert_eq!(stats.refused, 0, "refused streams: {:?}", stats.errors);
    // Each upgrade sent every session a GOAWAY: it reconnected.
    assert!(
        stats.sessions > 16 * UPGRADES as u64 / 2,
        "sessions reopened after GOAWAY: {stats:?}"
    );
    // Two-phase: a GOAWAY with last stream id 2^31-1, then the final one.
    assert!(
        stats
            .goaway_frames
            .iter()
            .any(|g| g["lastStreamID"].as_u64() == Some(0x7fff_ffff)),
        "a first GOAWAY(2^31-1): {:?}",
        stats.goaway_frames
    );
}

#[test]
fn h2c_streams_are_neither_failed_nor_refused_across_ten_upgrades() {
    let s = Server::start(Path::new(FIXTURE), "h2c-node");
    let load = NodeH2::start(
        &h2c_url(s.addr),
        16,
        8,
        "/version",
        None,
        Duration::from_secs(200),
    );
    let stats = ten_upgrades_under_load(&s, load);
    assert_nothing_lost(&stats);
}

#[test]
fn tls_h2_streams_are_neither_failed_nor_refused_across_ten_upgrades() {
    let s = TlsServer::start(Path::new(FIXTURE), "h2-tls-node", &[]);
    let url = format!("https://127.0.0.1:{}", s.tls_port);
    let load = NodeH2::start(
        &url,
        16,
        8,
        "/version",
        Some(&s.pki.ca),
        Duration::from_secs(200),
    );
    let stats = ten_upgrades_under_load(&s.server, load);
    assert_nothing_lost(&stats);
}
