//! The non-HTTP example (`crates/baton/examples/line_counter.rs`): a
//! line-based TCP protocol whose connections move across upgrades through
//! the owned-connection API, with their count and any half line read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_tests::{TestDir, copy_exe, free_port, proc, spawn, wait_for};

const CLIENTS: usize = 8;
const UPGRADES: usize = 5;

#[derive(Debug, Default)]
struct Client {
    answers: u64,
    errors: Vec<String>,
    pids: Vec<u32>,
}

/// One line out, one answer back: `<n> <pid> <generation> <line>`. The
/// line goes out in two writes, so a half line is often what the server
/// has read when it hands the connection over.
fn exchange(
    w: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    line: &str,
    expect_n: u64,
    c: &Mutex<Client>,
) -> bool {
    let (a, b) = line.split_at(line.len() / 2);
    let sent = w
        .write_all(a.as_bytes())
        .and_then(|()| w.flush())
        .and_then(|()| w.write_all(format!("{b}\n").as_bytes()));
    let mut answer = String::new();
    let got = sent.and_then(|()| r.read_line(&mut answer));
    let mut c = c.lock().unwrap();
    match got {
        Ok(0) => c.errors.push("EOF".into()),
        Err(e) => c.errors.push(e.to_string()),
        Ok(_) => {
            let parts: Vec<&str> = answer.trim_end().splitn(4, ' ').collect();
            let n: u64 = parts[0].parse().unwrap_or(0);
            let pid: u32 = parts.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
            if n != expect_n || parts.get(3) != Some(&line) {
                c.errors
                    .push(format!("sent #{expect_n} {line:?}, got {answer:?}"));
            }
            c.answers += 1;
            if c.pids.last() != Some(&pid) {
                c.pids.push(pid);
            }
            return true;
        }
    }
    false
}

/// Every generation of the example in `dir` is killed when the test ends,
/// passed or failed (a failed upgrade leaves two).
struct KillAll<'a>(&'a TestDir);

impl Drop for KillAll<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.0.join("server.log")).unwrap_or_default();
            eprintln!("----- example log -----\n{log}");
        }
        for pid in proc::processes_with_exe_prefix(&self.0.path) {
            proc::signal(pid, rustix::process::Signal::KILL);
        }
        let _ = baton_tests::wait_for_opt(Duration::from_secs(5), || {
            proc::processes_with_exe_prefix(&self.0.path)
                .is_empty()
                .then_some(())
        });
    }
}

#[test]
fn line_protocol_connections_keep_their_count_across_upgrades() {
    let dir = TestDir::new("line-example");
    let exe = dir.join("line_counter");
    copy_exe(
        &baton_tests::apps::built_example("baton", "line_counter"),
        &exe,
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let pid_file = dir.join("lines.pid");
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let _cleanup = KillAll(&dir);
    // Reaped by the test process's reaper, like every generation after it.
    drop(
        spawn(
            Command::new(&exe)
                .arg(&addr)
                .arg(&pid_file)
                .arg("30")
                .stdin(Stdio::null())
                .stderr(log),
        )
        .unwrap(),
    );
    let pid_now =
        || -> Option<u32> { std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok() };
    let mut pids = vec![wait_for(
        Duration::from_secs(20),
        "the example to serve",
        pid_now,
    )];

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<Arc<Mutex<Client>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let threads: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (c, stop, addr) = (Arc::clone(c), Arc::clone(&stop), addr.clone());
            std::thread::spawn(move || {
                let mut w = TcpStream::connect(&addr).unwrap();
                w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let port = w.local_addr().unwrap().port();
                let mut r = BufReader::new(w.try_clone().unwrap());
                let mut k = 0u64;
                // Bounded: 20 000 lines at most, stopped long before.
                while !stop.load(Ordering::Relaxed) && k < 20_000 {
                    k += 1;
                    if !exchange(&mut w, &mut r, &format!("client {i} line {k}"), k, &c) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20)); // pacing, not a wait
                }
                assert_eq!(w.local_addr().unwrap().port(), port);
            })
        })
        .collect();
    let answered_by = |pid: u32| {
        clients
            .iter()
            .all(|c| c.lock().unwrap().pids.last() == Some(&pid))
    };
    wait_for(Duration::from_secs(10), "every client answered", || {
        answered_by(pids[0]).then_some(())
    });
    for i in 1..=UPGRADES {
        let old = *pids.last().unwrap();
        proc::signal(old, rustix::process::Signal::USR2);
        let new = wait_for(Duration::from_secs(30), "the next generation", || {
            pid_now().filter(|p| *p != old)
        });
        wait_for(
            Duration::from_secs(30),
            "the old generation to exit",
            || (!proc::alive(old)).then_some(()),
        );
        wait_for(
            Duration::from_secs(10),
            "every client answered by the new pid",
            || answered_by(new).then_some(()),
        );
        eprintln!("upgrade {i}: pid {old} -> {new}");
        pids.push(new);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let mut total = 0;
    for (i, c) in clients.iter().enumerate() {
        let c = c.lock().unwrap();
        assert!(c.errors.is_empty(), "client {i}: {:?}", c.errors);
        assert_eq!(
            c.pids, pids,
            "client {i}: answered by each generation in turn"
        );
        total += c.answers;
    }
    eprintln!("{CLIENTS} clients, {UPGRADES} upgrades: {total} lines answered, 0 errors");
}
