//! Delivery into the shared volume, and the `current` symlink.
//!
//! Layout of the app directory (an `emptyDir` both containers mount):
//!
//! ```text
//! APP/releases/RELEASE/BINARY     one directory per release, read-only after delivery
//! APP/current -> releases/RELEASE the server runs APP/current/BINARY
//! ```
//!
//! The symlink target is relative, so it resolves the same in every
//! container whatever the mount path. A delivery copies the source to a
//! temporary file next to its final name, checks its SHA-256, and only then
//! renames it into place: a release directory never holds a binary with
//! the wrong content, and a half-copied one is never visible. `current` is
//! replaced by renaming a new symlink over it (atomic).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::marker::Release;

/// Why a delivery did not happen.
#[derive(Debug)]
pub enum DeliverError {
    /// The copy's SHA-256 is not the marker's: nothing was delivered.
    Mismatch {
        /// What the copy hashed to.
        got: String,
    },
    /// Reading the source or writing the copy failed (may be transient:
    /// a volume not mounted yet).
    Io(String),
}

/// `APP/releases/RELEASE/BINARY`.
pub fn release_path(app: &Path, release: &str, binary: &str) -> PathBuf {
    app.join("releases").join(release).join(binary)
}

/// Put `rel`'s executable at `APP/releases/RELEASE/BINARY`, verified. A
/// file already there with the right SHA-256 is kept as it is.
///
/// # Errors
/// [`DeliverError::Mismatch`] if the copy's SHA-256 differs from the
/// marker's (the copy is removed), [`DeliverError::Io`] otherwise.
pub fn deliver(rel: &Release, app: &Path, binary: &str) -> Result<PathBuf, DeliverError> {
    let dest = release_path(app, &rel.name, binary);
    if dest.is_file() && sha256(&dest).is_ok_and(|h| h == rel.sha256) {
        return Ok(dest);
    }
    let io_err = |what: &str, p: &Path, e: io::Error| {
        DeliverError::Io(format!("{what} {}: {e}", p.display()))
    };
    let dir = dest.parent().unwrap_or(app);
    fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
    let partial = dir.join(format!(".{binary}.partial"));
    let copied = (|| {
        let mut from =
            fs::File::open(&rel.source).map_err(|e| io_err("cannot open", &rel.source, e))?;
        let mut to =
            fs::File::create(&partial).map_err(|e| io_err("cannot create", &partial, e))?;
        io::copy(&mut from, &mut to).map_err(|e| io_err("cannot copy to", &partial, e))?;
        to.sync_all()
            .map_err(|e| io_err("cannot sync", &partial, e))?;
        fs::set_permissions(&partial, fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err("cannot chmod", &partial, e))?;
        let got = sha256(&partial).map_err(|e| io_err("cannot read", &partial, e))?;
        if got != rel.sha256 {
            return Err(DeliverError::Mismatch { got });
        }
        fs::rename(&partial, &dest).map_err(|e| io_err("cannot rename to", &dest, e))
    })();
    if let Err(e) = copied {
        let _ = fs::remove_file(&partial);
        // A directory this delivery created and left empty goes too.
        let _ = fs::remove_dir(dir);
        return Err(e);
    }
    Ok(dest)
}

fn sha256(p: &Path) -> io::Result<String> {
    baton::admission::sha256_path(p)
}

/// Where `APP/current` points (`releases/RELEASE`), if it exists.
pub fn current(app: &Path) -> Option<String> {
    fs::read_link(app.join("current"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The release `APP/current` points at, if it is `releases/NAME`.
pub fn current_release(app: &Path) -> Option<String> {
    current(app)?.strip_prefix("releases/").map(str::to_owned)
}

/// Point `APP/current` at `target` (a path relative to APP), atomically.
///
/// # Errors
/// The I/O error.
pub fn point_current(app: &Path, target: &str) -> io::Result<()> {
    let tmp = app.join(".current.tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, app.join("current"))
}

/// Point `APP/current` at `releases/RELEASE`.
///
/// # Errors
/// The I/O error.
pub fn flip_current(app: &Path, release: &str) -> io::Result<()> {
    point_current(app, &format!("releases/{release}"))
}

/// Remove every release directory but `keep` (the serving release and the
/// one before it: a rollback target). Errors are ignored: a leftover
/// directory only costs space.
pub fn collect_garbage(app: &Path, keep: &[&str]) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(dir) = fs::read_dir(app.join("releases")) else {
        return removed;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if keep.contains(&name.as_str()) {
            continue;
        }
        if fs::remove_dir_all(e.path()).is_ok() {
            removed.push(name);
        }
    }
    removed.sort();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("baton-sidecar-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_copy_with_the_wrong_sha256_is_never_delivered() {
        let d = tmp("deliver");
        let src = d.join("src");
        fs::write(&src, b"#!/bin/true\n").unwrap();
        let good = baton::admission::sha256_path(&src).unwrap();
        let app = d.join("app");
        let mut rel = Release {
            name: "1".into(),
            sha256: "0".repeat(64),
            source: src.clone(),
        };
        match deliver(&rel, &app, "app") {
            Err(DeliverError::Mismatch { got }) => assert_eq!(got, good),
            other => panic!("{other:?}"),
        }
        assert!(!app.join("releases/1").exists(), "nothing left behind");

        rel.sha256 = good;
        let p = deliver(&rel, &app, "app").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"#!/bin/true\n");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );

        flip_current(&app, "1").unwrap();
        assert_eq!(current(&app).as_deref(), Some("releases/1"));
        assert_eq!(current_release(&app).as_deref(), Some("1"));
        fs::create_dir_all(app.join("releases/0")).unwrap();
        fs::create_dir_all(app.join("releases/old")).unwrap();
        assert_eq!(collect_garbage(&app, &["1", "0"]), ["old"]);
        let _ = fs::remove_dir_all(&d);
    }
}
