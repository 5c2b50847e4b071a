//! Tests of the wire messages: round trips, bounds, the bytes revision 1
//! must keep, and a decoder that never panics.

use super::*;
use proptest::prelude::*;

fn hello() -> Msg {
    Msg::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        app_version: "1.2.3".into(),
        generation: 7,
        pid: 42,
    })
}

#[test]
fn roundtrip_every_message() {
    let msgs = vec![
        (hello(), 0),
        (
            Msg::Listeners(vec![
                ListenerMeta {
                    name: "http".into(),
                    kind: ListenerKind::Tcp,
                },
                ListenerMeta {
                    name: "admin".into(),
                    kind: ListenerKind::Unix,
                },
            ]),
            2,
        ),
        (Msg::WantState, 0),
        (
            Msg::State(vec![
                BlobMeta {
                    name: "app".into(),
                    data: BlobData::Inline(vec![1, 2, 3]),
                },
                BlobMeta {
                    name: "big".into(),
                    data: BlobData::Memfd { len: 1 << 30 },
                },
            ]),
            1,
        ),
        (
            Msg::Ready(ReadyInfo {
                accepts_conns: true,
            }),
            0,
        ),
        (
            Msg::Failed {
                reason: "config broken".into(),
            },
            0,
        ),
        (Msg::Promote, 0),
        (Msg::Serving, 0),
        (Msg::PromoteProvisional { canary: true }, 0),
        (Msg::Commit, 0),
        (
            Msg::Demote {
                reason: "health check failed".into(),
            },
            0,
        ),
        (Msg::StatsRequest, 0),
        (
            Msg::Done(DoneReport {
                ready_ms: 1,
                drain_ms: 2,
                total_ms: 3,
                closed: 0,
            }),
            0,
        ),
        (
            Msg::Stats {
                requests: 10,
                errors: 2,
            },
            0,
        ),
        (
            Msg::Conns {
                batch: 3,
                conns: vec![ConnMeta {
                    listener: "http".into(),
                    prefix: b"GET / HT".to_vec(),
                }],
            },
            1,
        ),
        (Msg::ConnsAck { batch: 3 }, 0),
        (
            Msg::ConnsNack {
                batch: 4,
                reason: "EMFILE".into(),
            },
            0,
        ),
    ];
    for (m, n) in msgs {
        let f = encode(&m).unwrap();
        assert_eq!(decode(&f, n).unwrap(), m);
    }
}

#[test]
fn fd_count_must_match() {
    let m = Msg::Listeners(vec![ListenerMeta {
        name: "http".into(),
        kind: ListenerKind::Tcp,
    }]);
    let f = encode(&m).unwrap();
    assert!(matches!(decode(&f, 0), Err(FrameError::Invalid(_))));
    assert!(matches!(decode(&f, 2), Err(FrameError::Invalid(_))));
    assert!(decode(&f, 1).is_ok());
    // A message that carries no fds must not come with any.
    assert!(matches!(
        decode(&encode(&Msg::Promote).unwrap(), 1),
        Err(FrameError::Invalid(_))
    ));
}

#[test]
fn bad_magic_version_and_trailing_bytes() {
    let mut f = encode(&Msg::Promote).unwrap();
    f[0] = b'X';
    assert_eq!(decode(&f, 0), Err(FrameError::BadMagic));
    let mut f = encode(&Msg::Promote).unwrap();
    f[3] = 99;
    assert!(matches!(
        decode(&f, 0),
        Err(FrameError::Version { peer: 99, .. })
    ));
    let mut f = encode(&Msg::Promote).unwrap();
    f.push(0);
    assert!(matches!(decode(&f, 0), Err(FrameError::Invalid(_))));
    assert_eq!(decode(b"BT", 0), Err(FrameError::BadMagic));
}

#[test]
fn bounds_are_enforced() {
    let long = "x".repeat(MAX_NAME + 1);
    let m = Msg::Listeners(vec![ListenerMeta {
        name: long,
        kind: ListenerKind::Tcp,
    }]);
    assert!(matches!(
        decode(&encode(&m).unwrap(), 1),
        Err(FrameError::Invalid(_))
    ));
    let dup = Msg::Listeners(vec![
        ListenerMeta {
            name: "a".into(),
            kind: ListenerKind::Tcp,
        },
        ListenerMeta {
            name: "a".into(),
            kind: ListenerKind::Tcp,
        },
    ]);
    assert!(matches!(
        decode(&encode(&dup).unwrap(), 2),
        Err(FrameError::Invalid(_))
    ));
    let empty = Msg::Conns {
        batch: 1,
        conns: vec![],
    };
    assert!(matches!(
        decode(&encode(&empty).unwrap(), 0),
        Err(FrameError::Invalid(_))
    ));
    let big_prefix = Msg::Conns {
        batch: 1,
        conns: vec![ConnMeta {
            listener: "http".into(),
            prefix: vec![0; MAX_CONN_PREFIX + 1],
        }],
    };
    assert!(matches!(
        decode(&encode(&big_prefix).unwrap(), 1),
        Err(FrameError::Invalid(_))
    ));
}

/// Revision 2 appended its variants: every revision-1 message keeps the
/// bytes the first release sends and expects (postcard numbers variants
/// by position), so the two releases still understand each other.
#[test]
fn revision_one_messages_keep_their_bytes() {
    let frames: Vec<(Msg, Vec<u8>)> = vec![
        (Msg::WantState, vec![2]),
        (
            Msg::Ready(ReadyInfo {
                accepts_conns: true,
            }),
            vec![4, 1],
        ),
        (Msg::Promote, vec![6]),
        (Msg::PromoteProvisional { canary: false }, vec![7, 0]),
        (Msg::Commit, vec![8]),
        (Msg::Serving, vec![13]),
        (
            Msg::Conns {
                batch: 3,
                conns: vec![ConnMeta {
                    listener: "h".into(),
                    prefix: b"G".to_vec(),
                }],
            },
            vec![14, 3, 1, 1, b'h', 1, b'G'],
        ),
        (Msg::ConnsAck { batch: 3 }, vec![15, 3]),
        (
            Msg::ConnsNack {
                batch: 4,
                reason: "x".into(),
            },
            vec![16, 4, 1, b'x'],
        ),
    ];
    for (m, body) in frames {
        let mut want = b"BTN".to_vec();
        want.push(1);
        want.extend(body);
        assert_eq!(encode(&m).unwrap(), want, "{}", m.name());
    }
}

#[test]
fn owned_batches_and_accepts_roundtrip_and_are_bounded() {
    let a = Msg::Accepts(Accepts {
        owned_kinds: vec!["websocket".into(), "line".into()],
    });
    assert_eq!(decode(&encode(&a).unwrap(), 0).unwrap(), a);
    let g = Msg::GiveBack(GiveBack {
        reason: "health".into(),
        accepts_conns: true,
        accepts: Accepts {
            owned_kinds: vec!["websocket".into()],
        },
    });
    assert_eq!(decode(&encode(&g).unwrap(), 0).unwrap(), g);
    let meta = |unread: usize, state: usize| OwnedMeta {
        kind: "websocket".into(),
        listener: "http".into(),
        unread: vec![1; unread],
        state: vec![2; state],
    };
    let ok = Msg::Owned {
        batch: 5,
        conns: vec![meta(3, MAX_OWNED_STATE), meta(MAX_CONN_PREFIX, 0)],
    };
    assert_eq!(decode(&encode(&ok).unwrap(), 2).unwrap(), ok);
    assert!(matches!(
        decode(&encode(&ok).unwrap(), 1),
        Err(FrameError::Invalid(_))
    ));
    for bad in [
        Msg::Owned {
            batch: 1,
            conns: vec![meta(0, MAX_OWNED_STATE + 1)],
        },
        Msg::Owned {
            batch: 1,
            conns: vec![meta(MAX_CONN_PREFIX + 1, 0)],
        },
        Msg::Owned {
            batch: 1,
            conns: vec![OwnedMeta {
                kind: "k".repeat(MAX_KIND + 1),
                ..meta(0, 0)
            }],
        },
    ] {
        assert!(matches!(
            decode(&encode(&bad).unwrap(), 1),
            Err(FrameError::Invalid(_))
        ));
    }
    let many = Msg::Accepts(Accepts {
        owned_kinds: (0..=MAX_OWNED_KINDS).map(|i| format!("k{i}")).collect(),
    });
    assert!(matches!(
        decode(&encode(&many).unwrap(), 0),
        Err(FrameError::Invalid(_))
    ));
}

#[test]
fn a_full_batch_of_maximal_prefixes_is_refused_at_encode() {
    let conns = (0..SCM_MAX_FD)
        .map(|_| ConnMeta {
            listener: "http".into(),
            prefix: vec![b'a'; MAX_CONN_PREFIX],
        })
        .collect();
    assert!(matches!(
        encode(&Msg::Conns { batch: 1, conns }),
        Err(FrameError::TooLarge(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// The decoder never panics, whatever the bytes and fd count.
    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), nfds in 0usize..300) {
        let _ = decode(&bytes, nfds);
    }

    /// Valid headers followed by garbage never panic either (exercises the
    /// postcard path rather than the magic check).
    #[test]
    fn decoder_never_panics_past_header(body in proptest::collection::vec(any::<u8>(), 0..512), nfds in 0usize..300) {
        let mut f = b"BTN".to_vec();
        f.push(PROTOCOL_VERSION);
        f.extend(body);
        let _ = decode(&f, nfds);
    }

    /// Mutating one byte of a valid frame is either rejected or decodes
    /// to a message this side could have sent: it encodes again, and
    /// that frame decodes to the same message. (`decode` validates;
    /// checking `validate` again here could not fail.)
    #[test]
    fn single_byte_mutations(idx in 0usize..64, val in any::<u8>()) {
        let m = Msg::Conns { batch: 9, conns: vec![ConnMeta { listener: "http".into(), prefix: b"GET /x HTTP/1.1\r\n".to_vec() }] };
        let mut f = encode(&m).unwrap();
        let i = idx % f.len();
        f[i] = val;
        if let Ok(d) = decode(&f, 1) {
            let again = encode(&d);
            prop_assert!(again.is_ok(), "{:?} decoded but does not encode: {:?}", d, again);
            let again = again.unwrap_or_default();
            prop_assert_eq!(decode(&again, 1), Ok(d));
        }
    }
}
