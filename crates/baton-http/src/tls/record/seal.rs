//! Sending: plaintext and alerts to protected records (the mirror of
//! `open.rs`).

use ring::aead;
use rustls::{AlertDescription, ContentType};

use super::secret::AeadKey;
use super::{
    CLOSE_MARGIN, EXPLICIT_NONCE_LEN, HEADER_LEN, MAX_FRAGMENT, RECORD_VERSION, RecordError,
    TAG_LEN, TrafficSecret, Version, tls12_aad, xor_nonce,
};
use crate::Error;

/// Alert level `warning` (close_notify is sent with it, as every stack does).
const LEVEL_WARNING: u8 = 1;
/// Alert level `fatal`.
const LEVEL_FATAL: u8 = 2;

/// Seals what we send, one record at a time, with sequence numbers that
/// never repeat.
#[derive(Debug)]
pub(crate) struct Sealer {
    version: Version,
    secret: TrafficSecret,
    key: AeadKey,
    limit: u64,
    closed: bool,
}

impl Sealer {
    /// A sealer continuing `secret` at its sequence number.
    ///
    /// # Errors
    /// [`Error::Tls`] if ring refuses the key.
    pub(crate) fn new(version: Version, secret: TrafficSecret) -> Result<Sealer, Error> {
        Ok(Sealer {
            version,
            key: secret.aead_key()?,
            limit: secret.cipher().seal_limit(),
            secret,
            closed: false,
        })
    }

    /// The sequence number the next record gets.
    pub(crate) fn seq(&self) -> u64 {
        self.secret.seq
    }

    /// True once the key is close to its usage limit: finish the response
    /// in progress, then close (this layer cannot change keys).
    pub(crate) fn must_close(&self) -> bool {
        self.secret.seq >= self.limit.saturating_sub(CLOSE_MARGIN)
    }

    /// Append `data` to `out` as application-data records (at most 2^14
    /// bytes each; nothing for empty data).
    ///
    /// All or nothing: on an error nothing is appended and no sequence
    /// number is used.
    ///
    /// # Errors
    /// [`RecordError::KeyExhausted`] if the records would reach the key's
    /// usage limit (the last sequence number stays reserved for the closing
    /// alert); [`RecordError::Closed`] after an alert was sealed.
    pub(crate) fn seal_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.closed {
            return Err(RecordError::Closed);
        }
        let records = data.len().div_ceil(MAX_FRAGMENT) as u64;
        // seq + records must stay below limit − 1: the alert's slot.
        let last_allowed = self.limit.saturating_sub(1);
        if self
            .secret
            .seq
            .checked_add(records)
            .is_none_or(|end| end > last_allowed)
        {
            return Err(RecordError::KeyExhausted);
        }
        let start = out.len();
        for chunk in data.chunks(MAX_FRAGMENT) {
            if let Err(e) = self.seal_record(ContentType::ApplicationData, chunk, out) {
                // Never hand out half a message; the sequence numbers
                // already used stay used (a nonce is never reused).
                out.truncate(start);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Append an alert record to `out`: close_notify (level warning) or a
    /// fatal alert. Nothing can be sealed after it.
    ///
    /// # Errors
    /// [`RecordError::KeyExhausted`] if not even one record is left,
    /// [`RecordError::Closed`] after an alert was sealed.
    pub(crate) fn seal_alert(
        &mut self,
        alert: AlertDescription,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if self.closed {
            return Err(RecordError::Closed);
        }
        let level = match alert {
            AlertDescription::CloseNotify | AlertDescription::UserCanceled => LEVEL_WARNING,
            _ => LEVEL_FATAL,
        };
        let result = self.seal_record(ContentType::Alert, &[level, u8::from(alert)], out);
        self.closed = true;
        result
    }

    /// Give the secret back, with the sequence number of the next record
    /// (to hand the session to the next generation).
    pub(crate) fn into_secret(self) -> TrafficSecret {
        self.secret
    }

    /// Seal one record of type `typ` (at most [`MAX_FRAGMENT`] bytes),
    /// appended to `out`. The sequence number is checked first and consumed
    /// whatever happens after.
    pub(super) fn seal_record(
        &mut self,
        typ: ContentType,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if plain.len() > MAX_FRAGMENT {
            return Err(RecordError::Internal);
        }
        let seq = self.secret.seq;
        if seq >= self.limit {
            return Err(RecordError::KeyExhausted);
        }
        // Consume the sequence number before sealing: even a failed seal
        // must not leave a nonce to be used twice.
        self.secret.seq = seq + 1;
        let nonce = xor_nonce(self.secret.iv(), seq);
        let start = out.len();
        let (outer_type, body_len) = match self.version {
            Version::Tls13 => (ContentType::ApplicationData, plain.len() + 1 + TAG_LEN),
            Version::Tls12 => (typ, self.tls12_overhead() + plain.len()),
        };
        let mut header = [0; HEADER_LEN];
        header[0] = u8::from(outer_type);
        header[1..3].copy_from_slice(&RECORD_VERSION);
        // body_len ≤ 2^14 + 1 + 24 < 2^16.
        header[3..].copy_from_slice(&(body_len as u16).to_be_bytes());
        out.extend_from_slice(&header);
        let sealed = match self.version {
            Version::Tls13 => {
                // TLSInnerPlaintext: content ‖ real type, no padding.
                out.extend_from_slice(plain);
                out.push(u8::from(typ));
                let aad = aead::Aad::from(header);
                self.key.0.seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aad,
                    &mut out[start + HEADER_LEN..],
                )
            }
            Version::Tls12 => {
                if self.gcm() {
                    // The explicit part of the GCM nonce goes on the wire.
                    out.extend_from_slice(&nonce[4..]);
                }
                let body = out.len();
                out.extend_from_slice(plain);
                let aad = aead::Aad::from(tls12_aad(seq, u8::from(typ), plain.len()));
                self.key.0.seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aad,
                    &mut out[body..],
                )
            }
        };
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(RecordError::Internal)
            }
        }
    }

    fn gcm(&self) -> bool {
        self.secret.cipher() != super::Cipher::Chacha20Poly1305
    }

    /// TLS 1.2 bytes added to the plaintext: explicit nonce (GCM) and tag.
    fn tls12_overhead(&self) -> usize {
        if self.gcm() {
            EXPLICIT_NONCE_LEN + TAG_LEN
        } else {
            TAG_LEN
        }
    }
}
