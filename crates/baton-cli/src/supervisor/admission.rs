//! Admission: the gates an upgrade passes before anything is spawned. A
//! refusal changes nothing: no process is started, the serving generation
//! is not touched, and `baton upgrade` exits "refused" (3) with the reason.
//!
//! * **Pre-flight**: the executable (the command's first word, looked up in
//!   `PATH` like `execvp` does) exists, is a regular file and is executable;
//!   with `baton upgrade --expect-sha256 HEX` its SHA-256 matches — hashed
//!   through an open fd that the exec shim then executes
//!   (`/proc/self/fd/N`), so the file cannot be swapped in between; and the
//!   `--check` command exits 0.
//! * **Memory headroom** (upgrades only: that is when two generations
//!   overlap): the core's [`baton::admission`] decides, with the serving
//!   generation's process tree (PSS) as the estimate of the new one.
//!
//! The gates themselves live in the core and are shared with library mode;
//! this module only applies them to a command line.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baton::admission::{Bytes, MemoryPolicy};

use super::child::{KeptExe, resolve_program};

/// The gates' settings (`baton run` flags).
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// `--check CMD`, as `sh -c CMD`.
    pub check: Option<Vec<String>>,
    /// `--check-timeout`.
    pub check_timeout: Duration,
    /// `--max-memory-percent`, `--memory-limit`, `--memory-estimate`,
    /// `--no-memory-check`.
    pub memory: MemoryPolicy,
    /// `--newcomer-oom-score-adj`: added to baton's own `oom_score_adj` for
    /// a new generation while its predecessor still runs (0 = off).
    pub newcomer_oom_score_adj: i32,
}

/// The executable a generation will run, checked.
#[derive(Debug)]
pub struct Program {
    /// Where it was found.
    pub path: PathBuf,
    /// With `--expect-sha256`: the open file that was hashed; the exec shim
    /// executes this very fd.
    pub pinned: Option<Arc<KeptExe>>,
}

fn refused(e: baton::Error) -> String {
    match e {
        baton::Error::Refused(m) => m,
        other => other.to_string(),
    }
}

/// Pre-flight of the executable: found (in `PATH` if `argv0` has no `/`),
/// a regular executable file, and, if `expect_sha256` is given, with that
/// SHA-256 (the returned [`Program::pinned`] is the hashed file).
///
/// # Errors
/// Why it cannot be run, in words.
pub fn preflight(argv0: &OsStr, expect_sha256: Option<&str>) -> Result<Program, String> {
    if argv0.is_empty() {
        return Err("the command is empty".into());
    }
    // A path is checked as given (the core says exactly what is wrong with
    // it); a bare name is what execvp would find in PATH.
    let path = if argv0.as_encoded_bytes().contains(&b'/') {
        let p = PathBuf::from(argv0);
        if std::fs::symlink_metadata(&p).is_err() {
            return Err(format!(
                "the executable {} cannot be used: it does not exist",
                p.display()
            ));
        }
        p
    } else {
        resolve_program(argv0)?
    };
    let exe = baton::admission::preflight(&path, expect_sha256).map_err(refused)?;
    let pinned = match exe.pinned {
        Some(f) => Some(Arc::new(KeptExe::from_file(&path, f).map_err(|e| {
            format!("cannot keep {} open for the exec: {e}", path.display())
        })?)),
        None => None,
    };
    Ok(Program { path, pinned })
}

/// Run the `--check` command, if any (bounded by `--check-timeout`).
///
/// # Errors
/// Its exit status and the end of its output.
pub async fn check(cfg: &AdmissionConfig) -> Result<(), String> {
    match &cfg.check {
        Some(cmd) => {
            // Its pid is not known here: keep the zombie reaper (PID 1,
            // --delegate) from collecting its exit status first.
            let _hold = super::reaper::hold();
            baton::admission::run_check(cmd, cfg.check_timeout)
                .await
                .map_err(refused)
        }
        None => Ok(()),
    }
}

/// Memory headroom for a new generation next to the one whose main process
/// is `serving_pid`. Returns the admitted numbers (for the log).
///
/// # Errors
/// The refusal, with the numbers.
pub fn memory(cfg: &AdmissionConfig, serving_pid: u32) -> Result<Option<String>, String> {
    if !cfg.memory.enabled {
        return Ok(None);
    }
    let estimate = cfg
        .memory
        .estimate
        .unwrap_or_else(|| baton::admission::process_tree_memory(serving_pid));
    let levels = baton::admission::memory_levels(Path::new("/"));
    baton::admission::check_memory(&levels, estimate, &cfg.memory)
        .map(|line| Some(format!("{line} (estimate: {})", Bytes(estimate))))
        .map_err(refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflight_names_the_problem() {
        let e = preflight(OsStr::new("no-such-command-here"), None).unwrap_err();
        assert!(e.contains("not found in PATH"), "{e}");
        let e = preflight(OsStr::new("/no/such/file"), None).unwrap_err();
        assert!(e.contains("cannot be used"), "{e}");
        let e = preflight(OsStr::new("/etc/passwd"), None).unwrap_err();
        assert!(
            e.contains("not executable") && e.contains("chmod +x"),
            "{e}"
        );
        let p = preflight(OsStr::new("sh"), None).unwrap();
        assert!(p.pinned.is_none());
        let e = preflight(OsStr::new("sh"), Some(&"0".repeat(64))).unwrap_err();
        assert!(e.contains("SHA-256") && e.contains("expected"), "{e}");
        let sha = baton::admission::sha256_path(&p.path).unwrap();
        let pinned = preflight(OsStr::new("sh"), Some(&sha)).unwrap();
        assert!(pinned.pinned.is_some_and(|k| k.elf));
    }

    #[test]
    fn memory_refuses_with_numbers() {
        let mut cfg = AdmissionConfig {
            check: None,
            check_timeout: Duration::from_secs(1),
            memory: MemoryPolicy::default(),
            newcomer_oom_score_adj: 100,
        };
        cfg.memory.limit = Some(1024);
        let e = memory(&cfg, std::process::id()).unwrap_err();
        assert!(
            e.contains("not enough memory") && e.contains("estimated"),
            "{e}"
        );
        cfg.memory.limit = Some(1 << 50);
        assert!(memory(&cfg, std::process::id()).unwrap().is_some());
        cfg.memory.enabled = false;
        assert!(memory(&cfg, std::process::id()).unwrap().is_none());
    }
}
