//! Benchmark: moving state between processes' worth of sockets — a sealed
//! memfd passed as one fd versus the same bytes pushed through the handoff
//! socket in maximal frames (what an inline-only design would do).
//!
//! `cargo run --release -p baton --example state_transfer [MB ...]`

use std::os::fd::AsFd;
use std::time::Instant;

use baton::protocol::MAX_FRAME;
use baton_sys as sys;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1, 10, 100]
    } else {
        sizes
    };
    println!(
        "| state | memfd (write+seal, send fd, read) | inline frames ({} KiB each) | ratio |",
        MAX_FRAME / 1024
    );
    println!("|---:|---:|---:|---:|");
    for mb in sizes {
        let data = vec![0x5au8; mb << 20];
        let memfd = best_of(3, || memfd_path(&data))?;
        let inline = best_of(3, || inline_path(&data))?;
        println!(
            "| {mb} MB | {:.1} ms | {:.1} ms | {:.1}× |",
            memfd * 1e3,
            inline * 1e3,
            inline / memfd
        );
    }
    Ok(())
}

fn best_of(n: usize, mut f: impl FnMut() -> std::io::Result<f64>) -> std::io::Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..n {
        best = best.min(f()?);
    }
    Ok(best)
}

/// The old side writes a sealed memfd and sends its fd; the new side checks
/// the seals and reads it.
fn memfd_path(data: &[u8]) -> std::io::Result<f64> {
    let (a, b) = sys::fd::seqpacket_pair()?;
    let t = Instant::now();
    let fd = sys::fd::sealed_memfd("bench", data)?;
    sys::fd::send_with_fds(a.as_fd(), b"state", &[fd.as_fd()])?;
    drop(fd);
    let mut buf = [0u8; 64];
    let mut got = sys::fd::recv_with_fds(b.as_fd(), &mut buf)?;
    let fd = got
        .fds
        .pop()
        .ok_or_else(|| std::io::Error::other("no fd"))?;
    let back = sys::fd::read_sealed_memfd(fd, data.len() as u64, u64::MAX)?;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(back.len(), data.len());
    Ok(secs)
}

/// The same bytes in MAX_FRAME datagrams through the socketpair (a reader
/// thread reassembles them).
fn inline_path(data: &[u8]) -> std::io::Result<f64> {
    let (a, b) = sys::fd::seqpacket_pair()?;
    let total = data.len();
    let t = Instant::now();
    let reader = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(total);
        let mut buf = vec![0u8; MAX_FRAME];
        while out.len() < total {
            let got = sys::fd::recv_with_fds(b.as_fd(), &mut buf)?;
            out.extend_from_slice(&buf[..got.len]);
        }
        Ok(out)
    });
    for chunk in data.chunks(MAX_FRAME - 64) {
        sys::fd::send_with_fds(a.as_fd(), chunk, &[])?;
    }
    let back = reader
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(back.len(), data.len());
    Ok(secs)
}
