//! A line-based TCP protocol that survives upgrades: each line a client
//! sends is answered with `<n> <pid> <generation> <line>`, where `n` counts
//! that connection's lines from 1 — and goes on across upgrades, because
//! the connection moves to the new generation with its count (the state
//! blob) and any half line already read (the unread bytes).
//!
//! ```text
//! cargo run -p baton --example line_counter -- 127.0.0.1:7000 /tmp/lines.pid
//! nc 127.0.0.1 7000            # type lines
//! kill -USR2 $(cat /tmp/lines.pid)   # upgrade: the nc session goes on
//! ```
//!
//! The same API serves any protocol an application owns: keep an
//! [`OwnedGuard`] for each connection (its callback is how baton closes the
//! connection politely if it cannot move), stop at a message boundary when
//! [`Baton::takes_owned`] says the successor takes the kind, and
//! [`Baton::hand_over_owned`] the socket, the unread bytes and the state.
//! The successor gets them from [`Baton::receive_owned`].
//!
//! Arguments: `ADDR [PIDFILE [DRAIN_TIMEOUT_SECS]]`.

use std::time::Duration;

use baton::{Baton, Config, OwnedConn, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The kind these connections travel under.
const KIND: &str = "example.line-counter";
/// Format version of the state blob (a byte, then the count).
const STATE_V1: u8 = 1;
/// Longest line (a longer one ends the connection).
const MAX_LINE: usize = 4096;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7000".into());
    let mut config = Config::default();
    config.pid_file = args.next().map(Into::into);
    if let Some(secs) = args.next().and_then(|s| s.parse().ok()) {
        config.drain_timeout = Duration::from_secs(secs);
    }
    let baton = Baton::start(config).await?;
    let listener = baton.listen("line", &addr.parse()?)?;

    // Connections the previous generation hands over: their count moves
    // with them; a blob of another format refuses the batch (they stay).
    let mut moved = baton.receive_owned_checked(KIND, |c| match c.state.first() {
        Some(&STATE_V1) if c.state.len() == 9 => Ok(()),
        _ => Err("line-counter state of another format".into()),
    })?;
    let b = baton.clone();
    tokio::spawn(async move {
        while let Some(c) = moved.recv().await {
            let mut n = [0u8; 8];
            n.copy_from_slice(&c.state[1..9]);
            let count = u64::from_le_bytes(n);
            b.tracker()
                .spawn(serve(b.clone(), c.stream, c.unread, count, c.listener));
        }
    });

    let b = baton.clone();
    tokio::spawn(async move {
        while let Some(Ok((stream, _peer))) = listener.accept().await {
            b.tracker()
                .spawn(serve(b.clone(), stream, Vec::new(), 0, "line".into()));
        }
    });
    baton.ready().await?;
    baton.done().await;
    Ok(())
}

/// One connection, wherever it was accepted.
async fn serve(
    baton: Baton,
    mut stream: Stream,
    mut buf: Vec<u8>,
    mut count: u64,
    listener: String,
) {
    // At the drain deadline (the successor did not take it): say goodbye.
    let close_now = CancellationToken::new();
    let cancel = close_now.clone();
    let guard = baton.owned_guard(move || cancel.cancel());
    let mut phase = baton.drain_signal();
    let (pid, generation) = (std::process::id(), baton.generation());
    let mut may_move = true;
    loop {
        // Answer every whole line already read.
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]);
            count += 1;
            let answer = format!(
                "{count} {pid} {generation} {}\n",
                text.trim_end_matches('\r')
            );
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
        if buf.len() > MAX_LINE {
            let _ = stream.write_all(b"line too long; goodbye\n").await;
            return;
        }
        // A message boundary: every answer written, at most a partial line
        // read. Move if the successor takes this kind.
        if may_move && baton.takes_owned(KIND) {
            let mut state = vec![STATE_V1];
            state.extend_from_slice(&count.to_le_bytes());
            let conn = OwnedConn {
                kind: KIND.into(),
                stream,
                unread: std::mem::take(&mut buf),
                state,
                listener: listener.clone(),
            };
            match baton.hand_over_owned(conn).await {
                Ok(()) => {
                    drop(guard);
                    return;
                }
                Err(back) => {
                    // Not taken: serve it here until the deadline.
                    may_move = false;
                    stream = back.stream;
                    buf = back.unread;
                }
            }
        }
        let mut chunk = [0u8; 1024];
        tokio::select! {
            n = stream.read(&mut chunk) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            () = phase.changed() => {}
            () = close_now.cancelled() => {
                let _ = stream.write_all(b"server restarting; goodbye\n").await;
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}
