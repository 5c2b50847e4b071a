//! Session-ticket keys that outlive a process.
//!
//! rustls' own ticketers keep their keys private, so a new generation could
//! not decrypt the tickets its predecessor issued and every client would pay
//! a full handshake after an upgrade. This ticketer owns its key material:
//! the old generation exports it (keys *and* their creation times) through
//! baton's state channel, the new one imports it. It is never written to
//! disk.
//!
//! ## Keys and rotation
//!
//! Two keys at most: `current` encrypts new tickets; `previous` (the one
//! before the last rotation) still decrypts. A key is replaced once it is
//! `rotation` old and erased once it is `2 × rotation` old, so a ticket is
//! accepted for at least `rotation` and at most `2 × rotation` after it was
//! issued. Rotation is lazy (checked on every use and at export), and the
//! schedule is kept across upgrades because the creation times travel with
//! the keys (wall-clock Unix milliseconds: the only clock two processes
//! share; a clock set back more than one rotation forces a rotation).
//!
//! The lifetime hint sent with a ticket is exactly how long its key will
//! still decrypt it, so clients never keep a ticket the server would refuse.
//!
//! The same keys protect TLS 1.3 tickets and TLS 1.2 session tickets
//! (rustls uses one ticketer for both).
//!
//! ## Ticket format
//!
//! `key name (16) | nonce (12) | ChaCha20-Poly1305(plaintext) | tag (16)`,
//! with the key name as associated data. The nonce is random (a counter
//! would be a privacy leak and would not survive an upgrade).
//!
//! ## State format (version 1)
//!
//! `"BTTK" | version u16 BE | key count u8 (1 or 2) | per key: name (16),
//! secret (32), created Unix ms u64 BE` — current key first. Anything else
//! is a clear error, never a panic.

use std::sync::{PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use ring::aead;
use ring::rand::{SecureRandom, SystemRandom};

/// Name under which the ticket keys travel to the next generation.
pub const TICKET_STATE_NAME: &str = "baton-http.tls-tickets";

const MAGIC: &[u8; 4] = b"BTTK";
/// The state format this build writes and reads.
pub(crate) const STATE_VERSION: u16 = 1;
const NAME_LEN: usize = 16;
const SECRET_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_RECORD_LEN: usize = NAME_LEN + SECRET_LEN + 8;
const HEADER_LEN: usize = 4 + 2 + 1;
/// Longest ticket we try to decrypt: ours are a few hundred bytes (no
/// client certificates); anything longer is not ours.
const MAX_TICKET_LEN: usize = 16 * 1024;
/// TLS 1.3 forbids ticket lifetimes over seven days (RFC 8446, 4.6.1).
const MAX_LIFETIME_SECS: u64 = 7 * 24 * 3600;
static AEAD: &aead::Algorithm = &aead::CHACHA20_POLY1305;

/// Why a ticket-key state could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateError(pub(crate) String);

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct Key {
    name: [u8; NAME_LEN],
    secret: [u8; SECRET_LEN],
    created_ms: u64,
    aead: aead::LessSafeKey,
}

impl Key {
    fn from_parts(
        name: [u8; NAME_LEN],
        secret: [u8; SECRET_LEN],
        created_ms: u64,
    ) -> Result<Key, StateError> {
        let unbound = aead::UnboundKey::new(AEAD, &secret)
            .map_err(|_| StateError("the ticket key has the wrong length".into()))?;
        Ok(Key {
            name,
            secret,
            created_ms,
            aead: aead::LessSafeKey::new(unbound),
        })
    }

    fn generate(rng: &SystemRandom, created_ms: u64) -> Result<Key, StateError> {
        let mut name = [0u8; NAME_LEN];
        let mut secret = [0u8; SECRET_LEN];
        rng.fill(&mut name)
            .and_then(|()| rng.fill(&mut secret))
            .map_err(|_| StateError("the system random source failed".into()))?;
        Key::from_parts(name, secret, created_ms)
    }
}

struct Keys {
    current: Key,
    previous: Option<Key>,
}

/// The ticketer rustls calls; see the module docs.
pub(crate) struct Ticketer {
    rotation_ms: u64,
    keys: RwLock<Keys>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("Ticketer")
            .field("rotation_ms", &self.rotation_ms)
            .finish_non_exhaustive()
    }
}

/// Wall-clock Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Ticketer {
    /// Fresh keys (a first generation, or a predecessor without TLS).
    pub(crate) fn new(rotation: Duration, now_ms: u64) -> Result<Ticketer, StateError> {
        let rng = SystemRandom::new();
        let current = Key::generate(&rng, now_ms)?;
        Ok(Ticketer {
            rotation_ms: rotation_ms(rotation),
            keys: RwLock::new(Keys {
                current,
                previous: None,
            }),
            rng,
        })
    }

    /// The keys a predecessor exported with [`export`](Ticketer::export).
    /// Keys already past their life are dropped (or rotated) right away.
    pub(crate) fn import(
        rotation: Duration,
        state: &[u8],
        now_ms: u64,
    ) -> Result<Ticketer, StateError> {
        let (current, previous) = decode(state)?;
        let t = Ticketer {
            rotation_ms: rotation_ms(rotation),
            keys: RwLock::new(Keys { current, previous }),
            rng: SystemRandom::new(),
        };
        t.maybe_rotate(now_ms);
        Ok(t)
    }

    /// The state to hand to the next generation (rotating first if due, so
    /// it does not inherit a key that is already too old).
    pub(crate) fn export(&self, now_ms: u64) -> Vec<u8> {
        self.maybe_rotate(now_ms);
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::with_capacity(HEADER_LEN + 2 * KEY_RECORD_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_be_bytes());
        let all: Vec<&Key> = std::iter::once(&keys.current)
            .chain(keys.previous.as_ref())
            .collect();
        out.push(all.len() as u8);
        for k in all {
            out.extend_from_slice(&k.name);
            out.extend_from_slice(&k.secret);
            out.extend_from_slice(&k.created_ms.to_be_bytes());
        }
        out
    }

    /// Creation time of the current key (Unix ms), for logs.
    pub(crate) fn current_created_ms(&self) -> u64 {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .current
            .created_ms
    }

    /// Rotate if the current key is due; erase a previous key past its life.
    fn maybe_rotate(&self, now_ms: u64) {
        if !self.rotation_due(now_ms) {
            return;
        }
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let r = self.rotation_ms;
        if past(&keys.current, now_ms, r, r) {
            let fresh = match Key::generate(&self.rng, now_ms) {
                Ok(k) => k,
                Err(e) => {
                    // Keep the old key a little longer rather than stop
                    // issuing tickets; the next use tries again.
                    tracing::warn!(error = %e, "could not rotate the TLS ticket key");
                    return;
                }
            };
            let old = std::mem::replace(&mut keys.current, fresh);
            keys.previous = Some(old);
            tracing::debug!("TLS session-ticket key rotated");
        }
        if keys
            .previous
            .as_ref()
            .is_some_and(|p| past(p, now_ms, 2 * r, r))
        {
            keys.previous = None;
        }
    }

    fn rotation_due(&self, now_ms: u64) -> bool {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let r = self.rotation_ms;
        past(&keys.current, now_ms, r, r)
            || keys
                .previous
                .as_ref()
                .is_some_and(|p| past(p, now_ms, 2 * r, r))
    }

    /// Seconds a ticket issued now stays decryptable.
    pub(crate) fn lifetime_at(&self, now_ms: u64) -> u32 {
        self.maybe_rotate(now_ms);
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let end = keys.current.created_ms.saturating_add(2 * self.rotation_ms);
        let secs = end.saturating_sub(now_ms) / 1000;
        secs.clamp(1, MAX_LIFETIME_SECS) as u32
    }

    pub(crate) fn encrypt_at(&self, plain: &[u8], now_ms: u64) -> Option<Vec<u8>> {
        self.maybe_rotate(now_ms);
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let key = &keys.current;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(key.name),
                &mut out[NAME_LEN + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    pub(crate) fn decrypt_at(&self, ticket: &[u8], now_ms: u64) -> Option<Vec<u8>> {
        if ticket.len() > MAX_TICKET_LEN || ticket.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        self.maybe_rotate(now_ms);
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        // The key name is public (it is in every ticket); the AEAD tag is
        // what authenticates, with the name bound in as associated data.
        let key = std::iter::once(&keys.current)
            .chain(keys.previous.as_ref())
            .find(|k| k.name[..] == *name)?;
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain_len = key
            .aead
            .open_in_place(nonce, aead::Aad::from(key.name), &mut buf)
            .ok()?
            .len();
        buf.truncate(plain_len);
        Some(buf)
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime_at(now_ms())
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(plain, now_ms())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(cipher, now_ms())
    }
}

/// A key is `limit` old, or was created more than one rotation period in
/// the future (the clock was set back: trust nothing about the schedule).
fn past(k: &Key, now_ms: u64, limit: u64, rotation_ms: u64) -> bool {
    now_ms.saturating_sub(k.created_ms) >= limit
        || k.created_ms > now_ms.saturating_add(rotation_ms)
}

fn rotation_ms(rotation: Duration) -> u64 {
    (rotation.as_millis() as u64).max(1)
}

fn decode(state: &[u8]) -> Result<(Key, Option<Key>), StateError> {
    let err = |m: String| StateError(m);
    if state.len() < HEADER_LEN {
        return Err(err(format!(
            "{} bytes is too short for a ticket-key state",
            state.len()
        )));
    }
    let (magic, rest) = state.split_at(4);
    if magic != MAGIC {
        return Err(err(
            "this is not a baton-http ticket-key state (wrong magic bytes)".into(),
        ));
    }
    let (version, rest) = rest.split_at(2);
    let version = u16::from_be_bytes([version[0], version[1]]);
    if version != STATE_VERSION {
        return Err(err(format!(
            "ticket-key state format version {version}; this build reads version {STATE_VERSION} \
             (upgrade to a build that reads it, or restart instead of upgrading)"
        )));
    }
    let (count, records) = rest.split_at(1);
    let count = count[0] as usize;
    if !(1..=2).contains(&count) {
        return Err(err(format!(
            "ticket-key state holds {count} keys (1 or 2 expected)"
        )));
    }
    if records.len() != count * KEY_RECORD_LEN {
        return Err(err(format!(
            "ticket-key state is {} bytes long, {} expected for {count} keys",
            state.len(),
            HEADER_LEN + count * KEY_RECORD_LEN
        )));
    }
    let mut keys = records.chunks_exact(KEY_RECORD_LEN).map(|r| {
        let mut name = [0u8; NAME_LEN];
        let mut secret = [0u8; SECRET_LEN];
        let mut created = [0u8; 8];
        name.copy_from_slice(&r[..NAME_LEN]);
        secret.copy_from_slice(&r[NAME_LEN..NAME_LEN + SECRET_LEN]);
        created.copy_from_slice(&r[NAME_LEN + SECRET_LEN..]);
        Key::from_parts(name, secret, u64::from_be_bytes(created))
    });
    let current = keys
        .next()
        .ok_or_else(|| err("ticket-key state holds no key".into()))??;
    let previous = keys.next().transpose()?;
    if previous.as_ref().is_some_and(|p| p.name == current.name) {
        return Err(err("ticket-key state holds the same key twice".into()));
    }
    Ok((current, previous))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const R: Duration = Duration::from_secs(100);
    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn a_ticket_survives_export_and_import() {
        let a = Ticketer::new(R, T0).unwrap();
        let ticket = a.encrypt_at(b"session", T0).unwrap();
        let b = Ticketer::import(R, &a.export(T0 + 10), T0 + 20).unwrap();
        assert_eq!(b.decrypt_at(&ticket, T0 + 30).unwrap(), b"session");
        // And the other way: tickets the new one issues, the old one reads
        // (both serve during the drain).
        let t2 = b.encrypt_at(b"other", T0 + 40).unwrap();
        assert_eq!(a.decrypt_at(&t2, T0 + 40).unwrap(), b"other");
    }

    #[test]
    fn fresh_ticketers_do_not_read_each_others_tickets() {
        let a = Ticketer::new(R, T0).unwrap();
        let b = Ticketer::new(R, T0).unwrap();
        let ticket = a.encrypt_at(b"session", T0).unwrap();
        assert!(b.decrypt_at(&ticket, T0).is_none());
    }

    #[test]
    fn rotation_keeps_the_previous_key_for_one_more_period_and_the_schedule_travels() {
        let a = Ticketer::new(R, T0).unwrap();
        let old = a.encrypt_at(b"old", T0 + 1_000).unwrap();
        assert_eq!(a.lifetime_at(T0 + 1_000), 199);
        // Carried across two upgrades before the rotation is due: the
        // creation time is the original one, not the import time.
        let b = Ticketer::import(R, &a.export(T0 + 50_000), T0 + 50_000).unwrap();
        let c = Ticketer::import(R, &b.export(T0 + 90_000), T0 + 90_000).unwrap();
        assert_eq!(c.current_created_ms(), T0);
        assert_eq!(c.lifetime_at(T0 + 90_000), 110);
        // Due at T0 + 100 s: a new key encrypts, the old one still decrypts.
        let new = c.encrypt_at(b"new", T0 + 120_000).unwrap();
        assert_eq!(c.current_created_ms(), T0 + 120_000);
        assert_eq!(c.lifetime_at(T0 + 120_000), 200);
        assert_ne!(new[..NAME_LEN], old[..NAME_LEN]);
        assert_eq!(c.decrypt_at(&old, T0 + 150_000).unwrap(), b"old");
        // The previous key travels too.
        let d = Ticketer::import(R, &c.export(T0 + 160_000), T0 + 160_000).unwrap();
        assert_eq!(d.decrypt_at(&old, T0 + 170_000).unwrap(), b"old");
        // Erased at twice the rotation period.
        assert!(d.decrypt_at(&old, T0 + 200_000).is_none());
        assert_eq!(d.decrypt_at(&new, T0 + 200_000).unwrap(), b"new");
    }

    #[test]
    fn a_long_gap_erases_both_keys() {
        let a = Ticketer::new(R, T0).unwrap();
        let t = a.encrypt_at(b"x", T0).unwrap();
        let b = Ticketer::import(R, &a.export(T0), T0 + 500_000).unwrap();
        assert!(b.decrypt_at(&t, T0 + 500_000).is_none());
        assert_eq!(b.current_created_ms(), T0 + 500_000);
    }

    #[test]
    fn a_clock_set_back_forces_a_new_key() {
        let a = Ticketer::new(R, T0).unwrap();
        let _ = a.encrypt_at(b"x", T0 - 1_000_000);
        assert_eq!(a.current_created_ms(), T0 - 1_000_000);
    }

    #[test]
    fn tampered_or_foreign_tickets_are_refused() {
        let a = Ticketer::new(R, T0).unwrap();
        let mut t = a.encrypt_at(b"session", T0).unwrap();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert!(a.decrypt_at(&t, T0).is_none());
        assert!(a.decrypt_at(&[], T0).is_none());
        assert!(a.decrypt_at(&[0u8; 43], T0).is_none());
        assert!(a.decrypt_at(&vec![0u8; MAX_TICKET_LEN + 1], T0).is_none());
    }

    #[test]
    fn malformed_states_are_clear_errors() {
        let good = Ticketer::new(R, T0).unwrap().export(T0);
        let msg = |s: &[u8]| Ticketer::import(R, s, T0).unwrap_err().0;
        assert!(msg(b"").contains("too short"), "{}", msg(b""));
        assert!(msg(b"garbage!!!").contains("wrong magic"));
        let mut v2 = good.clone();
        v2[5] = 2;
        assert!(
            msg(&v2).contains("version 2; this build reads version 1"),
            "{}",
            msg(&v2)
        );
        assert!(msg(&good[..good.len() - 1]).contains("bytes long"));
        let mut count = good.clone();
        count[6] = 3;
        assert!(msg(&count).contains("3 keys"));
        count[6] = 0;
        assert!(msg(&count).contains("0 keys"));
        let mut long = good.clone();
        long.push(0);
        assert!(msg(&long).contains("bytes long"));
        // Every truncation and every single-byte corruption of the header
        // is an error or a valid state, never a panic.
        for n in 0..good.len() {
            let _ = Ticketer::import(R, &good[..n], T0);
        }
        for i in 0..HEADER_LEN {
            for b in [0u8, 1, 2, 0x7f, 0xff] {
                let mut s = good.clone();
                s[i] = b;
                let _ = Ticketer::import(R, &s, T0);
            }
        }
    }

    #[test]
    fn the_same_key_twice_is_refused() {
        let a = Ticketer::new(R, T0).unwrap();
        let one = a.export(T0);
        let mut two = one.clone();
        two[6] = 2;
        two.extend_from_slice(&one[HEADER_LEN..]);
        assert!(
            Ticketer::import(R, &two, T0)
                .unwrap_err()
                .0
                .contains("same key twice")
        );
    }
}
