//! Our own TLS record layer: continues a session rustls established, from
//! the traffic keys it extracted (issue 16).
//!
//! ## The model
//!
//! After the handshake, a TLS session is two one-way streams of records,
//! each protected by an AEAD key, a 12-byte IV and a sequence number that
//! counts the records sent with that key. rustls gives all three away
//! ([`rustls::ExtractedSecrets`], per direction); from then on the session
//! can never go back to rustls, and this module carries it:
//!
//! * [`Sealer`] (`seal.rs`) protects what we send: application data and
//!   alerts, to record bytes.
//! * [`Opener`] (`open.rs`) decodes what the peer sends: bytes in, one
//!   [`Opened`] outcome per call (a record's plaintext, the peer's alert,
//!   something we cannot follow, or "need more bytes").
//!
//! Both are sans-I/O: they never touch a socket, so the connection code
//! decides when to read and write, and the tests feed them bytes from
//! rustls and from RFC 8448.
//!
//! Suites: TLS 1.3 with AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305; TLS 1.2
//! ECDHE with the same three AEADs (AES-GCM: explicit 8-byte nonce after a
//! 4-byte implicit salt; ChaCha20-Poly1305: RFC 7905, IV xor sequence number).
//! This is the **server's** record layer: the [`Opener`] reads what a client
//! sends, and treats handshake messages as a client's.
//!
//! ## Invariants
//!
//! * **A nonce is never reused.** The sequence number is checked before a
//!   record is sealed or opened and incremented after; it never wraps. Every
//!   key has a usage limit ([`Cipher::seal_limit`]); a [`Sealer`] refuses to
//!   seal application data that would reach it (one record stays reserved for
//!   the closing alert), and reports [`Sealer::must_close`] well before.
//! * **No unauthenticated plaintext.** An [`Opener`] returns content only
//!   from a record whose tag verified; the first failure is terminal.
//! * **Nothing after the end.** After an alert (sent or received), an error,
//!   or something it cannot follow, a [`Sealer`] / [`Opener`] refuses to go on
//!   ([`RecordError::Closed`]).
//! * **Keys are not printed, and are wiped.** [`TrafficSecret`] zeroizes its
//!   key and IV on drop and redacts them in `Debug`.
//!
//! ## Gotchas
//!
//! * A TLS 1.3 KeyUpdate or a TLS 1.2 renegotiation cannot be followed: rustls
//!   extracts keys, not the traffic secret the next key derives from. The
//!   [`Opener`] reports [`Content::CannotFollow`]; finish the response in
//!   progress, send close_notify, close.
//! * ring keeps its own expanded copy of each key inside
//!   [`ring::aead::LessSafeKey`] and does not wipe it on drop; only our copy
//!   is zeroized.
//! * [`Opened::Incomplete`] at the end of the stream is a truncation: close
//!   the connection (without reading it as a clean close).
//! * [`Content::Data`] may be empty (TLS allows empty records): it is not
//!   the end of the stream. More than [`MAX_EMPTY_IN_A_ROW`] in a row are
//!   refused, as rustls does.

// Some accessors are used by the tests only.
#![cfg_attr(not(test), allow(dead_code))]

mod open;
mod seal;
mod secret;

#[cfg(test)]
mod tests;

use ring::aead;
use rustls::AlertDescription;

use crate::Error;
#[cfg_attr(not(test), allow(unused_imports))]
pub(crate) use open::{CannotFollow, Content, MAX_EMPTY_IN_A_ROW, Opened, Opener};
pub(crate) use seal::Sealer;
pub(crate) use secret::TrafficSecret;

/// Bytes in a record header: type, legacy version, length.
pub(crate) const HEADER_LEN: usize = 5;
/// Longest plaintext in one record (RFC 8446 5.1, RFC 5246 6.2.1).
pub(crate) const MAX_FRAGMENT: usize = 1 << 14;
/// Longest TLS 1.3 ciphertext (RFC 8446 5.2): longer is record_overflow.
const MAX_CIPHERTEXT_TLS13: usize = MAX_FRAGMENT + 256;
/// Longest TLS 1.2 ciphertext (RFC 5246 6.2.3): longer is record_overflow.
const MAX_CIPHERTEXT_TLS12: usize = MAX_FRAGMENT + 2048;
/// The only record version after a handshake, in either protocol.
const RECORD_VERSION: [u8; 2] = [0x03, 0x03];
/// AEAD tag length of all three ciphers.
const TAG_LEN: usize = 16;
/// TLS 1.2 AES-GCM: explicit nonce bytes carried in each record.
const EXPLICIT_NONCE_LEN: usize = 8;

/// Records one AES-GCM key may protect: ⌊2^24.5⌋, RFC 8446 5.5 (a margin
/// of about 2^-57 against breaking confidentiality). The same analysis
/// holds for TLS 1.2's GCM records.
pub(crate) const AES_GCM_RECORD_LIMIT: u64 = 23_726_566;
/// Records before the limit at which [`Sealer::must_close`] turns true: about
/// 1 GiB of full records, room to finish the response in progress.
pub(crate) const CLOSE_MARGIN: u64 = 1 << 16;

/// The protocol version of the session (the record formats differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// TLS 1.2 (RFC 5246, with RFC 5288 AES-GCM and RFC 7905 ChaCha20).
    Tls12,
    /// TLS 1.3 (RFC 8446).
    Tls13,
}

impl Version {
    /// Our version for rustls's, if we can carry it.
    ///
    /// # Errors
    /// [`Error::Tls`] for anything but TLS 1.2 and 1.3.
    pub(crate) fn from_rustls(v: rustls::ProtocolVersion) -> Result<Version, Error> {
        match v {
            rustls::ProtocolVersion::TLSv1_2 => Ok(Version::Tls12),
            rustls::ProtocolVersion::TLSv1_3 => Ok(Version::Tls13),
            v => Err(Error::Tls(format!(
                "the record layer carries TLS 1.2 and 1.3 sessions, not {v:?}"
            ))),
        }
    }

    fn max_ciphertext(self) -> usize {
        match self {
            Version::Tls12 => MAX_CIPHERTEXT_TLS12,
            Version::Tls13 => MAX_CIPHERTEXT_TLS13,
        }
    }
}

/// The AEAD of a traffic key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cipher {
    /// AES-128-GCM.
    Aes128Gcm,
    /// AES-256-GCM.
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    Chacha20Poly1305,
}

impl Cipher {
    /// ring's algorithm.
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Cipher::Aes128Gcm => &aead::AES_128_GCM,
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    /// Key length in bytes.
    pub(crate) fn key_len(self) -> usize {
        self.algorithm().key_len()
    }

    /// How many records one key of this cipher may seal: a record is sealed
    /// only with a sequence number below it. AES-GCM: the confidentiality
    /// limit; ChaCha20-Poly1305 has none that matters in practice, so the
    /// sequence number's range is the limit (it must never wrap).
    pub(crate) fn seal_limit(self) -> u64 {
        match self {
            Cipher::Aes128Gcm | Cipher::Aes256Gcm => AES_GCM_RECORD_LIMIT,
            Cipher::Chacha20Poly1305 => u64::MAX,
        }
    }
}

/// Why a record could not be sealed or opened. The peer's faults map to the
/// fatal alert to send ([`RecordError::alert`]) before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RecordError {
    /// A record failed authentication: tampered with, or protected with
    /// another key or sequence number.
    #[error("a TLS record failed authentication (tampered, or another key or sequence number)")]
    BadRecordMac,
    /// A record (or its plaintext) longer than the protocol allows.
    #[error("a TLS record longer than the protocol allows")]
    RecordOverflow,
    /// A malformed record: bad version or length, a malformed alert.
    #[error("a malformed TLS record")]
    DecodeError,
    /// A record type or content not allowed after the handshake.
    #[error("a TLS record of a type not allowed after the handshake")]
    UnexpectedMessage,
    /// The key reached its usage limit (or its sequence numbers ran out):
    /// close the connection (the closing alert can still be sealed).
    #[error("the TLS traffic key reached its usage limit; close the connection")]
    KeyExhausted,
    /// ring refused to seal (cannot happen with our record sizes).
    #[error("the AEAD refused to seal a TLS record")]
    Internal,
    /// Used after its end: an alert, an error, or something it cannot follow.
    #[error("the TLS record layer is closed")]
    Closed,
}

impl RecordError {
    /// The fatal alert to send the peer, if any, before closing.
    pub(crate) fn alert(self) -> Option<AlertDescription> {
        match self {
            RecordError::BadRecordMac => Some(AlertDescription::BadRecordMac),
            RecordError::RecordOverflow => Some(AlertDescription::RecordOverflow),
            RecordError::DecodeError => Some(AlertDescription::DecodeError),
            RecordError::UnexpectedMessage => Some(AlertDescription::UnexpectedMessage),
            RecordError::Internal => Some(AlertDescription::InternalError),
            RecordError::KeyExhausted | RecordError::Closed => None,
        }
    }
}

/// Continue a server's session from what
/// [`rustls::ServerConnection::dangerous_extract_secrets`] returned:
/// `(opener, sealer)`.
///
/// `version` is `protocol_version()` of the connection, read before the
/// extraction (which consumes it, even when it fails).
///
/// What must hold before extracting, or bytes are lost (rustls checks only
/// the first; `tests/against_rustls.rs` pins all three):
/// * nothing left to send (`!wants_write()`; TLS 1.3 session tickets
///   included): otherwise the extraction fails and the connection is gone;
/// * no plaintext received and not read (`plaintext_bytes_to_read() == 0`
///   after `process_new_packets`): rustls counts its records in the
///   sequence number and drops the plaintext;
/// * no partial record inside rustls: give it whole records only
///   ([`whole_records`]) and keep the rest for the [`Opener`].
///
/// # Errors
/// [`Error::Tls`] for a version or cipher this layer does not carry.
pub(crate) fn continue_session(
    version: rustls::ProtocolVersion,
    secrets: rustls::ExtractedSecrets,
) -> Result<(Opener, Sealer), Error> {
    let version = Version::from_rustls(version)?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let opener = Opener::new(version, TrafficSecret::from_rustls(rx, rx_seq)?)?;
    let sealer = Sealer::new(version, TrafficSecret::from_rustls(tx, tx_seq)?)?;
    Ok((opener, sealer))
}

/// How many bytes at the start of `buf` are whole records, by their headers
/// alone (nothing is authenticated): what may be given to rustls before its
/// secrets are extracted, so that no partial record is left inside it.
pub(crate) fn whole_records(buf: &[u8]) -> usize {
    let mut at = 0;
    while let Some(&[_, _, _, hi, lo]) = buf.get(at..at + HEADER_LEN) {
        let len = HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo]));
        if buf.len() - at < len {
            break;
        }
        at += len;
    }
    at
}

/// The TLS 1.3 / ChaCha20 nonce: the IV with the sequence number xored into
/// its last 8 bytes (RFC 8446 5.3, RFC 7905 2). rustls builds TLS 1.2
/// AES-GCM nonces the same way, so its extracted IV continues there too.
fn xor_nonce(iv: &[u8; 12], seq: u64) -> [u8; 12] {
    let mut nonce = *iv;
    for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    nonce
}

/// TLS 1.2 additional data: seq ‖ type ‖ version ‖ plaintext length.
fn tls12_aad(seq: u64, typ: u8, plain_len: usize) -> [u8; 13] {
    let mut aad = [0; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&RECORD_VERSION);
    // Callers keep plaintexts within MAX_FRAGMENT (< 2^16).
    aad[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
    aad
}
