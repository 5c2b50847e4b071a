//! The pid file, rewritten atomically by whichever generation serves.

use std::path::Path;

/// Write a pid file atomically: a temporary file in the same directory,
/// then `rename`.
///
/// # Errors
/// The I/O error.
pub fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{pid}.tmp"));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
