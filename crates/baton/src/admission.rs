//! Admission: checks made before anything is spawned. A refusal changes
//! nothing.

use std::path::Path;

use crate::error::Error;

/// Pre-flight: the executable exists, is a regular file and is executable;
/// if `expect_sha256` is given, the file's SHA-256 matches.
///
/// # Errors
/// [`Error::Refused`] naming the reason.
pub fn preflight(program: &Path, expect_sha256: Option<&str>) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(program).map_err(|e| {
        Error::Refused(format!(
            "the executable {} cannot be used: {e}",
            program.display()
        ))
    })?;
    if !meta.is_file() {
        return Err(Error::Refused(format!(
            "{} is not a regular file",
            program.display()
        )));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(Error::Refused(format!(
            "{} is not executable (mode {:o}); chmod +x it",
            program.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    if let Some(want) = expect_sha256 {
        let _ = want;
        return Err(Error::Refused(
            "--expect-sha256 is not supported by this build".into(),
        ));
    }
    Ok(())
}
