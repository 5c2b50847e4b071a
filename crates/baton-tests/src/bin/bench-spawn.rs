//! The cost of starting a child, as a function of the parent's resident
//! memory: `fork` + a `pre_exec` hook (how baton started the next generation
//! before) against `posix_spawn` (how it does now, through `OsSpawner`).
//!
//! `cargo run --release -p baton-tests --bin bench-spawn -- [--iterations N] MIB...`
//!
//! For each MIB: allocate and touch that much memory, then start `/bin/true`
//! N times each way, with one fd placed at 3 as an upgrade does, and print
//! one JSON line: the median, min and max time the parent spent in the
//! spawn call (µs), per method.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use baton::{OsSpawner, SpawnSpec, Spawner};

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    format!(
        "{{\"median_us\":{:.1},\"min_us\":{:.1},\"max_us\":{:.1}}}",
        us(v[v.len() / 2]),
        us(v[0]),
        us(v[v.len() - 1])
    )
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let iterations = match args.iter().position(|a| a == "--iterations") {
        Some(i) => {
            let n = args.remove(i + 1).parse().expect("--iterations N");
            args.remove(i);
            n
        }
        None => 50,
    };
    let sizes: Vec<usize> = args.iter().map(|a| a.parse().expect("MIB")).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_keep, placed) = std::os::unix::net::UnixStream::pair().unwrap();
    for mib in sizes {
        let mut ballast = vec![0u8; mib << 20];
        for page in ballast.chunks_mut(4096) {
            page[0] = 1;
        }
        let (mut fork, mut spawn) = (Vec::new(), Vec::new());
        rt.block_on(async {
            for _ in 0..iterations {
                // fork + pre_exec, as before.
                let mut cmd = tokio::process::Command::new("/bin/true");
                let src = baton_sys::fd::dup_at_least(placed.as_fd(), 10).unwrap();
                baton_sys::process::place_fds_before_exec(
                    &mut cmd,
                    vec![baton_sys::process::FdPlacement { src, target: 3 }],
                );
                let t = Instant::now();
                let mut child = cmd.spawn().unwrap();
                fork.push(t.elapsed());
                child.wait().await.unwrap();

                // posix_spawn, as now.
                let mut spec = SpawnSpec::new("/bin/true");
                spec.fds = vec![(placed.as_fd().try_clone_to_owned().unwrap(), 3)];
                let t = Instant::now();
                let mut child = OsSpawner.spawn(spec).unwrap();
                spawn.push(t.elapsed());
                child.wait().await.unwrap();
            }
        });
        println!(
            "{{\"resident_mib\":{mib},\"iterations\":{iterations},\"fork\":{},\"posix_spawn\":{}}}",
            stats(fork),
            stats(spawn)
        );
        std::hint::black_box(&ballast);
    }
}
