//! Handoff scale: N idle keep-alive connections handed over in one upgrade.
//!
//! `cargo run --release -p baton-tests --bin bench-handoff -- [--server PATH] 1000 10000`
//!
//! For each N: start the demo (release build next to this binary unless
//! `--server`), open N keep-alive connections and make one request on each,
//! upgrade through the control socket, then check that every connection
//! answers its next request from the new generation. Prints, each under
//! the name of what it measures: the drain time the old generation reports
//! itself (`drain_ms`: from its promotion of the new one until its own drain
//! is done, before it exits), the whole upgrade as the caller sees it (the
//! control request until its reply), and the time until the old process has
//! exited (the control request until this program, its parent, reaps it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let server = match args.iter().position(|a| a == "--server") {
        Some(i) => {
            let p = PathBuf::from(args.remove(i + 1));
            args.remove(i);
            p
        }
        None => {
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().join("baton-demo")
        }
    };
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![1000, 10000]
    } else {
        sizes
    };
    let limit = baton_sys::process::raise_nofile_limit().unwrap_or(0);
    println!(
        "handoff scale ({}; RLIMIT_NOFILE {limit}; {} cores)",
        server.display(),
        cores()
    );
    println!();
    println!(
        "| idle connections | handed over | old generation's own drain_ms (promotion → its drain done) | drain_ms per connection | upgrade request → reply | upgrade request → old process exited (reaped) | answered by the new generation |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        run(&server, n);
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn run(server: &PathBuf, n: usize) {
    let dir = std::env::temp_dir().join(format!("baton-bench-handoff-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ctl = dir.join("ctl/control.sock");
    let exe = dir.join("server");
    std::fs::copy(server, &exe).unwrap();
    let mut child = Command::new(&exe)
        .args(["--listen", &addr.to_string(), "--control"])
        .arg(&ctl)
        .args(["--log", "warn", "--no-state"])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let req = b"GET /version HTTP/1.1\r\nHost: bench\r\n\r\n";
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(req).unwrap();
        conns.push(s);
    }
    let mut old_pid = 0;
    for s in &mut conns {
        old_pid = pid_of(&read_response(s));
    }
    // The old generation is our child: a thread reaps it and says when.
    let (exited_tx, exited_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = child.wait();
        let _ = exited_tx.send(Instant::now());
    });
    let t = Instant::now();
    let report = baton_tests::block_on(async {
        let c = baton::control::Client::connect(&ctl).await.unwrap();
        match c
            .call(
                &baton::control::Request::Upgrade(Default::default()),
                |_| {},
            )
            .await
            .unwrap()
        {
            baton::control::Reply::Upgraded(r) => r,
            other => panic!("upgrade failed: {other:?}"),
        }
    });
    let total = t.elapsed();
    let exited = exited_rx
        .recv_timeout(Duration::from_secs(60))
        .map(|at| format!("{:.0} ms", (at - t).as_secs_f64() * 1000.0))
        .unwrap_or_else(|_| {
            let _ = baton_sys::process::kill(old_pid, rustix::process::Signal::KILL);
            "still running after 60 s".to_owned()
        });
    let mut answered = 0;
    for s in &mut conns {
        s.write_all(req).unwrap();
        let p = pid_of(&read_response(s));
        if p == report.new_pid && p != old_pid {
            answered += 1;
        }
    }
    println!(
        "| {n} | {} | {} ms | {:.1} µs | {:.0} ms | {exited} | {answered}/{n} |",
        report.handed_over,
        report.drain_ms,
        report.drain_ms as f64 * 1000.0 / report.handed_over.max(1) as f64,
        total.as_secs_f64() * 1000.0,
    );
    drop(conns);
    let _ = baton_sys::process::kill(report.new_pid, rustix::process::Signal::KILL);
    let _ = std::fs::remove_dir_all(&dir);
}

fn read_response(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let n = s.read(&mut tmp).unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                return buf[i + 4..i + 4 + len].to_vec();
            }
        }
    }
}

fn pid_of(body: &[u8]) -> u32 {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["pid"].as_u64().unwrap() as u32
}
