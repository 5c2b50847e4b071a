//! The record layer's tests: RFC 8448 known answers (`rfc8448.rs`),
//! differential tests against rustls for every suite (`against_rustls.rs`),
//! and the decoder's validation, limits and properties (`decoder.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod against_rustls;
mod decoder;
mod rfc8448;

use super::{Cipher, Content, Opened, Opener, RecordError, Sealer, TrafficSecret, Version};

/// Every (version, cipher) the layer carries.
const ALL: [(Version, Cipher); 6] = [
    (Version::Tls13, Cipher::Aes128Gcm),
    (Version::Tls13, Cipher::Aes256Gcm),
    (Version::Tls13, Cipher::Chacha20Poly1305),
    (Version::Tls12, Cipher::Aes128Gcm),
    (Version::Tls12, Cipher::Aes256Gcm),
    (Version::Tls12, Cipher::Chacha20Poly1305),
];

/// Bytes from hex with any whitespace in between (as the RFC prints them).
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(digits.len() % 2 == 0, "odd hex: {s}");
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// A secret of fixed test bytes (`fill` tells keys apart).
fn secret(cipher: Cipher, fill: u8, seq: u64) -> TrafficSecret {
    TrafficSecret::new(
        cipher,
        &vec![fill; cipher.key_len()],
        [fill ^ 0x5a; 12],
        seq,
    )
    .unwrap()
}

fn sealer(version: Version, cipher: Cipher, seq: u64) -> Sealer {
    Sealer::new(version, secret(cipher, 7, seq)).unwrap()
}

fn opener(version: Version, cipher: Cipher, seq: u64) -> Opener {
    Opener::new(version, secret(cipher, 7, seq)).unwrap()
}

/// Open every record in `wire`, fed `step` bytes at a time as a socket
/// would deliver them; the application data, concatenated, and the last
/// non-data outcome (or error) if any.
fn open_all(
    opener: &mut Opener,
    wire: &[u8],
    step: usize,
) -> (Vec<u8>, Option<Result<String, RecordError>>) {
    let mut buf = Vec::new();
    let mut fed = 0;
    let mut data = Vec::new();
    loop {
        match opener.open(&mut buf) {
            Ok(Opened::Incomplete { needed }) => {
                assert!(needed > 0);
                if fed == wire.len() {
                    assert!(buf.is_empty(), "{} bytes left over", buf.len());
                    return (data, None);
                }
                let end = (fed + step).min(wire.len());
                buf.extend_from_slice(&wire[fed..end]);
                fed = end;
            }
            Ok(Opened::Record { len, content }) => {
                let end = match content {
                    Content::Data(p) => {
                        data.extend_from_slice(p);
                        None
                    }
                    other => Some(format!("{other:?}")),
                };
                buf.drain(..len);
                if let Some(end) = end {
                    return (data, Some(Ok(end)));
                }
            }
            Err(e) => return (data, Some(Err(e))),
        }
    }
}
