//! Receiving: bytes from the client to plaintext and outcomes (the mirror
//! of `seal.rs`).
//!
//! One call, one record: [`Opener::open`] looks at the start of a buffer
//! that may hold part of a record, one record, or several. It checks the
//! header before the body has arrived (so an oversized length is refused
//! without buffering it), then authenticates and decrypts in place.

use ring::aead;
use rustls::{AlertDescription, ContentType, HandshakeType};

use super::secret::AeadKey;
use super::{
    EXPLICIT_NONCE_LEN, HEADER_LEN, MAX_FRAGMENT, RECORD_VERSION, RecordError, TAG_LEN,
    TrafficSecret, Version, tls12_aad, xor_nonce,
};
use crate::Error;

/// What [`Opener::open`] found at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened<'a> {
    /// Not a whole record yet: read at least `needed` more bytes. Nothing
    /// was consumed. At the end of the stream this is a truncation.
    Incomplete {
        /// Bytes missing from the record (or from its header).
        needed: usize,
    },
    /// One record, authenticated.
    Record {
        /// Bytes of the buffer it took: drop them before the next call.
        len: usize,
        /// What it carried.
        content: Content<'a>,
    },
}

/// The content of one authenticated record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Content<'a> {
    /// Application data, decrypted in place in the caller's buffer (may be
    /// empty: TLS allows empty records).
    Data(&'a [u8]),
    /// The client's close_notify: it sends nothing more. Answer with ours
    /// and close. Terminal.
    CloseNotify,
    /// Any other alert (fatal, or a warning such as user_canceled): close
    /// without answering. Terminal.
    Alert(AlertDescription),
    /// Something this layer cannot follow: finish the response in
    /// progress, send close_notify, close. Terminal.
    CannotFollow(CannotFollow),
}

/// What the client did that the record layer cannot follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CannotFollow {
    /// TLS 1.3 KeyUpdate: the next key derives from a traffic secret we do
    /// not have.
    KeyUpdate,
    /// TLS 1.2 renegotiation (a ClientHello): a new handshake.
    Renegotiation,
}

/// Opens what the client sends, one record at a time.
#[derive(Debug)]
pub(crate) struct Opener {
    version: Version,
    secret: TrafficSecret,
    key: AeadKey,
    closed: bool,
    /// Empty application-data records in a row (see [`MAX_EMPTY_IN_A_ROW`]).
    empty_in_a_row: u8,
}

/// Empty application-data records accepted in a row, as rustls does: they
/// are legal, but an endless run of them makes no progress for the reader.
pub(crate) const MAX_EMPTY_IN_A_ROW: u8 = 32;

impl Opener {
    /// An opener continuing `secret` at its sequence number.
    ///
    /// # Errors
    /// [`Error::Tls`] if ring refuses the key.
    pub(crate) fn new(version: Version, secret: TrafficSecret) -> Result<Opener, Error> {
        Ok(Opener {
            version,
            key: secret.aead_key()?,
            secret,
            closed: false,
            empty_in_a_row: 0,
        })
    }

    /// The protocol version of the session.
    pub(crate) fn version(&self) -> Version {
        self.version
    }

    /// The sequence number the next record must have.
    pub(crate) fn seq(&self) -> u64 {
        self.secret.seq
    }

    /// Give the secret back, with the sequence number of the next record
    /// (to hand the session to the next generation).
    pub(crate) fn into_secret(self) -> TrafficSecret {
        self.secret
    }

    /// Decode the record at the start of `buf`, decrypting it in place.
    ///
    /// # Errors
    /// A [`RecordError`] whose [`alert`](RecordError::alert) is the fatal
    /// alert to send before closing: bad_record_mac (authentication
    /// failed), record_overflow, decode_error (bad version or length, a
    /// malformed alert), unexpected_message (a record type or handshake
    /// message not allowed now). [`RecordError::Closed`] once a terminal
    /// outcome or an error was returned. Every error is terminal.
    pub(crate) fn open<'a>(&mut self, buf: &'a mut [u8]) -> Result<Opened<'a>, RecordError> {
        if self.closed {
            return Err(RecordError::Closed);
        }
        let result = self.open_inner(buf);
        // Everything but data and "need more" ends the stream.
        if !matches!(
            result,
            Ok(Opened::Incomplete { .. })
                | Ok(Opened::Record {
                    content: Content::Data(_),
                    ..
                })
        ) {
            self.closed = true;
        }
        result
    }

    fn open_inner<'a>(&mut self, buf: &'a mut [u8]) -> Result<Opened<'a>, RecordError> {
        let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(Opened::Incomplete {
                needed: HEADER_LEN - buf.len(),
            });
        };
        let header = *header;
        let typ = header[0];
        self.check_outer_type(typ)?;
        // RFC 8446 says to ignore this field, but after a handshake every
        // TLS 1.2 and 1.3 stack writes 03 03; anything else is garbage.
        if header[1..3] != RECORD_VERSION {
            return Err(RecordError::DecodeError);
        }
        let body_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if body_len > self.version.max_ciphertext() {
            return Err(RecordError::RecordOverflow);
        }
        if body_len < self.min_body() {
            return Err(RecordError::DecodeError);
        }
        let len = HEADER_LEN + body_len;
        if buf.len() < len {
            return Ok(Opened::Incomplete {
                needed: len - buf.len(),
            });
        }
        let seq = self.secret.seq;
        // The peer's sequence numbers must not wrap either; it would have
        // to send 2^64 − 1 records first.
        if seq == u64::MAX {
            return Err(RecordError::KeyExhausted);
        }
        let body = &mut buf[HEADER_LEN..len];
        let (typ, content) = match self.version {
            Version::Tls13 => {
                let nonce = xor_nonce(self.secret.iv(), seq);
                let inner = self
                    .key
                    .0
                    .open_in_place(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(header),
                        body,
                    )
                    .map_err(|_| RecordError::BadRecordMac)?;
                self.secret.seq = seq + 1;
                // TLSInnerPlaintext = content ‖ type ‖ zero padding.
                if inner.len() > MAX_FRAGMENT + 1 {
                    return Err(RecordError::RecordOverflow);
                }
                let Some(end) = inner.iter().rposition(|b| *b != 0) else {
                    // RFC 8446 5.4: all padding, no type.
                    return Err(RecordError::UnexpectedMessage);
                };
                (inner[end], &inner[..end])
            }
            Version::Tls12 => {
                let (nonce, ciphertext) = if self.gcm() {
                    let mut nonce = *self.secret.iv();
                    let (explicit, rest) = body.split_at_mut(EXPLICIT_NONCE_LEN);
                    nonce[4..].copy_from_slice(explicit);
                    (nonce, rest)
                } else {
                    (xor_nonce(self.secret.iv(), seq), body)
                };
                let aad = tls12_aad(seq, typ, ciphertext.len() - TAG_LEN);
                let plain = self
                    .key
                    .0
                    .open_in_place(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(aad),
                        ciphertext,
                    )
                    .map_err(|_| RecordError::BadRecordMac)?;
                self.secret.seq = seq + 1;
                if plain.len() > MAX_FRAGMENT {
                    return Err(RecordError::RecordOverflow);
                }
                (typ, &*plain)
            }
        };
        let content = self.content(ContentType::from(typ), content)?;
        Ok(Opened::Record { len, content })
    }

    /// The record types allowed on the wire after the handshake.
    fn check_outer_type(&self, typ: u8) -> Result<(), RecordError> {
        let allowed = match self.version {
            // Everything is application_data outside; the real type is in
            // the protected inner plaintext.
            Version::Tls13 => typ == u8::from(ContentType::ApplicationData),
            // change_cipher_spec is refused after decryption (it cannot
            // come without a handshake first), but it is a record type.
            Version::Tls12 => (20..=23).contains(&typ),
        };
        if allowed {
            Ok(())
        } else {
            Err(RecordError::UnexpectedMessage)
        }
    }

    /// Shortest body that can hold an authenticated record.
    fn min_body(&self) -> usize {
        match self.version {
            // At least the inner content type.
            Version::Tls13 => 1 + TAG_LEN,
            Version::Tls12 if self.gcm() => EXPLICIT_NONCE_LEN + TAG_LEN,
            Version::Tls12 => TAG_LEN,
        }
    }

    fn gcm(&self) -> bool {
        self.secret.cipher() != super::Cipher::Chacha20Poly1305
    }

    /// What an authenticated record's plaintext means.
    fn content<'a>(
        &mut self,
        typ: ContentType,
        plain: &'a [u8],
    ) -> Result<Content<'a>, RecordError> {
        match typ {
            ContentType::ApplicationData => {
                if !plain.is_empty() {
                    self.empty_in_a_row = 0;
                } else if self.empty_in_a_row == MAX_EMPTY_IN_A_ROW {
                    return Err(RecordError::UnexpectedMessage);
                } else {
                    self.empty_in_a_row += 1;
                }
                Ok(Content::Data(plain))
            }
            ContentType::Alert => match plain {
                // RFC 8446 6: only the description matters (every alert
                // but close_notify and user_canceled is an error alert,
                // whatever its level).
                [_level, description] => Ok(match AlertDescription::from(*description) {
                    AlertDescription::CloseNotify => Content::CloseNotify,
                    other => Content::Alert(other),
                }),
                _ => Err(RecordError::DecodeError),
            },
            ContentType::Handshake => {
                // A handshake message may span records; its type is its
                // first byte, all we need. Empty handshake records are
                // forbidden (RFC 8446 5.1).
                let Some(&msg) = plain.first() else {
                    return Err(RecordError::UnexpectedMessage);
                };
                match (self.version, HandshakeType::from(msg)) {
                    (Version::Tls13, HandshakeType::KeyUpdate) => {
                        Ok(Content::CannotFollow(CannotFollow::KeyUpdate))
                    }
                    (Version::Tls12, HandshakeType::ClientHello) => {
                        Ok(Content::CannotFollow(CannotFollow::Renegotiation))
                    }
                    // From a client after the handshake: a NewSessionTicket,
                    // a second ClientHello in TLS 1.3, a certificate we never
                    // asked for, a HelloRequest (a server's message) ...
                    _ => Err(RecordError::UnexpectedMessage),
                }
            }
            _ => Err(RecordError::UnexpectedMessage),
        }
    }
}
