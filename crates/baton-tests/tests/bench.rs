//! Issues 9 and 18: the benchmark script runs end to end. Not a timed
//! assertion (the figures are the script's business, and these are debug
//! builds): it checks that `scripts/bench/run.sh --quick` starts baton-demo,
//! loads it with wrk through upgrades, runs every quick scenario (load, idle,
//! steady, latency, handoff, spawn, h2, memory) and prints a report in which
//! baton-demo has no error and no forced reconnect.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn bench_script_quick_run_reports_no_error_for_baton_demo() {
    assert!(
        Command::new("wrk").arg("--version").output().is_ok(),
        "wrk is required (apt-get install wrk; scripts/setup-test-deps.sh installs it)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin_dir = baton_tests::workspace_bin("baton-demo")
        .parent()
        .expect("target dir")
        .to_path_buf();
    assert!(
        bin_dir.join("bench-handoff").exists(),
        "bench-handoff not built"
    );
    let t = Instant::now();
    // `timeout` bounds the run (the script bounds each of its own waits too).
    let out = baton_tests::output(
        Command::new("timeout")
            .args(["--kill-after=5", "150"])
            .arg(root.join("scripts/bench/run.sh"))
            .args(["--quick", "--only", "baton-demo", "--bin-dir"])
            .arg(&bin_dir)
            .current_dir(&root),
    )
    .expect("run scripts/bench/run.sh");
    let took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("run.sh took {took:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(out.status.success(), "run.sh failed: {:?}", out.status);
    assert!(took < Duration::from_secs(120), "run.sh took {took:?}");

    // Section 1: four baton-demo rows (steady and upgrading, keep-alive and
    // Connection: close), each with 0/0/0/0 socket errors and 0 non-2xx; the
    // upgrading rows did their 2 upgrades with 0 failed requests and 0 forced
    // reconnects per upgrade.
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| baton-demo (library mode) |"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    let load: Vec<&Vec<&str>> = rows.iter().filter(|r| r.len() == 9).collect();
    assert_eq!(load.len(), 4, "load rows: {load:?}");
    for r in &load {
        assert_eq!(r[7], "0/0/0/0", "socket errors in {r:?}");
        assert_eq!(r[8], "0", "non-2xx in {r:?}");
        if r[2] == "2/2" {
            assert_eq!(r[3..5], ["0", "0"], "failed, forced reconnects in {r:?}");
        } else {
            assert_eq!(r[2], "0 (steady baseline)", "upgrades done in {r:?}");
            assert_eq!(r[3..5], ["0 in all", "0 in all"], "steady baseline {r:?}");
        }
    }
    assert_eq!(load.iter().filter(|r| r[2] == "2/2").count(), 2);

    // Section 2: the 64 idle connections all answered by the new generation.
    let idle: Vec<&Vec<&str>> = rows
        .iter()
        .filter(|r| r.len() == 6 && r[2].ends_with("/64"))
        .collect();
    assert_eq!(idle.len(), 1, "idle rows: {idle:?}");
    assert_eq!(idle[0][1..], ["1", "64/64", "0", "0", "0"], "idle row");

    // Sections 3 to 8 were printed, with figures.
    for heading in [
        "#### 3. Steady overhead",
        "#### 4. Upgrade latency",
        "#### 5. Handoff scale",
        "#### 6. Spawn cost",
        "#### 7. HTTP/2 streams",
        "#### 8. Memory",
    ] {
        assert!(stdout.contains(heading), "missing {heading}");
    }
    assert!(
        stdout.contains("| 200 | 200 |"),
        "handoff of 200 connections"
    );
    assert!(stdout.contains("Ratio per round, median"), "steady ratio");
    // bench-spawn printed both sizes, and both ballast servers were upgraded.
    assert!(stdout.contains("| 20 MiB | 10 |"), "bench-spawn 20 MiB");
    assert!(stdout.contains("| 256 MiB | 10 |"), "bench-spawn 256 MiB");
    // HTTP/2: both upgrades done, no failed stream (the h2 row has 8 cells).
    let h2: Vec<&Vec<&str>> = rows.iter().filter(|r| r.len() == 8).collect();
    assert_eq!(h2.len(), 1, "h2 rows: {h2:?}");
    assert_eq!(h2[0][1], "2", "h2 upgrades in {:?}", h2[0]);
    assert_eq!(h2[0][6], "0", "failed h2 streams in {:?}", h2[0]);
    // The run had no failure.
    assert!(!stdout.contains("Failures of this run"), "failures");
}
