//! Differential tests against rustls, every suite, both directions: an
//! in-memory rustls client and server shake hands and exchange some
//! traffic; the server's secrets are extracted, and our layer continues the
//! server's side: it opens what the rustls client sends and the rustls
//! client reads what it seals. The sequence numbers carry on from the
//! traffic before the extraction.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring::cipher_suite as cs};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, ClientConfig, ClientConnection, ConnectionCommon, DigitallySignedStruct,
    ServerConfig, ServerConnection, SignatureScheme, SupportedCipherSuite,
};

use super::{Content, Opened, open_all};
use crate::tls::record::{
    CannotFollow, Opener, Sealer, TrafficSecret, Version, continue_session, whole_records,
};

/// A 2048-bit RSA key made with `openssl genpkey` for these tests only: ring
/// cannot generate RSA keys, and the ECDHE_RSA suites need one.
const RSA_KEY: &str = include_str!("rsa-2048.key.pem");

#[derive(Debug, Clone, Copy)]
enum KeyKind {
    Ecdsa,
    Rsa,
}

/// A self-signed certificate for `localhost` and its key.
fn certified(kind: KeyKind) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = match kind {
        KeyKind::Ecdsa => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        KeyKind::Rsa => rcgen::KeyPair::from_pem(RSA_KEY).unwrap(),
    };
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    (vec![cert.der().clone()], key)
}

/// Checks the handshake signatures, trusts any certificate (a self-signed
/// one made a moment ago).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Move everything `from` has to send into `to`: bytes moved, and the
/// plaintext `to` got.
fn transfer<A, B>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
) -> (usize, Vec<u8>) {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    (wire.len(), feed(to, &wire))
}

/// Give `wire` to a rustls connection: the plaintext it got. (Read as it
/// comes: rustls refuses more records while 16 KiB of plaintext wait.)
fn feed<B>(to: &mut ConnectionCommon<B>, mut wire: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    while !wire.is_empty() {
        to.read_tls(&mut wire).unwrap();
        to.process_new_packets().unwrap();
        plain.extend_from_slice(&read_plain(to));
    }
    plain
}

/// All the plaintext a rustls connection has received.
fn read_plain<B>(conn: &mut ConnectionCommon<B>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Everything the rustls client sends for `data`.
fn client_records(client: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
    client.writer().write_all(data).unwrap();
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    wire
}

/// Before extraction: a handshake, then `exchanges` request/response pairs
/// through rustls on both sides.
fn handshake(
    suite: SupportedCipherSuite,
    kind: KeyKind,
    exchanges: usize,
) -> (ClientConnection, ServerConnection) {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);
    let version = [suite.version()];
    let (chain, key) = certified(kind);
    let mut server_cfg = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&version)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    server_cfg.enable_secret_extraction = true;
    let client_cfg = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&version)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let mut server = ServerConnection::new(Arc::new(server_cfg)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut client = ClientConnection::new(Arc::new(client_cfg), name).unwrap();

    while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
        let moved = transfer(&mut client, &mut server).0 + transfer(&mut server, &mut client).0;
        assert!(moved > 0, "the handshake stalled");
    }
    assert_eq!(server.negotiated_cipher_suite(), Some(suite));
    for i in 0..exchanges {
        let request = format!("GET /{i} HTTP/1.1\r\nhost: localhost\r\n\r\n");
        client.writer().write_all(request.as_bytes()).unwrap();
        assert_eq!(transfer(&mut client, &mut server).1, request.as_bytes());
        let response = format!("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{i}");
        server.writer().write_all(response.as_bytes()).unwrap();
        assert_eq!(transfer(&mut server, &mut client).1, response.as_bytes());
    }
    (client, server)
}

/// [`handshake`], then the server's record layer from its extracted secrets.
fn handshake_then_extract(
    suite: SupportedCipherSuite,
    kind: KeyKind,
    exchanges: usize,
) -> (ClientConnection, Opener, Sealer) {
    let (client, server) = handshake(suite, kind, exchanges);
    let (opener, sealer) = extract(server);
    (client, opener, sealer)
}

/// The server's record layer, after checking what must hold before
/// extracting: nothing left to send, nothing received and not yet read.
fn extract(mut server: ServerConnection) -> (Opener, Sealer) {
    assert!(!server.wants_write());
    assert_eq!(
        server
            .process_new_packets()
            .unwrap()
            .plaintext_bytes_to_read(),
        0
    );
    let version = server.protocol_version().unwrap();
    let secrets = server.dangerous_extract_secrets().unwrap();
    continue_session(version, secrets).unwrap()
}

/// The next upgrade: the secrets leave the layer (sequence numbers
/// included) and a new layer is built from their parts.
fn hand_over(version: Version, opener: Opener, sealer: Sealer) -> (Opener, Sealer) {
    let again =
        |s: TrafficSecret| TrafficSecret::new(s.cipher(), s.key(), *s.iv(), s.seq()).unwrap();
    (
        Opener::new(version, again(opener.into_secret())).unwrap(),
        Sealer::new(version, again(sealer.into_secret())).unwrap(),
    )
}

/// The whole differential test for one suite and key type.
fn continue_after_rustls(suite: SupportedCipherSuite, kind: KeyKind) {
    let tls13 = suite.version() == &rustls::version::TLS13;
    let exchanges = 3;
    let (mut client, mut opener, mut sealer) = handshake_then_extract(suite, kind, exchanges);
    // The sequence numbers rustls left: TLS 1.2 protects each Finished with
    // the traffic key (one more record each way); a TLS 1.3 server sent its
    // two NewSessionTickets in one record under its key.
    assert_eq!(opener.seq(), exchanges as u64 + u64::from(!tls13));
    assert_eq!(sealer.seq(), exchanges as u64 + 1);

    let big: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let version = if tls13 {
        Version::Tls13
    } else {
        Version::Tls12
    };
    for round in 0..2 {
        if round == 1 {
            (opener, sealer) = hand_over(version, opener, sealer);
        }
        // rustls client → our opener, fed in uneven pieces.
        for (msg, step) in [(&b"GET /after HTTP/1.1\r\n\r\n"[..], 7), (&big[..], 1500)] {
            let wire = client_records(&mut client, msg);
            let (got, end) = open_all(&mut opener, &wire, step);
            assert_eq!(end, None, "round {round}");
            assert_eq!(got, msg, "round {round}: what the client sent");
        }
        // Our sealer → rustls client.
        for msg in [&b"HTTP/1.1 200 OK\r\n\r\n"[..], &big[..]] {
            let mut wire = Vec::new();
            sealer.seal_data(msg, &mut wire).unwrap();
            assert_eq!(
                feed(&mut client, &wire),
                msg,
                "round {round}: what we sealed"
            );
        }
    }

    // What we cannot follow: a TLS 1.3 KeyUpdate from the client. (A TLS
    // 1.2 rustls client cannot renegotiate; decoder.rs seals a ClientHello.)
    if tls13 {
        client.refresh_traffic_keys().unwrap();
        let wire = client_records(&mut client, b"");
        let mut buf = wire.clone();
        assert_eq!(
            opener.open(&mut buf),
            Ok(Opened::Record {
                len: wire.len(),
                content: Content::CannotFollow(CannotFollow::KeyUpdate)
            })
        );
    } else {
        client.send_close_notify();
        let wire = client_records(&mut client, b"");
        let mut buf = wire.clone();
        assert_eq!(
            opener.open(&mut buf),
            Ok(Opened::Record {
                len: wire.len(),
                content: Content::CloseNotify
            })
        );
    }

    // Our close_notify ends the client's stream cleanly.
    let mut wire = Vec::new();
    sealer
        .seal_alert(AlertDescription::CloseNotify, &mut wire)
        .unwrap();
    client.read_tls(&mut &wire[..]).unwrap();
    let state = client.process_new_packets().unwrap();
    assert!(state.peer_has_closed());
}

macro_rules! differential {
    ($($name:ident: $suite:expr, $kind:expr;)*) => {$(
        #[test]
        fn $name() {
            continue_after_rustls($suite, $kind);
        }
    )*};
}

differential! {
    against_rustls_tls13_aes_128_gcm: cs::TLS13_AES_128_GCM_SHA256, KeyKind::Ecdsa;
    against_rustls_tls13_aes_256_gcm: cs::TLS13_AES_256_GCM_SHA384, KeyKind::Rsa;
    against_rustls_tls13_chacha20_poly1305: cs::TLS13_CHACHA20_POLY1305_SHA256, KeyKind::Ecdsa;
    against_rustls_tls12_ecdhe_ecdsa_aes_128_gcm:
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, KeyKind::Ecdsa;
    against_rustls_tls12_ecdhe_ecdsa_aes_256_gcm:
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, KeyKind::Ecdsa;
    against_rustls_tls12_ecdhe_ecdsa_chacha20_poly1305:
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, KeyKind::Ecdsa;
    against_rustls_tls12_ecdhe_rsa_aes_128_gcm:
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, KeyKind::Rsa;
    against_rustls_tls12_ecdhe_rsa_aes_256_gcm:
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, KeyKind::Rsa;
    against_rustls_tls12_ecdhe_rsa_chacha20_poly1305:
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256, KeyKind::Rsa;
}

// What the connection integration must hold before extracting, pinned
// against rustls itself: a rustls upgrade that changes it fails here.

#[test]
fn extracting_with_records_still_to_send_fails_and_the_connection_is_gone() {
    let (_client, mut server) = handshake(cs::TLS13_AES_128_GCM_SHA256, KeyKind::Ecdsa, 0);
    server.writer().write_all(b"not yet sent").unwrap();
    assert!(server.wants_write());
    // Consumed by value: on this error there is no connection left to
    // flush or to close politely.
    assert!(server.dangerous_extract_secrets().is_err());
}

#[test]
fn extracting_with_unread_plaintext_succeeds_and_loses_it() {
    for suite in [
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ] {
        let (mut client, mut server) = handshake(suite, KeyKind::Ecdsa, 0);
        let wire = client_records(&mut client, b"unread");
        server.read_tls(&mut &wire[..]).unwrap();
        let state = server.process_new_packets().unwrap();
        assert_eq!(state.plaintext_bytes_to_read(), 6);
        let version = server.protocol_version().unwrap();
        // rustls does not refuse: the record is counted, its plaintext
        // dropped. Only the caller's check prevents the loss.
        let secrets = server.dangerous_extract_secrets().unwrap();
        let (mut opener, _) = continue_session(version, secrets).unwrap();
        // The record is behind the extracted sequence number: replayed to
        // our layer it fails; the 6 bytes exist nowhere any more.
        let mut again = wire.clone();
        assert_eq!(
            opener.open(&mut again),
            Err(super::RecordError::BadRecordMac)
        );
    }
}

#[test]
fn feeding_rustls_whole_records_only_leaves_the_rest_to_the_opener() {
    for suite in [
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ] {
        let kind = if suite.version() == &rustls::version::TLS13 {
            KeyKind::Ecdsa
        } else {
            KeyKind::Rsa
        };
        let (mut client, mut server) = handshake(suite, kind, 1);
        let first = client_records(&mut client, b"first");
        let second = client_records(&mut client, b"second, split by the network");
        let wire = [&first[..], &second[..]].concat();
        // What a read returned: the first record and part of the second.
        let read = &wire[..first.len() + 7];
        let whole = whole_records(read);
        assert_eq!(whole, first.len());
        assert_eq!(feed(&mut server, &read[..whole]), b"first");
        let (mut opener, _) = extract(server);
        // The partial record (and what arrives after) goes to our layer.
        let (data, end) = open_all(&mut opener, &wire[whole..], 5);
        assert_eq!(end, None);
        assert_eq!(data, b"second, split by the network");
    }
    assert_eq!(whole_records(&[]), 0);
    assert_eq!(whole_records(&[23, 3, 3, 0]), 0);
    assert_eq!(whole_records(&[23, 3, 3, 0, 0, 23, 3, 3, 0, 1]), 5);
}
