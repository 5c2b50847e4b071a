//! One direction's traffic key, IV and sequence number: what rustls
//! extracted, in a type that wipes itself and never prints its key.

use ring::aead;
use rustls::ConnectionTrafficSecrets;
use zeroize::Zeroize;

use super::Cipher;
use crate::Error;

/// The longest key of the three ciphers (AES-256, ChaCha20).
const MAX_KEY_LEN: usize = 32;

/// One direction of a session: cipher, key, IV and the sequence number of
/// the next record. Zeroized on drop; `Debug` shows the cipher and the
/// sequence number only. Not `Clone`, so a key has one owner.
pub(crate) struct TrafficSecret {
    cipher: Cipher,
    // Fixed-size arrays, not Vecs: no reallocation can leave a copy behind.
    key: [u8; MAX_KEY_LEN],
    iv: [u8; 12],
    pub(super) seq: u64,
}

impl TrafficSecret {
    /// A secret from its parts (the handoff's decoding, the tests).
    ///
    /// # Errors
    /// [`Error::Tls`] if `key` is not as long as `cipher` needs.
    pub(crate) fn new(
        cipher: Cipher,
        key: &[u8],
        iv: [u8; 12],
        seq: u64,
    ) -> Result<TrafficSecret, Error> {
        if key.len() != cipher.key_len() {
            return Err(Error::Tls(format!(
                "a {cipher:?} traffic key is {} bytes, not {}",
                cipher.key_len(),
                key.len()
            )));
        }
        let mut secret = TrafficSecret {
            cipher,
            key: [0; MAX_KEY_LEN],
            iv,
            seq,
        };
        secret.key[..key.len()].copy_from_slice(key);
        Ok(secret)
    }

    /// Take one direction of [`rustls::ExtractedSecrets`] (rustls' own
    /// `AeadKey` wipes itself when dropped here).
    ///
    /// # Errors
    /// [`Error::Tls`] for a cipher this layer does not know (the enum is
    /// non-exhaustive) or a malformed key or IV.
    pub(crate) fn from_rustls(
        secrets: ConnectionTrafficSecrets,
        seq: u64,
    ) -> Result<TrafficSecret, Error> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => {
                return Err(Error::Tls(
                    "rustls extracted keys for a cipher the record layer does not carry".into(),
                ));
            }
        };
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| Error::Tls("rustls extracted an IV that is not 12 bytes".into()))?;
        TrafficSecret::new(cipher, key.as_ref(), iv, seq)
    }

    /// The cipher.
    pub(crate) fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// The sequence number of the next record.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// The key bytes (for the handoff to the next generation).
    pub(crate) fn key(&self) -> &[u8] {
        &self.key[..self.cipher.key_len()]
    }

    /// The IV (for the handoff to the next generation).
    pub(crate) fn iv(&self) -> &[u8; 12] {
        &self.iv
    }

    /// ring's key for this secret.
    pub(super) fn aead_key(&self) -> Result<AeadKey, Error> {
        let unbound = aead::UnboundKey::new(self.cipher.algorithm(), self.key())
            .map_err(|_| Error::Tls(format!("ring refused a {:?} key", self.cipher)))?;
        Ok(AeadKey(aead::LessSafeKey::new(unbound)))
    }
}

/// ring's key, with a `Debug` that prints nothing of it (ring's own prints
/// only the algorithm, but that is ring's choice to change).
pub(super) struct AeadKey(pub(super) aead::LessSafeKey);

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey(..)")
    }
}

impl Drop for TrafficSecret {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
    }
}

impl std::fmt::Debug for TrafficSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficSecret")
            .field("cipher", &self.cipher)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}
