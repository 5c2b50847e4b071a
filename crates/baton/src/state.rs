//! Typed state carried across an upgrade.
//!
//! The old generation registers exporters
//! ([`Baton::export_state`](crate::Baton::export_state)); the new one
//! imports ([`Baton::import_state`](crate::Baton::import_state)), before it
//! reports ready. Each piece of state travels in a versioned envelope:
//!
//! ```text
//! Envelope { type_name: "myapp.Cache", schema_version: 3, payload: postcard(T) }
//! ```
//!
//! The importer checks the type name, then the schema version: its own
//! version decodes directly, an older one goes through the app's migration
//! hook, anything else (a newer version, an unknown one) is a clear error
//! naming both versions — the new generation then reports `Failed` and the
//! old one keeps serving with its state intact.
//!
//! Small state travels inline on the handoff channel; larger state (over
//! 96 KiB in all, or a blob over 64 KiB) in sealed memfds, one per blob, so
//! 100 MB moves without copying through the socket. [`Config::state_limit`](crate::Config::state_limit) caps what
//! the new side accepts.
//!
//! ## Consistency
//!
//! The snapshot is taken when the new generation asks for it (as late as
//! possible: after it initialized everything that does not depend on
//! state). In the default [`StateMode::Live`], the old generation keeps
//! serving until promotion, so **writes it accepts between the snapshot and
//! the promotion are not in the snapshot** (typically a few milliseconds).
//! [`StateMode::Exact`] closes that window: at the snapshot the old
//! generation stops accepting, stops reading new requests, lets the ones in
//! flight finish, snapshots, and stays paused until the new generation is
//! promoted (or the upgrade fails and it resumes). New connections wait in
//! the kernel's accept queue meanwhile; none is refused. The pause is
//! measured and reported (`UpgradeReport::pause_ms`).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::config::StateMode;
use crate::error::Error;

/// The identity of a piece of state: a type name and a schema version.
///
/// ```
/// const COUNTER: baton::Schema = baton::Schema::new("myapp.Counter", 2);
/// assert_eq!(COUNTER.version, 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schema {
    /// A stable name for the type (not `std::any::type_name`, which may
    /// change between compiler versions).
    pub type_name: &'static str,
    /// The schema version this build writes and reads.
    pub version: u32,
}

impl Schema {
    /// A schema.
    pub const fn new(type_name: &'static str, version: u32) -> Self {
        Schema { type_name, version }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    type_name: String,
    schema_version: u32,
    #[serde(with = "as_bytes")]
    payload: Vec<u8>,
}

/// Serialize a `Vec<u8>` as one byte string (`serialize_bytes`) instead of
/// a sequence of `u8`: with postcard that is a length and a `memcpy`, not a
/// per-byte loop. Use it on large byte fields of your state:
///
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Cache {
///     #[serde(with = "baton::state::as_bytes")]
///     blob: Vec<u8>,
/// }
/// ```
pub mod as_bytes {
    use serde::{Deserializer, Serializer};

    /// Serialize.
    ///
    /// # Errors
    /// The serializer's.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    struct V;

    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    /// Deserialize.
    ///
    /// # Errors
    /// The deserializer's.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(V)
    }
}

/// [`as_bytes`] for maps of byte strings (e.g. a cache).
pub mod map_as_bytes {
    use std::collections::BTreeMap;

    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct B(#[serde(with = "super::as_bytes")] Vec<u8>);

    /// Serialize.
    ///
    /// # Errors
    /// The serializer's.
    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(m.len()))?;
        for (k, v) in m {
            map.serialize_entry(k, &Ref(v))?;
        }
        map.end()
    }

    struct Ref<'a>(&'a [u8]);

    impl Serialize for Ref<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    /// Deserialize.
    ///
    /// # Errors
    /// The deserializer's.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let m: BTreeMap<String, B> = BTreeMap::deserialize(d)?;
        Ok(m.into_iter().map(|(k, v)| (k, v.0)).collect())
    }
}

/// Encode `value` in an envelope (what the old generation sends).
///
/// # Errors
/// [`Error::State`] if serialization fails.
pub fn encode<T: Serialize>(schema: Schema, value: &T) -> Result<Vec<u8>, Error> {
    let payload = postcard::to_stdvec(value)
        .map_err(|e| Error::State(format!("serializing {}: {e}", schema.type_name)))?;
    postcard::to_stdvec(&Envelope {
        type_name: schema.type_name.to_owned(),
        schema_version: schema.version,
        payload,
    })
    .map_err(|e| {
        Error::State(format!(
            "serializing the envelope of {}: {e}",
            schema.type_name
        ))
    })
}

/// Decode an envelope into `T` (what the new generation does).
///
/// `migrate(old_version, payload)` is called for an older schema version.
///
/// # Errors
/// [`Error::State`] naming the problem: corrupt bytes, another type, a
/// version this build cannot read (both versions named), or a failed
/// migration.
pub fn decode<T: DeserializeOwned>(
    name: &str,
    schema: Schema,
    bytes: &[u8],
    migrate: Option<Migration<'_, T>>,
) -> Result<T, Error> {
    let env: Envelope = postcard::from_bytes(bytes).map_err(|e| {
        Error::State(format!(
            "state '{name}' is corrupt ({} bytes): {e}",
            bytes.len()
        ))
    })?;
    if env.type_name != schema.type_name {
        return Err(Error::State(format!(
            "state '{name}' holds a '{}', this version expects a '{}'",
            env.type_name, schema.type_name
        )));
    }
    if env.schema_version == schema.version {
        return postcard::from_bytes(&env.payload).map_err(|e| {
            Error::State(format!(
                "state '{name}' (schema v{}) does not decode as this version's v{}: {e}",
                env.schema_version, schema.version
            ))
        });
    }
    if env.schema_version < schema.version
        && let Some(m) = migrate
    {
        return m(env.schema_version, &env.payload).map_err(|e| {
            Error::State(format!(
                "migrating state '{name}' from schema v{} to v{} failed: {e}",
                env.schema_version, schema.version
            ))
        });
    }
    let why = if env.schema_version > schema.version {
        "which is newer: a downgrade needs a migration in the old version".to_owned()
    } else {
        format!("and has no migration from v{}", env.schema_version)
    };
    Err(Error::State(format!(
        "state '{name}' has schema v{} ({}); this version reads v{} {why}",
        env.schema_version, env.type_name, schema.version
    )))
}

/// Decode the postcard payload of an envelope (for migration hooks).
///
/// # Errors
/// [`Error::State`] if it does not decode as `T`.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    postcard::from_bytes(payload).map_err(|e| Error::State(format!("payload does not decode: {e}")))
}

/// A migration hook: `(old_version, old_payload) -> new value`.
pub type Migration<'a, T> = &'a dyn Fn(u32, &[u8]) -> Result<T, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V1 {
        n: u64,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V2 {
        n: u64,
        label: String,
    }

    const S1: Schema = Schema::new("t.Counter", 1);
    const S2: Schema = Schema::new("t.Counter", 2);

    #[test]
    fn same_version_roundtrips() {
        let b = encode(S1, &V1 { n: 7 }).unwrap();
        assert_eq!(decode::<V1>("c", S1, &b, None).unwrap(), V1 { n: 7 });
    }

    #[test]
    fn older_version_migrates() {
        let b = encode(S1, &V1 { n: 7 }).unwrap();
        let m = |v: u32, p: &[u8]| -> Result<V2, String> {
            assert_eq!(v, 1);
            let old: V1 = postcard::from_bytes(p).map_err(|e| e.to_string())?;
            Ok(V2 {
                n: old.n,
                label: "migrated".into(),
            })
        };
        let got = decode::<V2>("c", S2, &b, Some(&m)).unwrap();
        assert_eq!(got.n, 7);
        assert_eq!(got.label, "migrated");
    }

    #[test]
    fn errors_name_both_versions() {
        let b = encode(
            S2,
            &V2 {
                n: 1,
                label: String::new(),
            },
        )
        .unwrap();
        let e = decode::<V1>("c", S1, &b, None).unwrap_err().to_string();
        assert!(e.contains("v2") && e.contains("v1"), "{e}");
        let b = encode(S1, &V1 { n: 1 }).unwrap();
        let e = decode::<V2>("c", S2, &b, None).unwrap_err().to_string();
        assert!(
            e.contains("v1") && e.contains("v2") && e.contains("no migration"),
            "{e}"
        );
        let e = decode::<V1>("c", Schema::new("other", 1), &b, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("other"), "{e}");
    }

    #[test]
    fn corrupt_bytes_are_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"\xff\xff\xff\xff\xff",
            b"garbage that is long enough to look like something",
        ] {
            assert!(decode::<V1>("c", S1, bytes, None).is_err());
        }
        // A valid envelope with a garbage payload.
        let b = postcard::to_stdvec(&Envelope {
            type_name: "t.Counter".into(),
            schema_version: 1,
            payload: vec![0xff; 3],
        })
        .unwrap();
        assert!(decode::<V1>("c", S1, &b, None).is_err());
    }
}
