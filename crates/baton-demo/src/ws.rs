//! `GET /ws`: a WebSocket echo whose connections move across upgrades.
//!
//! Every text message is answered with `{"pid", "generation", "seq",
//! "echo"}`; `seq` counts the messages of the connection from 1 and goes on
//! across upgrades: it is the state that moves with the connection.

use baton::Baton;
use baton_http::ws::{Endpoint, WebSocket, WsEvent};

/// The kind the demo's WebSockets travel under between generations.
pub const WS_KIND: &str = "baton-demo.ws";

/// The `/ws` endpoint, under `kind` (the demo's is [`WS_KIND`]; a fixture
/// may pick another, which its predecessor's connections then do not
/// have).
///
/// # Errors
/// As [`Endpoint::new`].
pub fn endpoint(baton: &Baton, kind: &str) -> Result<Endpoint, baton::Error> {
    let generation = baton.generation();
    let pid = std::process::id();
    Endpoint::new(baton, kind, move |ws| echo(ws, generation, pid))
}

async fn echo(mut ws: WebSocket, generation: u64, pid: u32) {
    let mut seq = ws
        .moved_state()
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes);
    loop {
        match ws.recv().await {
            WsEvent::Text(echo) => {
                seq += 1;
                let body = serde_json::json!({
                    "pid": pid,
                    "generation": generation,
                    "seq": seq,
                    "echo": echo,
                });
                if ws.send_text(body.to_string()).await.is_err() {
                    return;
                }
            }
            WsEvent::Binary(b) => {
                if ws.send_binary(b).await.is_err() {
                    return;
                }
            }
            WsEvent::Move => match ws.hand_over(&seq.to_le_bytes()).await {
                Ok(()) => return,
                Err(back) => ws = *back,
            },
            WsEvent::Closed(_) => return,
        }
    }
}
