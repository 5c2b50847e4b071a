//! A stable-Rust fuzz loop for the handoff decoder: random bytes, valid
//! frames with random mutations, truncations and splices, for N seconds.
//! Any panic is a bug (the process aborts with the input printed).
//!
//! `cargo run --release -p baton --example fuzz_decode -- 60`

use std::time::{Duration, Instant};

use baton::protocol::{
    self, BlobData, BlobMeta, ConnMeta, Hello, ListenerKind, ListenerMeta, Msg, ReadyInfo,
};

/// xorshift64*: deterministic from the seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let msgs = [
        Msg::Hello(Hello {
            protocol: protocol::PROTOCOL_VERSION,
            app_version: "1.0".into(),
            generation: 3,
            pid: 77,
        }),
        Msg::Listeners(vec![ListenerMeta {
            name: "http".into(),
            kind: ListenerKind::Tcp,
        }]),
        Msg::State(vec![
            BlobMeta {
                name: "app".into(),
                data: BlobData::Inline(vec![1; 100]),
            },
            BlobMeta {
                name: "big".into(),
                data: BlobData::Memfd { len: 1 << 20 },
            },
        ]),
        Msg::Ready(ReadyInfo {
            accepts_conns: true,
        }),
        Msg::Conns {
            batch: 1,
            conns: vec![ConnMeta {
                listener: "http".into(),
                prefix: b"GET / HTTP/1.1\r\n".to_vec(),
            }],
        },
        Msg::Demote { reason: "x".into() },
        Msg::Stats {
            requests: 5,
            errors: 1,
        },
    ];
    msgs.iter()
        .filter_map(|m| protocol::encode(m).ok())
        .collect()
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id())
        });
    let mut rng = Rng(seed | 1);
    let corpus = corpus();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut n, mut accepted) = (0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..10_000 {
            let input: Vec<u8> = match rng.below(4) {
                0 => (0..rng.below(600)).map(|_| rng.next() as u8).collect(),
                1 => {
                    let mut f = corpus[rng.below(corpus.len())].clone();
                    for _ in 0..=rng.below(8) {
                        let i = rng.below(f.len());
                        f[i] = rng.next() as u8;
                    }
                    f
                }
                2 => {
                    let f = &corpus[rng.below(corpus.len())];
                    f[..rng.below(f.len() + 1)].to_vec()
                }
                _ => {
                    let a = &corpus[rng.below(corpus.len())];
                    let b = &corpus[rng.below(corpus.len())];
                    let mut f = a[..rng.below(a.len() + 1)].to_vec();
                    f.extend_from_slice(&b[rng.below(b.len() + 1).min(b.len())..]);
                    f
                }
            };
            let nfds = rng.below(4);
            if protocol::decode(&input, nfds).is_ok() {
                accepted += 1;
            }
            let _ = protocol::decode_ignoring_fds(&input);
            n += 1;
        }
    }
    println!(
        "fuzz_decode: {n} inputs in {secs} s (seed {seed}), {accepted} decoded and validated, 0 panics"
    );
}
