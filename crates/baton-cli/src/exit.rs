//! Exit codes, one per category of outcome, so that scripts (systemd's
//! `ExecReload=`, Ansible, a fleet rollout) can tell "the new version is bad"
//! from "try again later" from "nothing is running there".

use std::process::ExitCode;

use baton::control::FailureKind;

/// Success.
pub const OK: u8 = 0;
/// The upgrade started, failed, and was rolled back: the old generation
/// still serves.
pub const FAILED: u8 = 1;
/// Bad arguments, or a request the server cannot apply.
pub const USAGE: u8 = 2;
/// Refused before anything started (pre-flight failed, not serving...):
/// nothing changed.
pub const REFUSED: u8 = 3;
/// Another upgrade is running: try again when it is done.
pub const IN_PROGRESS: u8 = 4;
/// No server at the control socket, or not allowed to use it.
pub const CANNOT_CONNECT: u8 = 5;
/// No final answer within `--timeout` (the upgrade may still finish).
pub const TIMEOUT: u8 = 6;
/// Something unexpected inside the server or in the protocol.
pub const INTERNAL: u8 = 7;

/// The exit codes, for `--help`.
pub const HELP: &str = "\
Exit codes:
  0  success
  1  failed: the upgrade started and was rolled back; the old generation still serves
  2  usage: bad arguments, or a request the server cannot apply
  3  refused: nothing was started (pre-flight failed, not serving, bad command...)
  4  in progress: another upgrade is running, or one already waits for a
     starting generation (or --no-wait during a start); try again when it is done
  5  cannot connect: no server at the control socket, or not allowed to use it
  6  timeout: no answer within --timeout (the upgrade may still finish; see `baton status`)
  7  internal: unexpected error in the server or in the control protocol";

/// The name of a category, as printed in `--json` output.
pub fn category(code: u8) -> &'static str {
    match code {
        OK => "ok",
        FAILED => "failed",
        USAGE => "usage",
        REFUSED => "refused",
        IN_PROGRESS => "in_progress",
        CANNOT_CONNECT => "cannot_connect",
        TIMEOUT => "timeout",
        _ => "internal",
    }
}

/// The exit code for a failure the server reported.
pub fn for_failure(kind: FailureKind) -> u8 {
    match kind {
        FailureKind::Failed => FAILED,
        FailureKind::Refused => REFUSED,
        FailureKind::InProgress => IN_PROGRESS,
        FailureKind::Invalid => USAGE,
        FailureKind::Internal => INTERNAL,
    }
}

/// An error with its exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// What happened.
    pub error: anyhow::Error,
}

impl CliError {
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        CliError {
            code,
            error: error.into(),
        }
    }

    pub fn usage(error: impl std::fmt::Display) -> Self {
        Self::new(USAGE, anyhow::anyhow!("{error}"))
    }

    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::new(INTERNAL, error)
    }

    /// Print the error on stderr and return the exit code.
    pub fn report(self) -> ExitCode {
        eprintln!("baton: {:#}", self.error);
        ExitCode::from(self.code)
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::internal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_kind_has_its_own_code() {
        let kinds = [
            FailureKind::Failed,
            FailureKind::Refused,
            FailureKind::InProgress,
            FailureKind::Invalid,
            FailureKind::Internal,
        ];
        let mut codes: Vec<u8> = kinds.iter().map(|k| for_failure(*k)).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len());
        assert!(!codes.contains(&OK));
        assert!(!codes.contains(&CANNOT_CONNECT));
        assert!(!codes.contains(&TIMEOUT));
        assert_eq!(category(IN_PROGRESS), "in_progress");
    }
}
