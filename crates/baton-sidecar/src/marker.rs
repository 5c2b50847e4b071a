//! The release marker: which release a pod should run. A file the sidecar
//! polls — a ConfigMap key mounted as a volume (GitOps changes the
//! ConfigMap), or a pod annotation through a downward-API volume (a walker
//! annotates pods a batch at a time). Both are updated in place by the
//! kubelet, without restarting the pod.
//!
//! The format is `key=value` tokens separated by spaces or newlines, so the
//! same text fits a multi-line ConfigMap value and a one-line annotation:
//!
//! ```text
//! # comments and blank lines are ignored
//! release=2.4.1
//! sha256=3e3720736938...   (64 hex digits)
//! source=file:///dist/myapp-2.4.1
//! ```
//!
//! All three keys are required, each once; any other key is an error (a
//! typo must not be ignored). `release` names the directory the binary is
//! delivered to (`releases/RELEASE/`), so it is a plain name. `source` is
//! an absolute path or a `file://` URL (no network fetch: the binary comes
//! from a volume the pod mounts). An empty marker means "no release yet".

use std::path::PathBuf;

/// The longest release name.
pub const MAX_RELEASE_LEN: usize = 128;

/// A release to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Its name (a directory name under `releases/`).
    pub name: String,
    /// SHA-256 of the executable, lowercase hex.
    pub sha256: String,
    /// Where the executable is read from.
    pub source: PathBuf,
}

/// Parse a marker. `Ok(None)` for an empty one.
///
/// # Errors
/// What is wrong with it, for the status file.
pub fn parse(text: &str) -> Result<Option<Release>, String> {
    let mut name = None;
    let mut sha256 = None;
    let mut source = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        for token in line.split_whitespace() {
            let (k, v) = token
                .split_once('=')
                .ok_or_else(|| format!("'{token}' is not key=value"))?;
            let slot = match k {
                "release" => &mut name,
                "sha256" => &mut sha256,
                "source" => &mut source,
                other => {
                    return Err(format!(
                        "unknown key '{other}' (the keys are release, sha256, source)"
                    ));
                }
            };
            if slot.replace(v.to_owned()).is_some() {
                return Err(format!("'{k}' is given twice"));
            }
        }
    }
    if name.is_none() && sha256.is_none() && source.is_none() {
        return Ok(None);
    }
    let need = |v: Option<String>, k: &str| v.ok_or_else(|| format!("'{k}=' is missing"));
    let name = need(name, "release")?;
    let sha256 = need(sha256, "sha256")?.to_ascii_lowercase();
    let source = need(source, "source")?;
    if name.is_empty()
        || name.len() > MAX_RELEASE_LEN
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
    {
        return Err(format!(
            "release '{name}' is not a plain name (letters, digits, . _ + -, starting with a letter or digit, at most {MAX_RELEASE_LEN})"
        ));
    }
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("sha256 '{sha256}' is not 64 hex digits"));
    }
    let path = source.strip_prefix("file://").unwrap_or(&source);
    if !path.starts_with('/') {
        return Err(format!(
            "source '{source}' is not an absolute path or a file:// URL (the sidecar reads releases from a mounted volume; it does not fetch over the network)"
        ));
    }
    Ok(Some(Release {
        name,
        sha256,
        source: PathBuf::from(path),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "3e372073693833638e3f05e33404d7c208d26134e90d97fd895adfc1906c0511";

    #[test]
    fn a_configmap_value_and_an_annotation_say_the_same() {
        let multi =
            format!("# release 2.4.1\nrelease=2.4.1\nsha256={SHA}\n\nsource=file:///dist/myapp\n");
        let one = format!(
            "release=2.4.1 sha256={} source=/dist/myapp",
            SHA.to_uppercase()
        );
        let want = Release {
            name: "2.4.1".into(),
            sha256: SHA.into(),
            source: "/dist/myapp".into(),
        };
        assert_eq!(parse(&multi), Ok(Some(want.clone())));
        assert_eq!(parse(&one), Ok(Some(want)));
    }

    #[test]
    fn empty_means_no_release() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("  \n# nothing yet\n"), Ok(None));
    }

    #[test]
    fn mistakes_are_errors_not_ignored() {
        let ok = |extra: &str| format!("release=1 sha256={SHA} source=/d/x {extra}");
        let err = |t: &str| parse(t).expect_err(t);
        assert!(err(&ok("sha265=x")).contains("unknown key 'sha265'"));
        assert!(err(&ok("release=2")).contains("given twice"));
        assert!(err(&ok("oops")).contains("not key=value"));
        assert!(err(&format!("release=1 sha256={SHA}")).contains("'source=' is missing"));
        assert!(err(&format!("release=../x sha256={SHA} source=/d")).contains("plain name"));
        assert!(err(&format!("release=.x sha256={SHA} source=/d")).contains("plain name"));
        assert!(err("release=1 sha256=abc source=/d").contains("64 hex digits"));
        assert!(
            err(&format!("release=1 sha256={SHA} source=https://x/y")).contains("absolute path")
        );
        assert!(err(&format!("release=1 sha256={SHA} source=rel/x")).contains("absolute path"));
    }
}
