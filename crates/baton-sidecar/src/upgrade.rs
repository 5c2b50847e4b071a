//! One upgrade over the server's control socket: the request `baton
//! upgrade --expect-sha256 HEX` sends, with the same categories of answer.

use std::path::Path;
use std::time::Duration;

use baton::control::{Client, FailureKind, Reply, Request};

/// How an upgrade ended.
#[derive(Debug)]
pub enum Outcome {
    /// The new generation serves.
    Upgraded(baton::UpgradeReport),
    /// The server answered with a failure of this kind.
    Failed(FailureKind, String),
    /// No server to ask (socket missing, nobody listening, another uid),
    /// or the conversation broke.
    Unreachable(String),
    /// No final answer in time; the upgrade may still finish.
    TimedOut(Duration),
}

/// Ask the server at `control` to upgrade, pinning the executable's
/// content to `sha256`. Progress lines go to stderr.
pub fn upgrade(control: &Path, sha256: &str, timeout: Duration) -> Outcome {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Outcome::Unreachable(format!("cannot start a runtime: {e}")),
    };
    let mut opts = baton::UpgradeOptions::default();
    opts.expect_sha256 = Some(sha256.to_owned());
    rt.block_on(async {
        let client = match Client::connect(control).await {
            Ok(c) => c,
            Err(e) => return Outcome::Unreachable(e.to_string()),
        };
        let req = Request::Upgrade(opts);
        let call = client.call(&req, |e| {
            eprintln!("baton-sidecar: upgrade: {e:?}");
        });
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Outcome::TimedOut(timeout),
            Ok(Err(e)) => Outcome::Unreachable(e.to_string()),
            Ok(Ok(Reply::Upgraded(r))) => Outcome::Upgraded(r),
            Ok(Ok(Reply::Failed(f))) => Outcome::Failed(f.kind, f.message),
            Ok(Ok(other)) => Outcome::Failed(
                FailureKind::Internal,
                format!("unexpected answer to an upgrade: {other:?}"),
            ),
        }
    })
}
