//! The state blob a TLS connection moves with: the session's version, and
//! per direction the cipher, key, IV and sequence number, plus plaintext
//! already decrypted and not yet served (a request's first bytes).
//!
//! ```text
//! 'T' 1 | version (0x12 / 0x13)
//!       | rx: cipher (1) key length (1) key  iv (12)  seq (8, big endian)
//!       | tx: the same
//!       | plaintext length (2, big endian) plaintext
//! ```
//!
//! It travels in memory only: inside the handoff message over the
//! generations' private socketpair, never on disk. Our copies are wiped
//! ([`zeroize`]) once used; [`Parsed`] borrows and prints no key.

use zeroize::Zeroize;

use super::record::{Cipher, Opener, Sealer, TrafficSecret, Version};
use crate::Error;

/// The header: a tag and this format's version. Another header makes the
/// successor refuse the batch (the connection stays and closes politely).
pub(crate) const HEADER: [u8; 2] = [b'T', 1];
/// Room left for plaintext in baton's 4 KiB state bound.
pub(crate) const MAX_PLAIN: usize = baton::protocol::MAX_OWNED_STATE - 256;

/// A state blob, parsed (borrowing it).
pub(crate) struct Parsed<'a> {
    version: Version,
    rx: Dir<'a>,
    tx: Dir<'a>,
    pub(crate) plain: &'a [u8],
}

struct Dir<'a> {
    cipher: Cipher,
    key: &'a [u8],
    iv: [u8; 12],
    seq: u64,
}

fn version_byte(v: Version) -> u8 {
    match v {
        Version::Tls12 => 0x12,
        Version::Tls13 => 0x13,
    }
}

fn cipher_byte(c: Cipher) -> u8 {
    match c {
        Cipher::Aes128Gcm => 1,
        Cipher::Aes256Gcm => 2,
        Cipher::Chacha20Poly1305 => 3,
    }
}

/// Encode a session and wipe the secrets (they are consumed).
pub(crate) fn encode(version: Version, opener: Opener, sealer: Sealer, plain: &[u8]) -> Vec<u8> {
    let (rx, tx) = (opener.into_secret(), sealer.into_secret());
    let mut out = Vec::with_capacity(HEADER.len() + 1 + 2 * (2 + 32 + 12 + 8) + 2 + plain.len());
    out.extend_from_slice(&HEADER);
    out.push(version_byte(version));
    for s in [&rx, &tx] {
        out.push(cipher_byte(s.cipher()));
        out.push(s.key().len() as u8);
        out.extend_from_slice(s.key());
        out.extend_from_slice(s.iv());
        out.extend_from_slice(&s.seq().to_be_bytes());
    }
    // Callers keep plain within MAX_PLAIN.
    out.extend_from_slice(&(plain.len() as u16).to_be_bytes());
    out.extend_from_slice(plain);
    out
}

/// Parse a blob without building keys (the successor's check).
///
/// # Errors
/// A message saying what is wrong with it.
pub(crate) fn parse(blob: &[u8]) -> Result<Parsed<'_>, String> {
    let mut r = Reader { b: blob, at: 0 };
    if r.take(2)? != HEADER {
        return Err(format!(
            "TLS session state of another format (header {:?}, this build reads {HEADER:?})",
            blob.get(..2)
        ));
    }
    let version = match r.byte()? {
        0x12 => Version::Tls12,
        0x13 => Version::Tls13,
        v => return Err(format!("TLS session state: unknown version byte {v:#x}")),
    };
    fn dir<'a>(r: &mut Reader<'a>) -> Result<Dir<'a>, String> {
        let cipher = match r.byte()? {
            1 => Cipher::Aes128Gcm,
            2 => Cipher::Aes256Gcm,
            3 => Cipher::Chacha20Poly1305,
            c => return Err(format!("TLS session state: unknown cipher byte {c}")),
        };
        let len = usize::from(r.byte()?);
        if len != cipher.key_len() {
            return Err(format!(
                "TLS session state: a {cipher:?} key of {len} bytes"
            ));
        }
        Ok(Dir {
            cipher,
            key: r.take(len)?,
            iv: r.iv()?,
            seq: r.u64()?,
        })
    }
    let rx = dir(&mut r)?;
    let tx = dir(&mut r)?;
    let plen = usize::from(u16::from_be_bytes([r.byte()?, r.byte()?]));
    let plain = r.take(plen)?;
    if r.at != blob.len() {
        return Err("TLS session state: trailing bytes".into());
    }
    Ok(Parsed {
        version,
        rx,
        tx,
        plain,
    })
}

impl Parsed<'_> {
    /// Build the record layer for this session.
    ///
    /// # Errors
    /// [`Error::Tls`] if ring refuses a key.
    pub(crate) fn session(&self) -> Result<(Opener, Sealer), Error> {
        let rx = TrafficSecret::new(self.rx.cipher, self.rx.key, self.rx.iv, self.rx.seq)?;
        let tx = TrafficSecret::new(self.tx.cipher, self.tx.key, self.tx.iv, self.tx.seq)?;
        Ok((
            Opener::new(self.version, rx)?,
            Sealer::new(self.version, tx)?,
        ))
    }
}

/// Wipe a blob once used.
pub(crate) fn wipe(blob: &mut Vec<u8>) {
    blob.zeroize();
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or_else(|| "TLS session state: truncated".to_string())?;
        self.at += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn iv(&mut self) -> Result<[u8; 12], String> {
        let mut iv = [0; 12];
        iv.copy_from_slice(self.take(12)?);
        Ok(iv)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn secret(cipher: Cipher, fill: u8, seq: u64) -> TrafficSecret {
        TrafficSecret::new(cipher, &vec![fill; cipher.key_len()], [fill; 12], seq).unwrap()
    }

    #[test]
    fn a_session_round_trips_for_every_suite_and_continues_where_it_was() {
        for version in [Version::Tls12, Version::Tls13] {
            for cipher in [
                Cipher::Aes128Gcm,
                Cipher::Aes256Gcm,
                Cipher::Chacha20Poly1305,
            ] {
                let opener = Opener::new(version, secret(cipher, 1, 5)).unwrap();
                let sealer = Sealer::new(version, secret(cipher, 2, 9)).unwrap();
                let blob = encode(version, opener, sealer, b"GET / HT");
                let p = parse(&blob).unwrap();
                assert_eq!(p.plain, b"GET / HT");
                let (o, mut s) = p.session().unwrap();
                assert_eq!((o.version(), o.seq(), s.seq()), (version, 5, 9));
                // The moved sealer's next record opens with the original
                // key at the original sequence number.
                let mut wire = Vec::new();
                s.seal_data(b"hello", &mut wire).unwrap();
                let mut check = Opener::new(version, secret(cipher, 2, 9)).unwrap();
                match check.open(&mut wire).unwrap() {
                    super::super::record::Opened::Record { content, .. } => {
                        assert_eq!(content, super::super::record::Content::Data(b"hello"));
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn another_format_or_a_damaged_blob_is_refused_with_a_reason_and_no_key() {
        let blob = encode(
            Version::Tls13,
            Opener::new(Version::Tls13, secret(Cipher::Aes128Gcm, 0xab, 0)).unwrap(),
            Sealer::new(Version::Tls13, secret(Cipher::Aes128Gcm, 0xcd, 0)).unwrap(),
            b"",
        );
        let mut v2 = blob.clone();
        v2[1] = 2;
        let e = parse(&v2).err().unwrap();
        assert!(e.contains("another format"), "{e}");
        for cut in [0, 3, 10, blob.len() - 1] {
            let e = parse(&blob[..cut]).err().unwrap();
            assert!(!e.contains("171") && !e.contains("ab"), "no key bytes: {e}");
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(parse(&long).err().unwrap().contains("trailing"));
        let mut bad_len = blob.clone();
        bad_len[4] = 32; // an AES-128 key of 32 bytes
        assert!(parse(&bad_len).is_err());
    }
}
