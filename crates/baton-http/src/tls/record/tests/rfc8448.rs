//! Known answers from RFC 8448 section 3 ("Simple 1-RTT Handshake"): the
//! application traffic keys and IVs, and the protected application data and
//! close_notify records of both sides, decrypted to the RFC's plaintext and
//! sealed back to the RFC's bytes. AES-128-GCM only (the only suite there).
//!
//! The server's application data record has sequence number 1: its
//! NewSessionTicket took 0. The client's records are its first two.

use rustls::AlertDescription;

use super::{Content, Opened, Opener, RecordError, Sealer, TrafficSecret, Version, hex};
use crate::tls::record::Cipher;

// {client}  derive write traffic keys for application data
const CLIENT_KEY: &str = "17 42 2d da 59 6e d5 d9 ac d8 90 e3 c6 3f 50 51";
const CLIENT_IV: &str = "5b 78 92 3d ee 08 57 90 33 e5 23 d9";
// {server}  derive write traffic keys for application data
const SERVER_KEY: &str = "9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56";
const SERVER_IV: &str = "cf 78 2b 88 dd 83 54 9a ad f1 e9 84";

// {client}  send application_data record: complete record (72 octets)
const CLIENT_DATA: &str = "
    17 03 03 00 43 a2 3f 70 54 b6 2c 94
    d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa 66 bc ab 3f 2b
    98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62
    92 a2 97 70 14 bd 1e 3d ea e6 3a ee bb 21 69 49 15 e4";
// {server}  send application_data record: complete record (72 octets)
const SERVER_DATA: &str = "
    17 03 03 00 43 2e 93 7e 11 ef 4a c7
    40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f 82 aa 1b 36 e3
    0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5
    f0 a2 1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d";
// {client}  send alert record: complete record (24 octets)
const CLIENT_ALERT: &str = "
    17 03 03 00 13 c9 87 27 60 65 56 66
    b7 4d 7f f1 15 3e fd 6d b6 d0 b0 e3";
// {server}  send alert record: complete record (24 octets)
const SERVER_ALERT: &str = "
    17 03 03 00 13 b5 8f d6 71 66 eb f5
    99 d2 47 20 cf be 7e fa 7a 88 64 a9";

/// The payload of both application data records: 00 01 02 ... 31 (hex).
fn payload() -> Vec<u8> {
    (0..50).collect()
}

fn secret(key: &str, iv: &str, seq: u64) -> TrafficSecret {
    let iv: [u8; 12] = hex(iv).try_into().unwrap();
    TrafficSecret::new(Cipher::Aes128Gcm, &hex(key), iv, seq).unwrap()
}

/// Open `data` then `alert` at sequence numbers `seq`, `seq + 1`.
fn open_both(key: &str, iv: &str, seq: u64, data: &str, alert: &str) {
    let mut opener = Opener::new(Version::Tls13, secret(key, iv, seq)).unwrap();
    let mut wire = hex(data);
    assert_eq!(
        opener.open(&mut wire),
        Ok(Opened::Record {
            len: 72,
            content: Content::Data(&payload())
        })
    );
    let mut wire = hex(alert);
    assert_eq!(
        opener.open(&mut wire),
        Ok(Opened::Record {
            len: 24,
            content: Content::CloseNotify
        })
    );
}

/// Seal the payload then close_notify from sequence number `seq`.
fn seal_both(key: &str, iv: &str, seq: u64, data: &str, alert: &str) {
    let mut sealer = Sealer::new(Version::Tls13, secret(key, iv, seq)).unwrap();
    let mut out = Vec::new();
    sealer.seal_data(&payload(), &mut out).unwrap();
    assert_eq!(out, hex(data));
    out.clear();
    sealer
        .seal_alert(AlertDescription::CloseNotify, &mut out)
        .unwrap();
    assert_eq!(out, hex(alert));
    assert_eq!(sealer.seq(), seq + 2);
}

#[test]
fn rfc8448_client_records_open_to_the_rfc_plaintext() {
    open_both(CLIENT_KEY, CLIENT_IV, 0, CLIENT_DATA, CLIENT_ALERT);
}

#[test]
fn rfc8448_server_records_open_to_the_rfc_plaintext() {
    open_both(SERVER_KEY, SERVER_IV, 1, SERVER_DATA, SERVER_ALERT);
}

#[test]
fn rfc8448_client_records_seal_to_the_rfc_bytes() {
    seal_both(CLIENT_KEY, CLIENT_IV, 0, CLIENT_DATA, CLIENT_ALERT);
}

#[test]
fn rfc8448_server_records_seal_to_the_rfc_bytes() {
    seal_both(SERVER_KEY, SERVER_IV, 1, SERVER_DATA, SERVER_ALERT);
}

#[test]
fn rfc8448_records_under_another_sequence_number_or_key_are_bad_record_mac() {
    for seq in [0, 2, 1 << 40] {
        let mut opener = Opener::new(Version::Tls13, secret(SERVER_KEY, SERVER_IV, seq)).unwrap();
        let mut wire = hex(SERVER_DATA);
        assert_eq!(opener.open(&mut wire), Err(RecordError::BadRecordMac));
        // Terminal: nothing opens after a failure, not even the right record.
        let mut wire = hex(SERVER_DATA);
        assert_eq!(opener.open(&mut wire), Err(RecordError::Closed));
    }
    // The client's key on the server's record, at the right number.
    let mut opener = Opener::new(Version::Tls13, secret(CLIENT_KEY, SERVER_IV, 1)).unwrap();
    let mut wire = hex(SERVER_DATA);
    assert_eq!(opener.open(&mut wire), Err(RecordError::BadRecordMac));
    assert_eq!(
        RecordError::BadRecordMac.alert(),
        Some(AlertDescription::BadRecordMac)
    );
}

#[test]
fn rfc8448_every_flipped_bit_is_refused() {
    let good = hex(SERVER_DATA);
    for bit in 0..good.len() * 8 {
        let mut opener = Opener::new(Version::Tls13, secret(SERVER_KEY, SERVER_IV, 1)).unwrap();
        let mut wire = good.clone();
        wire[bit / 8] ^= 1 << (bit % 8);
        let got = opener.open(&mut wire);
        assert!(
            matches!(got, Err(_) | Ok(Opened::Incomplete { .. })),
            "bit {bit}: {got:?}"
        );
    }
}
