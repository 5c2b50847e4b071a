//! The decoder's validation, the keys' limits, and properties over
//! arbitrary input, for every (version, cipher).

use proptest::prelude::*;
use rustls::{AlertDescription, ContentType};

use super::{ALL, Content, Opened, RecordError, hex, open_all, opener, sealer};
use crate::tls::record::{
    AES_GCM_RECORD_LIMIT, CLOSE_MARGIN, CannotFollow, Cipher, HEADER_LEN, MAX_EMPTY_IN_A_ROW,
    MAX_FRAGMENT, Opener, Sealer, TrafficSecret, Version,
};

/// One record of type `typ` carrying `plain`, sealed at `seq`.
fn record(version: Version, cipher: Cipher, seq: u64, typ: ContentType, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    sealer(version, cipher, seq)
        .seal_record(typ, plain, &mut out)
        .unwrap();
    out
}

fn open_one(version: Version, cipher: Cipher, seq: u64, wire: &[u8]) -> String {
    let mut buf = wire.to_vec();
    format!("{:?}", opener(version, cipher, seq).open(&mut buf))
}

#[test]
fn a_record_under_the_wrong_sequence_number_or_key_is_bad_record_mac() {
    for (v, c) in ALL {
        let wire = record(v, c, 5, ContentType::ApplicationData, b"hello");
        assert!(
            open_one(v, c, 5, &wire).contains("Data([104, 101"),
            "{v:?} {c:?}"
        );
        for seq in [4, 6, 5 ^ (1 << 63)] {
            assert_eq!(
                open_one(v, c, seq, &wire),
                "Err(BadRecordMac)",
                "{v:?} {c:?} {seq}"
            );
        }
        let other = TrafficSecret::new(c, &vec![8; c.key_len()], [7 ^ 0x5a; 12], 5).unwrap();
        let mut buf = wire.clone();
        assert_eq!(
            Opener::new(v, other).unwrap().open(&mut buf),
            Err(RecordError::BadRecordMac),
            "{v:?} {c:?}"
        );
    }
}

#[test]
fn what_the_record_layer_cannot_follow_is_reported_as_such() {
    let key_update = [24, 0, 0, 1, 0];
    let client_hello = [1, 0, 0, 4, 3, 3, 0, 0];
    for (v, c) in ALL {
        let (msg, want) = match v {
            Version::Tls13 => (&key_update[..], CannotFollow::KeyUpdate),
            Version::Tls12 => (&client_hello[..], CannotFollow::Renegotiation),
        };
        let wire = record(v, c, 0, ContentType::Handshake, msg);
        let mut buf = wire.clone();
        let mut opener = opener(v, c, 0);
        assert_eq!(
            opener.open(&mut buf),
            Ok(Opened::Record {
                len: wire.len(),
                content: Content::CannotFollow(want)
            })
        );
        // Terminal: what follows a KeyUpdate is under a key we lack.
        let mut next = record(v, c, 1, ContentType::ApplicationData, b"x");
        assert_eq!(opener.open(&mut next), Err(RecordError::Closed));
    }
}

#[test]
fn forbidden_content_from_a_client_is_unexpected_message() {
    for (v, c) in ALL {
        let unexpected = [
            // NewSessionTicket is the server's to send.
            (ContentType::Handshake, &[4, 0, 0, 0][..]),
            // HelloRequest too (and a ClientHello in TLS 1.3).
            (
                ContentType::Handshake,
                if v == Version::Tls13 {
                    &[1, 0, 0, 0][..]
                } else {
                    &[0, 0, 0, 0][..]
                },
            ),
            (ContentType::Handshake, &[][..]),
            (ContentType::ChangeCipherSpec, &[1][..]),
            (ContentType::Heartbeat, &[1, 2, 3][..]),
        ];
        for (typ, plain) in unexpected {
            let wire = record(v, c, 0, typ, plain);
            assert_eq!(
                open_one(v, c, 0, &wire),
                "Err(UnexpectedMessage)",
                "{v:?} {c:?} {typ:?} {plain:?}"
            );
        }
        let bad_alert = record(v, c, 0, ContentType::Alert, &[2, 20, 0]);
        assert_eq!(open_one(v, c, 0, &bad_alert), "Err(DecodeError)");
        let fatal = record(v, c, 0, ContentType::Alert, &[2, 20]);
        assert!(open_one(v, c, 0, &fatal).contains("Alert(BadRecordMac)"));
        let close = record(v, c, 0, ContentType::Alert, &[1, 0]);
        assert!(open_one(v, c, 0, &close).contains("CloseNotify"));
    }
}

#[test]
fn tls13_inner_plaintext_padding_is_removed_and_all_padding_is_refused() {
    for (v, c) in ALL.into_iter().filter(|(v, _)| *v == Version::Tls13) {
        // Our sealer appends the content type it is given to the inner
        // plaintext; type 0 makes it one more padding byte, so this is
        // "hi" ‖ application_data ‖ three zeros.
        let wire = record(v, c, 0, ContentType::from(0), b"hi\x17\0\0");
        assert!(
            open_one(v, c, 0, &wire).contains("Data([104, 105])"),
            "{c:?}"
        );
        let wire = record(v, c, 0, ContentType::from(0), b"\0\0\0");
        assert_eq!(open_one(v, c, 0, &wire), "Err(UnexpectedMessage)");
    }
}

#[test]
fn empty_records_are_data_but_an_endless_run_of_them_is_refused() {
    for (v, c) in ALL {
        let mut s = sealer(v, c, 0);
        let mut wire = Vec::new();
        let n = usize::from(MAX_EMPTY_IN_A_ROW);
        // A run of the most allowed, broken by data, twice; then one too many.
        for _ in 0..2 {
            for _ in 0..n {
                s.seal_record(ContentType::ApplicationData, b"", &mut wire)
                    .unwrap();
            }
            s.seal_data(b"x", &mut wire).unwrap();
        }
        for _ in 0..=n {
            s.seal_record(ContentType::ApplicationData, b"", &mut wire)
                .unwrap();
        }
        let (data, end) = open_all(&mut opener(v, c, 0), &wire, 1000);
        assert_eq!(data, b"xx", "{v:?} {c:?}");
        assert_eq!(
            end,
            Some(Err(RecordError::UnexpectedMessage)),
            "{v:?} {c:?}"
        );
    }
}

#[test]
fn headers_are_checked_before_the_body_arrives() {
    for (v, c) in ALL {
        let max = match v {
            Version::Tls13 => MAX_FRAGMENT + 256,
            Version::Tls12 => MAX_FRAGMENT + 2048,
        };
        let len = |n: usize| [(n >> 8) as u8, n as u8];
        let header = |typ: u8, ver: [u8; 2], n: usize| {
            let [a, b] = len(n);
            vec![typ, ver[0], ver[1], a, b]
        };
        // Only headers: each verdict comes without the body.
        assert_eq!(
            open_one(v, c, 0, &header(23, [3, 3], max + 1)),
            "Err(RecordOverflow)"
        );
        assert_eq!(
            open_one(v, c, 0, &header(23, [3, 3], 0xffff)),
            "Err(RecordOverflow)"
        );
        assert_eq!(
            open_one(v, c, 0, &header(23, [3, 3], max)),
            format!("Ok(Incomplete {{ needed: {max} }})")
        );
        assert_eq!(
            open_one(v, c, 0, &header(23, [3, 1], 100)),
            "Err(DecodeError)"
        );
        assert_eq!(
            open_one(v, c, 0, &header(23, [3, 4], 100)),
            "Err(DecodeError)"
        );
        assert_eq!(
            open_one(v, c, 0, &header(23, [3, 3], 0)),
            "Err(DecodeError)"
        );
        assert_eq!(
            open_one(v, c, 0, &header(23, [3, 3], 16)),
            if v == Version::Tls12 && c == Cipher::Chacha20Poly1305 {
                "Ok(Incomplete { needed: 16 })"
            } else {
                "Err(DecodeError)"
            }
        );
        assert_eq!(
            open_one(v, c, 0, &header(24, [3, 3], 100)),
            "Err(UnexpectedMessage)"
        );
        assert_eq!(
            open_one(v, c, 0, &header(0x80, [3, 3], 100)),
            "Err(UnexpectedMessage)"
        );
        // TLS 1.3 protects everything: a plaintext alert is not allowed.
        let alert = header(21, [3, 3], 2);
        let want = if v == Version::Tls13 {
            "Err(UnexpectedMessage)"
        } else {
            "Err(DecodeError)"
        };
        assert_eq!(open_one(v, c, 0, &alert), want, "{v:?} {c:?}");
        assert_eq!(open_one(v, c, 0, &[23, 3]), "Ok(Incomplete { needed: 3 })");
    }
}

/// A record sealed with ring directly (not our sealer, which refuses to
/// make oversized ones), with the test keys of `super::secret`.
fn raw_record(v: Version, c: Cipher, seq: u64, typ: u8, plain: &[u8]) -> Vec<u8> {
    use ring::aead;
    let alg = match c {
        Cipher::Aes128Gcm => &aead::AES_128_GCM,
        Cipher::Aes256Gcm => &aead::AES_256_GCM,
        Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
    };
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(alg, &vec![7; c.key_len()]).unwrap());
    let mut nonce = [7 ^ 0x5a; 12];
    for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    let explicit = v == Version::Tls12 && c != Cipher::Chacha20Poly1305;
    let (outer, mut body) = match v {
        Version::Tls13 => (23, [plain, &[typ]].concat()),
        Version::Tls12 => (typ, plain.to_vec()),
    };
    let len = body.len() + 16 + if explicit { 8 } else { 0 };
    let header = [outer, 3, 3, (len >> 8) as u8, len as u8];
    let aad = match v {
        Version::Tls13 => header.to_vec(),
        Version::Tls12 => {
            let n = body.len();
            [
                &seq.to_be_bytes()[..],
                &[typ, 3, 3, (n >> 8) as u8, n as u8],
            ]
            .concat()
        }
    };
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(aad),
        &mut body,
    )
    .unwrap();
    let explicit = if explicit { &nonce[4..] } else { &[][..] };
    [&header[..], explicit, &body].concat()
}

#[test]
fn a_plaintext_over_two_to_the_fourteen_is_record_overflow() {
    for (v, c) in ALL {
        // Built independently with ring: the same bytes as our sealer's.
        assert_eq!(
            raw_record(v, c, 9, 23, b"same"),
            record(v, c, 9, ContentType::ApplicationData, b"same"),
            "{v:?} {c:?}"
        );
        let wire = raw_record(v, c, 0, 23, &vec![b'a'; MAX_FRAGMENT]);
        assert!(
            open_one(v, c, 0, &wire).starts_with("Ok(Record"),
            "{v:?} {c:?}"
        );
        let wire = raw_record(v, c, 0, 23, &vec![b'a'; MAX_FRAGMENT + 1]);
        assert_eq!(
            open_one(v, c, 0, &wire),
            "Err(RecordOverflow)",
            "{v:?} {c:?}"
        );
        // Our sealer refuses to make one.
        let mut out = Vec::new();
        assert_eq!(
            sealer(v, c, 0).seal_record(
                ContentType::ApplicationData,
                &vec![0; MAX_FRAGMENT + 1],
                &mut out
            ),
            Err(RecordError::Internal)
        );
        assert!(out.is_empty());
    }
}

#[test]
fn a_key_at_its_limit_refuses_to_seal_but_keeps_the_closing_alert() {
    for (v, c) in ALL {
        let limit = c.seal_limit();
        if matches!(c, Cipher::Aes128Gcm | Cipher::Aes256Gcm) {
            assert_eq!(limit, AES_GCM_RECORD_LIMIT);
        } else {
            assert_eq!(limit, u64::MAX);
        }
        assert!(!sealer(v, c, limit - CLOSE_MARGIN - 1).must_close());
        assert!(sealer(v, c, limit - CLOSE_MARGIN).must_close());

        // Three records would take limit−3, limit−2, limit−1 (the alert's).
        let three = vec![1; 2 * MAX_FRAGMENT + 1];
        let mut s = sealer(v, c, limit - 3);
        let mut out = Vec::new();
        assert_eq!(
            s.seal_data(&three, &mut out),
            Err(RecordError::KeyExhausted)
        );
        assert!(out.is_empty(), "all or nothing");
        assert_eq!(s.seq(), limit - 3, "no sequence number used");
        let mut s = sealer(v, c, limit - 4);
        s.seal_data(&three, &mut out).unwrap();
        assert_eq!(s.seq(), limit - 1);
        assert_eq!(s.seal_data(b"x", &mut out), Err(RecordError::KeyExhausted));
        s.seal_alert(AlertDescription::CloseNotify, &mut out)
            .unwrap();
        assert_eq!(s.seq(), limit);
        assert_eq!(s.seal_data(b"x", &mut out), Err(RecordError::Closed));
        assert_eq!(
            s.seal_alert(AlertDescription::CloseNotify, &mut out),
            Err(RecordError::Closed)
        );
        // The records made before the limit open, the last one is the alert.
        let (data, end) = open_all(&mut opener(v, c, limit - 4), &out, 4096);
        assert_eq!(data, three);
        assert_eq!(end, Some(Ok("CloseNotify".into())));

        // A key already past the limit seals nothing, not even an alert.
        let mut s = sealer(v, c, limit);
        assert_eq!(
            s.seal_alert(AlertDescription::CloseNotify, &mut out),
            Err(RecordError::KeyExhausted)
        );
    }
    // The peer's sequence numbers must not wrap either.
    let mut buf = vec![23, 3, 3, 0, 17];
    buf.extend_from_slice(&[0; 17]);
    let mut o = opener(Version::Tls13, Cipher::Chacha20Poly1305, u64::MAX);
    assert_eq!(o.open(&mut buf), Err(RecordError::KeyExhausted));
}

#[test]
fn traffic_secrets_do_not_print_their_keys() {
    let key = hex("00112233445566778899aabbccddeeff");
    let secret = TrafficSecret::new(Cipher::Aes128Gcm, &key, [0xee; 12], 9).unwrap();
    let shown = format!("{secret:?}");
    assert_eq!(shown, "TrafficSecret { cipher: Aes128Gcm, seq: 9, .. }");
    let sealer = Sealer::new(Version::Tls13, secret).unwrap();
    let shown = format!(
        "{sealer:?} {:?}",
        opener(Version::Tls13, Cipher::Aes128Gcm, 0)
    );
    for leak in ["0, 17, 34", "238", "[0, 17"] {
        assert!(!shown.contains(leak), "{shown}");
    }
    assert!(TrafficSecret::new(Cipher::Aes256Gcm, &key, [0; 12], 0).is_err());
}

/// A valid record stream of `data`, and where each record starts.
fn sealed(v: Version, c: Cipher, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    sealer(v, c, 3).seal_data(data, &mut out).unwrap();
    out
}

fn suite() -> impl Strategy<Value = (Version, Cipher)> {
    (0..ALL.len()).prop_map(|i| ALL[i])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Arbitrary bytes never panic and never yield content.
    #[test]
    fn arbitrary_bytes_are_never_plaintext((v, c) in suite(), bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
        let mut buf = bytes;
        let got = opener(v, c, 0).open(&mut buf);
        prop_assert!(matches!(got, Err(_) | Ok(Opened::Incomplete { .. })), "{:?}", got);
    }

    /// A well-formed header over an arbitrary body: still never content.
    #[test]
    fn arbitrary_bodies_are_never_plaintext(
        (v, c) in suite(),
        typ in prop_oneof![Just(23u8), 20u8..=24],
        body in prop::collection::vec(any::<u8>(), 0..3000),
        seq in any::<u64>(),
    ) {
        let mut buf = vec![typ, 3, 3, (body.len() >> 8) as u8, body.len() as u8];
        buf.extend_from_slice(&body);
        let got = opener(v, c, seq).open(&mut buf);
        prop_assert!(got.is_err(), "{:?}", got);
    }

    /// What we seal opens to what we sealed, fed in any piece size.
    #[test]
    fn sealed_data_opens_to_itself(
        (v, c) in suite(),
        data in prop::collection::vec(any::<u8>(), 0..40_000),
        step in 1usize..5000,
    ) {
        let wire = sealed(v, c, &data);
        let (got, end) = open_all(&mut opener(v, c, 3), &wire, step);
        prop_assert_eq!(end, None);
        prop_assert_eq!(got, data);
    }

    /// A truncated record asks for exactly the missing bytes.
    #[test]
    fn a_truncated_record_is_incomplete(
        (v, c) in suite(),
        data in prop::collection::vec(any::<u8>(), 1..2000),
        cut in any::<prop::sample::Index>(),
    ) {
        let wire = sealed(v, c, &data);
        let keep = cut.index(wire.len());
        let mut buf = wire[..keep].to_vec();
        let got = opener(v, c, 3).open(&mut buf);
        let needed = if keep < HEADER_LEN { HEADER_LEN - keep } else { wire.len() - keep };
        prop_assert_eq!(got, Ok(Opened::Incomplete { needed }));
    }

    /// Any flipped bit: an error (or a longer length: wait for more), never
    /// content.
    #[test]
    fn a_flipped_bit_is_never_plaintext(
        (v, c) in suite(),
        data in prop::collection::vec(any::<u8>(), 0..2000),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut wire = sealed(v, c, &data);
        if wire.is_empty() {
            wire = record(v, c, 3, ContentType::ApplicationData, b"");
        }
        let i = at.index(wire.len());
        wire[i] ^= 1 << bit;
        let got = opener(v, c, 3).open(&mut wire);
        prop_assert!(matches!(got, Err(_) | Ok(Opened::Incomplete { .. })), "{:?}", got);
    }
}
