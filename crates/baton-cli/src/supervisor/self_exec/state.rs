//! The state `baton upgrade --self` carries from one image of baton to the
//! next, in a sealed memfd: versioned, bounded, fds named by number (they
//! are inherited at those numbers).
//!
//! ```text
//! "BATONSLF" | format: u32 LE | postcard(SelfState) [| postcard(Vec<Extension>)]
//! ```
//!
//! A reader that does not know the format (another baton release changed
//! it) or finds it corrupt must not guess: it returns to the previous image
//! (see `recv.rs`).
//!
//! What was added after format 1 travels as tagged [`Extension`]s after the
//! `SelfState`, so that releases on either side of the addition still read
//! each other's state (the case of `--self` to a newer baton, and back): a
//! format-1 reader stops after the `SelfState` (postcard ignores what
//! follows), a reader skips the tags it does not know — unless one is
//! *critical* (the state would be misread without it): then the state is
//! unreadable and the previous image takes over again.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use baton::control::{Counters, LastUpgrade};
use serde::{Deserialize, Serialize};

/// The environment variable naming the memfd: `FD:LEN`.
pub const ENV_STATE: &str = "BATON_SELF_STATE";
/// The environment variable naming an fd of the previous image's
/// executable, to go back to when the state cannot be read.
pub const ENV_RETURN: &str = "BATON_SELF_RETURN";
/// Set by a new image that went back to the previous one: why.
pub const ENV_RETURNED: &str = "BATON_SELF_RETURNED";
/// The leading bytes of the memfd.
pub const MAGIC: [u8; 8] = *b"BATONSLF";
/// This build's state format. Change it whenever [`SelfState`] changes.
pub const FORMAT: u32 = 1;
/// Largest state accepted (idle connections' already-read bytes included).
pub const MAX_STATE: u64 = 256 * 1024 * 1024;

/// Everything the next image needs to take over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfState {
    /// `CARGO_PKG_VERSION` of the image that wrote it.
    pub baton_version: String,
    /// Images that took over so far (0 for the first start).
    pub execs: u64,
    /// `baton upgrade --self` requests that reached the exec.
    pub attempts: u64,
    /// How the last one ended, for status.
    pub last: Option<String>,
    /// When the first image started (Unix ms).
    pub first_started_unix_ms: u64,
    /// baton's executable path, as the first image resolved it (the path
    /// the next `--self` executes).
    pub exe_path: Vec<u8>,
    /// The control socket (listening).
    pub control: RawFd,
    /// `--metrics`'s listening socket.
    pub metrics: Option<RawFd>,
    /// The listeners the generations get (the private ones with `--front`).
    pub listeners: Vec<CarriedListener>,
    /// The slot the steering program sends new connections to.
    pub serving_slot: u64,
    /// The next generation's number.
    pub next_generation: u64,
    /// The serving generation: still our child.
    pub serving: CarriedGen,
    /// The last generation that worked (for rollback restarts).
    pub last_good: Option<CarriedGood>,
    /// Status counters.
    pub counters: Counters,
    /// The last upgrade, for status.
    pub last_upgrade: Option<LastUpgrade>,
    /// Recent events, for status.
    pub recent: Vec<String>,
    /// systemd was told READY=1.
    pub announced_ready: bool,
    /// `--front`.
    pub front: Option<CarriedFront>,
    /// What travels as [`Extension`]s (not in the format-1 body).
    #[serde(skip)]
    pub ext: Extensions,
}

/// One tagged addition to the format-1 state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    /// What it is.
    pub tag: String,
    /// A reader that does not know `tag` must not use the state.
    pub critical: bool,
    /// postcard of the tag's type.
    pub bytes: Vec<u8>,
}

/// The extensions this build knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// `notify`: the serving generation's `NOTIFY_SOCKET`.
    pub serving_notify: Option<CarriedNotify>,
    /// `upstream` (critical: a baton that cannot follow a Unix upstream
    /// must not take over one): `--front-upstream unix`. Absent: TCP.
    pub upstream: Option<CarriedUpstream>,
}

/// The tag of [`Extensions::serving_notify`].
const TAG_NOTIFY: &str = "notify";
/// The tag of [`Extensions::upstream`].
const TAG_UPSTREAM: &str = "upstream";

/// `--front-upstream unix`: where each generation's socket lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedUpstream {
    /// The private directory.
    pub dir: Vec<u8>,
    /// Per private listener (in order), each slot's socket path while it
    /// exists (the live generations').
    pub paths: Vec<[Option<Vec<u8>>; 2]>,
}

impl Extensions {
    fn to_list(&self) -> Result<Vec<Extension>, String> {
        let mut out = Vec::new();
        push(&mut out, TAG_NOTIFY, false, self.serving_notify.as_ref())?;
        push(&mut out, TAG_UPSTREAM, true, self.upstream.as_ref())?;
        Ok(out)
    }

    fn from_list(list: Vec<Extension>) -> Result<Extensions, Unreadable> {
        let mut ext = Extensions::default();
        for e in list {
            match e.tag.as_str() {
                TAG_NOTIFY => ext.serving_notify = Some(read(&e)?),
                TAG_UPSTREAM => ext.upstream = Some(read(&e)?),
                _ if e.critical => return Err(Unreadable::Extension(e.tag)),
                _ => {
                    tracing::info!(tag = %e.tag, "baton upgrade --self: the previous image carried something this baton does not know; skipped")
                }
            }
        }
        Ok(ext)
    }
}

/// Add `value`, if any, to `out` as the extension `tag`.
fn push<T: Serialize>(
    out: &mut Vec<Extension>,
    tag: &str,
    critical: bool,
    value: Option<&T>,
) -> Result<(), String> {
    if let Some(v) = value {
        out.push(Extension {
            tag: tag.into(),
            critical,
            bytes: postcard::to_allocvec(v).map_err(|e| format!("encoding {tag}: {e}"))?,
        });
    }
    Ok(())
}

/// The value of the extension `e`.
fn read<T: serde::de::DeserializeOwned>(e: &Extension) -> Result<T, Unreadable> {
    postcard::from_bytes(&e.bytes)
        .map_err(|err| Unreadable::Corrupt(format!("extension {}: {err}", e.tag)))
}

/// A generation's `NOTIFY_SOCKET` (its app was ready).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedNotify {
    /// The bound datagram socket.
    pub fd: RawFd,
    /// The value of `NOTIFY_SOCKET` the app has.
    pub env_value: Vec<u8>,
    /// The socket's path (removed when the generation is), if not abstract.
    pub path: Option<Vec<u8>>,
    /// The app's last `STATUS=` line.
    pub status: Option<String>,
}

/// One listener of the generations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedListener {
    /// Its name.
    pub name: String,
    /// systemd passed it.
    pub systemd: bool,
    /// Why it is one shared socket, if it is.
    pub shared_reason: Option<String>,
    /// One shared socket or the two of a steering group.
    pub fds: Vec<RawFd>,
}

/// The serving generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedGen {
    /// Generation number.
    pub generation: u64,
    /// Its pid.
    pub pid: u32,
    /// Its command line.
    pub argv: Vec<Vec<u8>>,
    /// How long it has been running.
    pub uptime_ms: u64,
    /// Its `BATON_PROBE_PORT`.
    pub probe_port: Option<u16>,
    /// The executable it was started from, kept open.
    pub exe: Option<CarriedExe>,
}

/// An executable kept open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedExe {
    /// The open file.
    pub fd: RawFd,
    /// The path it was opened at.
    pub path: Vec<u8>,
}

/// The last good generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedGood {
    /// Its command line.
    pub argv: Vec<Vec<u8>>,
    /// Its generation number.
    pub generation: u64,
    /// Its executable.
    pub exe: Option<CarriedExe>,
}

/// `--front`: its listeners, its idle client connections, its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedFront {
    /// The upstream epoch.
    pub epoch: u64,
    /// The public listening sockets, in listener order.
    pub public: Vec<RawFd>,
    /// Idle HTTP/1.1 client connections.
    pub conns: Vec<CarriedConn>,
    /// requests, upstream_errors, retries, bad_gateway, connections.
    pub counters: [u64; 5],
    /// Connections that could not be carried (closed at the exec).
    pub closed: u64,
}

/// One idle client connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedConn {
    /// The connected socket.
    pub fd: RawFd,
    /// Its public listener (index).
    pub listener: u32,
    /// The client's address.
    pub peer: SocketAddr,
    /// Bytes of its next request already read (replayed first).
    pub prefix: Vec<u8>,
}

/// Why a state cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreadable {
    /// Not a baton state at all.
    Magic,
    /// Another format (another release of baton wrote it).
    Format(u32),
    /// The right format, but it does not decode.
    Corrupt(String),
    /// A critical extension this baton does not know.
    Extension(String),
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreadable::Magic => write!(f, "not a baton state (bad magic)"),
            Unreadable::Format(v) => write!(
                f,
                "state format {v}, this baton ({}) reads format {FORMAT}",
                env!("CARGO_PKG_VERSION")
            ),
            Unreadable::Corrupt(e) => write!(f, "corrupt state: {e}"),
            Unreadable::Extension(t) => write!(
                f,
                "the state has a part `{t}` that this baton ({}) does not know and cannot do without",
                env!("CARGO_PKG_VERSION")
            ),
        }
    }
}

/// Encode with the envelope.
///
/// # Errors
/// postcard cannot encode it (it always can; still not unwrapped).
pub fn encode(s: &SelfState) -> Result<Vec<u8>, String> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&FORMAT.to_le_bytes());
    let out = postcard::to_extend(s, out).map_err(|e| format!("encoding the state: {e}"))?;
    let ext = s.ext.to_list()?;
    if ext.is_empty() {
        return Ok(out);
    }
    postcard::to_extend(&ext, out).map_err(|e| format!("encoding the state: {e}"))
}

/// Decode, checking the envelope first.
///
/// # Errors
/// [`Unreadable`].
pub fn decode(bytes: &[u8]) -> Result<SelfState, Unreadable> {
    let Some(rest) = bytes.strip_prefix(&MAGIC) else {
        return Err(Unreadable::Magic);
    };
    let (v, body) = rest.split_at_checked(4).ok_or(Unreadable::Magic)?;
    let mut b = [0u8; 4];
    b.copy_from_slice(v);
    let format = u32::from_le_bytes(b);
    if format != FORMAT {
        return Err(Unreadable::Format(format));
    }
    let (mut state, rest): (SelfState, _) =
        postcard::take_from_bytes(body).map_err(|e| Unreadable::Corrupt(e.to_string()))?;
    if !rest.is_empty() {
        let list: Vec<Extension> = postcard::from_bytes(rest)
            .map_err(|e| Unreadable::Corrupt(format!("extensions: {e}")))?;
        state.ext = Extensions::from_list(list)?;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SelfState {
        SelfState {
            baton_version: "1.2.3".into(),
            execs: 2,
            attempts: 3,
            last: Some("ok".into()),
            first_started_unix_ms: 5,
            exe_path: b"/usr/bin/baton".to_vec(),
            control: 7,
            metrics: None,
            listeners: vec![CarriedListener {
                name: "http".into(),
                systemd: false,
                shared_reason: None,
                fds: vec![8, 9],
            }],
            serving_slot: 1,
            next_generation: 4,
            serving: CarriedGen {
                generation: 3,
                pid: 42,
                argv: vec![b"app".to_vec()],
                uptime_ms: 10,
                probe_port: None,
                exe: Some(CarriedExe {
                    fd: 10,
                    path: b"/bin/app".to_vec(),
                }),
            },
            last_good: None,
            counters: Counters::default(),
            last_upgrade: None,
            recent: vec![],
            announced_ready: true,
            front: Some(CarriedFront {
                epoch: 2,
                public: vec![11],
                conns: vec![CarriedConn {
                    fd: 12,
                    listener: 0,
                    peer: "127.0.0.1:5000".parse().unwrap(),
                    prefix: b"GET / HT".to_vec(),
                }],
                counters: [1, 2, 3, 4, 5],
                closed: 0,
            }),
            ext: Extensions {
                serving_notify: Some(CarriedNotify {
                    fd: 13,
                    env_value: b"/run/baton/app.notify.3".to_vec(),
                    path: Some(b"/run/baton/app.notify.3".to_vec()),
                    status: Some("serving".into()),
                }),
                upstream: Some(CarriedUpstream {
                    dir: b"/run/baton/web.upstream".to_vec(),
                    paths: vec![[Some(b"/run/baton/web.upstream/http.3.sock".to_vec()), None]],
                }),
            },
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(decode(&encode(&s).unwrap()).unwrap(), s);
    }

    /// A state written by a baton from before `--front-upstream` (no
    /// upstream extension) loads as a TCP upstream; one with a Unix
    /// upstream is refused by a baton that does not know the extension
    /// (critical), not read as TCP.
    #[test]
    fn a_state_without_the_upstream_loads_as_tcp_and_a_unix_one_needs_a_baton_that_knows_it() {
        let mut s = sample();
        s.ext.upstream = None;
        let mut old = MAGIC.to_vec();
        old.extend_from_slice(&FORMAT.to_le_bytes());
        let old = postcard::to_extend(&s, old).unwrap();
        let read = decode(&old).unwrap();
        assert_eq!(read.ext.upstream, None);
        let unix = encode(&sample()).unwrap();
        let (_, rest): (SelfState, _) = postcard::take_from_bytes(&unix[12..]).unwrap();
        let list: Vec<Extension> = postcard::from_bytes(rest).unwrap();
        let up = list.iter().find(|e| e.tag == TAG_UPSTREAM).unwrap();
        assert!(up.critical);
    }

    #[test]
    fn another_format_or_garbage_is_refused_not_guessed() {
        let mut b = encode(&sample()).unwrap();
        b[8] = 99;
        assert_eq!(decode(&b), Err(Unreadable::Format(99)));
        assert_eq!(decode(b"nope"), Err(Unreadable::Magic));
        let mut c = encode(&sample()).unwrap();
        c.truncate(20);
        assert!(matches!(decode(&c), Err(Unreadable::Corrupt(_))));
    }

    /// A state written before the extensions (or by a build that has none
    /// to write) reads as it did; a reader of that time (postcard of the
    /// `SelfState` alone, what format 1's decode did) reads a state with
    /// extensions, without them.
    #[test]
    fn extensions_are_read_by_neither_side_of_their_addition_wrongly() {
        let mut old = sample();
        old.ext = Extensions::default();
        let bytes = encode(&old).unwrap();
        assert_eq!(decode(&bytes).unwrap(), old);
        let new = encode(&sample()).unwrap();
        assert!(new.len() > bytes.len(), "the extension is written");
        let as_old: SelfState = postcard::from_bytes(&new[12..]).unwrap();
        assert_eq!(as_old, old);
    }

    fn with_extra(critical: bool) -> Vec<u8> {
        let mut s = sample();
        s.ext = Extensions::default();
        let mut b = encode(&s).unwrap();
        let list = vec![Extension {
            tag: "from-a-later-baton".into(),
            critical,
            bytes: vec![1, 2, 3],
        }];
        b.extend(postcard::to_allocvec(&list).unwrap());
        b
    }

    #[test]
    fn an_unknown_extension_is_skipped_unless_critical() {
        let mut s = sample();
        s.ext = Extensions::default();
        assert_eq!(decode(&with_extra(false)).unwrap(), s);
        assert_eq!(
            decode(&with_extra(true)),
            Err(Unreadable::Extension("from-a-later-baton".into()))
        );
        // A list of 5 extensions that ends there.
        let mut bad = encode(&s).unwrap();
        bad.push(5);
        assert!(matches!(decode(&bad), Err(Unreadable::Corrupt(_))));
    }
}
