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

/// One wrk output as `wrk --latency -s count-closes.lua` prints it.
fn wrk_text(rps: u32, requests: u32, p99: &str) -> String {
    format!(
        "Running 5s test @ http://127.0.0.1:1/health\n  1 threads and 64 connections\n  \
         Latency Distribution\n     50%    1.00ms\n     99%    {p99}\n  \
         {requests} requests in 5.00s, 1.00MB read\nRequests/sec:  {rps}.00\n\
         Transfer/sec:      1.00MB\nBATON closes=0 non2xx=0\n"
    )
}

/// One `oha --output-format json` result (the fields report.py reads).
fn oha_json(rps: f64, p50: f64, p99: f64) -> String {
    serde_json::json!({
        "summary": {"successRate": 1.0, "requestsPerSec": rps},
        "metrics": {"latency_ms": {"p50": p50, "p99": p99}},
        "statusCodeDistribution": {"200": 1000},
        "errorDistribution": {},
    })
    .to_string()
}

/// Issue 17: the front scenario's section and goal lines, rendered by
/// scripts/bench/report.py from recorded outputs (wrk text, oha JSON, the
/// probe's samples), and the clients table's `--front` row with its goal.
/// Guards the parsing (oha's JSON fields, wrk's) and the arithmetic: the
/// per-round ratio, its median against 0.5, the p99 medians against
/// direct + 1 ms, CPU per request.
#[test]
fn bench_report_renders_the_front_scenario_and_its_goals() {
    let dir = baton_tests::TestDir::new("bench-report-front");
    let mut rows = vec![serde_json::json!({
        "kind": "meta", "rounds": "3", "front_rounds": "3", "client_upgrades": "8",
        "srv_cpu": "0", "load_cpu": "1",
    })];
    // Rounds: direct 20k/25k/30k req/s, front 12k each: ratios 0.6, 0.48,
    // 0.4 -> median 0.48, under the goal of 0.5.
    let direct_rps = [20_000, 25_000, 30_000];
    let d99 = ["1.00ms", "1.20ms", "1.10ms"];
    let f99 = ["2.50ms", "3.00ms", "2.00ms"];
    for r in 0..3 {
        let mut ways = [
            ("direct", direct_rps[r], 100_000, d99[r]),
            ("front", 12_000, 60_000, f99[r]),
        ];
        // the order alternates: direct, front; front, direct; ...
        if r % 2 == 1 {
            ways.reverse();
        }
        for (way, rps, requests, p99) in ways {
            let wrk = dir.join(&format!("wrk-{way}-{r}.txt"));
            std::fs::write(&wrk, wrk_text(rps, requests, p99)).unwrap();
            let sample = dir.join(&format!("sample-{way}-{r}.json"));
            let (rss, anon) = if way == "front" {
                (10_000, 5_000)
            } else {
                (5_000, 500)
            };
            std::fs::write(
                &sample,
                serde_json::json!({"n": 25,
                    "peak": {"VmRSS": rss + r, "RssAnon": anon, "Threads": 1},
                    "median": {"VmRSS": rss, "RssAnon": anon, "Threads": 1}})
                .to_string(),
            )
            .unwrap();
            // the supervisor: 0 s direct, 1.47 s through the front (24.5 µs
            // per request); the app 1.42 s / 0.96 s (14.2 / 16 µs)
            let (s1, c1) = if way == "front" {
                (3.47, 20.96)
            } else {
                (1.0, 11.42)
            };
            let (s0, c0) = if way == "front" {
                (2.0, 20.0)
            } else {
                (1.0, 10.0)
            };
            rows.push(serde_json::json!({
                "kind": "front_max", "way": way, "round": (r + 1).to_string(),
                "wrk": wrk, "sample": sample, "cmd": "wrk -c64 /health",
                "cpu_before": serde_json::json!({"self_s": s0, "children_s": c0}).to_string(),
                "cpu_after": serde_json::json!({"self_s": s1, "children_s": c1}).to_string(),
            }));
        }
    }
    // Fixed rate, half the direct max: p99 direct 1.0/1.2/1.1 ms, front
    // 2.5/3.0/2.0 ms: medians 1.10 and 2.50 ms, more than 1 ms apart. A
    // quarter: 0.50 ms apart (no goal line of its own).
    for (share, rate, front_extra) in [(2, 12_500, 0.0), (4, 6_250, -0.9)] {
        for r in 0..3 {
            for (way, p99) in [("direct", d99[r]), ("front", f99[r])] {
                let mut ms: f64 = p99.trim_end_matches("ms").parse().unwrap();
                if way == "front" {
                    ms += front_extra;
                }
                let f = dir.join(&format!("oha-{share}-{way}-{r}.json"));
                std::fs::write(&f, oha_json(f64::from(rate), 0.5, ms)).unwrap();
                rows.push(serde_json::json!({
                    "kind": "front_rate", "way": way, "round": (r + 1).to_string(),
                    "rate": rate.to_string(), "share": share.to_string(), "file": f,
                    "cmd": format!("oha -q {rate}"),
                }));
            }
        }
    }
    for (way, state, rss) in [
        ("direct", "idle", 5_000),
        ("front", "idle", 5_200),
        ("direct", "after", 5_000),
        ("front", "after", 9_800),
    ] {
        let mem = serde_json::json!({"VmRSS": rss, "RssAnon": 500, "Threads": 1}).to_string();
        rows.push(serde_json::json!({"kind": "front_mem", "way": way, "state": state, "mem": mem}));
    }
    // The clients table: the --front row, 0 errors for each client over 8
    // upgrades.
    for client in ["java-httpclient", "node-http", "python-requests"] {
        let f = dir.join(&format!("clients-{client}.json"));
        let upgrades: Vec<_> = (1..=8)
            .map(|n| serde_json::json!({"n": n, "ready_ms": 5.0, "gone_ms": 9.0}))
            .collect();
        std::fs::write(
            &f,
            serde_json::json!({"upgrades": upgrades,
                "client": {"client": client, "ok": 2000, "errors": 0, "kinds": {}}})
            .to_string(),
        )
        .unwrap();
        rows.push(serde_json::json!({
            "kind": "clients", "client": client, "peer": "baton-run-node-front", "file": f,
        }));
    }
    let results = dir.join("results.jsonl");
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&results, text).unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = baton_tests::output(
        Command::new("timeout")
            .args(["--kill-after=5", "60", "python3"])
            .arg(root.join("scripts/bench/report.py"))
            .arg(&results)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
    )
    .expect("run scripts/bench/report.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "report.py failed: {:?}", out.status);

    for line in [
        "`baton run --front http`: through the front vs direct (Go app)",
        // max req/s, per round, and the median ratio
        "| 1 | direct, front | 20,000 | 12,000 | × 0.600 | 1.00 ms | 2.50 ms | 0 |",
        "| 2 | front, direct | 25,000 | 12,000 | × 0.480 | 1.20 ms | 3.00 ms | 0 |",
        "Ratio per round, front, median: **× 0.480** (× 0.400–0.600)",
        "the `baton run` process 24.5 µs through the front (0.0 µs direct), the Go app 16.0 µs \
         through the front (14.2 µs direct)",
        // fixed rate, per round, and the medians
        "| 3 | direct, front | 0.50 ms | 1.10 ms | 0.50 ms | 2.00 ms | +0.90 ms | 12,500 / 12,500 | 0 |",
        "Median p99: direct 1.10 ms, front 2.50 ms (+1.40 ms)",
        "**Latency at a fixed rate, a quarter of the direct max**: `oha -q 6250`: 6,250 req/s",
        "Median p99: direct 1.10 ms, front 1.60 ms (+0.50 ms)",
        // the supervisor's own figures
        "| `baton run --front http` | under load (75 samples) | 9.77 MiB (9.77 MiB) | 4.88 MiB (4.88 MiB) | 1 (1) |",
        "| `baton run --front http` | after | 9.57 MiB | 0.49 MiB | 1 |",
        // the clients table's --front row
        "| `baton run --front http` + Node `http` server | 8 | 0 / 2,000 | 0 / 2,000 | 0 / 2,000 |",
        // the goal lines
        "| `--front http`, Go app: max req/s ≥ 0.5 × direct (median of the per-round ratios, 2 shared \
         cores) | **no** | × 0.480 (× 0.400–0.600, 3 rounds) |",
        "| `--front http`, Go app: p99 at 12,500 req/s (half the direct max) ≤ direct p99 + 1 ms \
         (medians) | **no** | 2.50 ms vs 1.10 ms |",
        "| `baton run --front` + Node: 0 errors for every keep-alive client | yes | 0/0/0 (8 upgrades) |",
    ] {
        assert!(stdout.contains(line), "missing from the report: {line}");
    }
    // the quarter rate has no goal line
    assert_eq!(
        stdout.matches("≤ direct p99 + 1 ms").count(),
        1,
        "p99 goal lines"
    );
}
