//! Timestamps of an upgrade's steps, for `scripts/bench/ready-trace.sh`.
//!
//! Off unless `BATON_TRACE_STEPS` names a file: then each step appends one
//! line `MONOTONIC_USEC PID STEP` to it (one `write` on an `O_APPEND` file,
//! so the old and the new generation, which inherits the variable, can share
//! it). When off, a step costs one relaxed load after the first call.

use std::fs::File;
use std::io::Write;
use std::sync::OnceLock;

/// The environment variable naming the trace file.
pub const ENV_TRACE_STEPS: &str = "BATON_TRACE_STEPS";

static SINK: OnceLock<Option<File>> = OnceLock::new();

fn sink() -> Option<&'static File> {
    SINK.get_or_init(|| {
        let path = std::env::var_os(ENV_TRACE_STEPS)?;
        // std opens with O_CLOEXEC: a spawned generation opens its own.
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .ok()
    })
    .as_ref()
}

/// Record that this process reached `step` (no-op unless
/// `BATON_TRACE_STEPS` is set).
pub fn step(step: &str) {
    if let Some(mut f) = sink() {
        let line = format!(
            "{} {} {step}\n",
            baton_sys::process::monotonic_usec(),
            std::process::id()
        );
        // Best effort: a trace must never change what the server does.
        let _ = f.write_all(line.as_bytes());
    }
}
