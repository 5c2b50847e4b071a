//! Third-party servers and toolchains for the supervisor tests: the
//! `baton` binary itself, the Python venv (gunicorn, uvicorn), Node, and a
//! Go server built from `apps/go/main.go`.
//!
//! A missing tool is a test failure with a message saying how to get it,
//! never a silent skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The fixture apps' directory (`crates/baton-tests/apps`).
pub fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("apps")
}

/// The target profile directory the tests run from (`target/debug`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test binary directory");
    if dir.ends_with("deps") {
        dir.parent().expect("profile directory").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The `baton` binary, freshly built: `cargo nextest run -p baton-tests`
/// does not build other packages' binaries, so the first call in each test
/// process runs `cargo build -p baton-cli` (a no-op when it is up to date)
/// into this test's target directory and profile. `BATON_BIN` overrides.
pub fn baton_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built_bin("baton-cli", "baton", "BATON_BIN"))
        .clone()
}

/// Binary `bin` of workspace package `package`, built now with `cargo
/// build` into this test's target directory and profile (a no-op when it is
/// up to date), unless the environment variable `override_var` names one.
/// Callers keep the result in a `OnceLock`: one build per test process.
pub fn built_bin(package: &str, bin: &str, override_var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(override_var) {
        return PathBuf::from(p);
    }
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = crate::output(
        Command::new(cargo)
            .args(["build", "-q", "-p", package, "--bin", bin, "--profile"])
            .arg(&profile)
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace_root()),
    )
    .unwrap_or_else(|e| panic!("running cargo build -p {package}: {e}"));
    assert!(
        out.status.success(),
        "cargo build -p {package} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = profile_dir.join(bin);
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// Example `example` of workspace package `package`, built now with `cargo
/// build --example` into this test's target directory and profile (a no-op
/// when it is up to date). Callers keep the result in a `OnceLock`.
pub fn built_example(package: &str, example: &str) -> PathBuf {
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = crate::output(
        Command::new(cargo)
            .args([
                "build",
                "-q",
                "-p",
                package,
                "--example",
                example,
                "--profile",
            ])
            .arg(&profile)
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace_root()),
    )
    .unwrap_or_else(|e| panic!("running cargo build -p {package} --example {example}: {e}"));
    assert!(
        out.status.success(),
        "cargo build -p {package} --example {example} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = profile_dir.join("examples").join(example);
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// The previous release, for the wire-compatibility tests: the commit this
/// branch of the handoff protocol (revision 2) was built on, whose build
/// speaks revision 1 only.
pub const PREVIOUS_RELEASE: &str = "58b91e2a2299dd949ea857038502bbdb18d4e431";

/// The previous release's fixture server (`baton-fixture` at
/// [`PREVIOUS_RELEASE`]), built once from this repository's history (`git
/// archive`, then `cargo build`) into `target/previous-release/`, and kept
/// there: later runs reuse it. `scripts/test.sh` builds it beforehand
/// (`scripts/build-previous-release.sh`, the same place), so the test's
/// time budget is not spent compiling. `BATON_PREVIOUS_FIXTURE` names a
/// binary to use instead.
pub fn previous_release_fixture() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("BATON_PREVIOUS_FIXTURE") {
            return PathBuf::from(p);
        }
        let profile_dir = profile_dir();
        let root = profile_dir
            .parent()
            .expect("target directory")
            .join("previous-release")
            .join(PREVIOUS_RELEASE);
        let bin = root.join("target/debug/baton-fixture");
        if bin.exists() {
            return bin;
        }
        let src = root.join("src");
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).expect("creating the previous release's directory");
        let archive = root.join("src.tar");
        let out = crate::output(
            Command::new("git")
                .arg("-C")
                .arg(workspace_root())
                .args(["archive", "--format=tar", "-o"])
                .arg(&archive)
                .arg(PREVIOUS_RELEASE),
        )
        .expect("running git archive");
        assert!(
            out.status.success(),
            "git archive {PREVIOUS_RELEASE} failed (a clone with its history is needed):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = crate::output(
            Command::new("tar")
                .arg("-xf")
                .arg(&archive)
                .arg("-C")
                .arg(&src),
        )
        .expect("running tar");
        assert!(
            out.status.success(),
            "tar: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = crate::output(
            Command::new(cargo)
                .args([
                    "build",
                    "-q",
                    "--locked",
                    "-p",
                    "baton-tests",
                    "--bin",
                    "baton-fixture",
                ])
                .arg("--target-dir")
                .arg(root.join("target"))
                .current_dir(&src)
                .env_remove("CARGO_TARGET_DIR"),
        )
        .expect("running cargo build for the previous release");
        assert!(
            out.status.success(),
            "building the previous release's fixture failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
    .clone()
}

/// A tool in the repository's Python venv (`.venv/bin/NAME`); a missing
/// one fails the test with a message saying to run the set-up.
pub fn venv_tool(name: &str) -> PathBuf {
    let p = workspace_root().join(".venv/bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-test-deps.sh (it creates .venv with gunicorn, uvicorn and prometheus_client)",
        p.display()
    );
    p
}

/// A program from `PATH`.
pub fn in_path(name: &str, install_hint: &str) -> PathBuf {
    which(name).unwrap_or_else(|| panic!("{name} is not in PATH: {install_hint}"))
}

/// A program from `PATH`, if there is one.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Owned copies of string literals (command lines).
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `python pyapp.py ARGS...` from the venv (the supervisor tests' app).
pub fn pyapp(args: &[&str]) -> Vec<String> {
    let mut v = vec![
        venv_tool("python").display().to_string(),
        apps_dir().join("pyapp.py").display().to_string(),
    ];
    v.extend(strings(args));
    v
}

/// `node`.
pub fn node() -> PathBuf {
    in_path(
        "node",
        "install Node.js (the Node test runs apps/node_server.js)",
    )
}

/// The Go fixture server, built from `apps/go/main.go` with the standard
/// library only (no module downloads) and cached in the target directory.
pub fn go_server() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let go = in_path(
            "go",
            "run scripts/setup-test-deps.sh (apt-get install golang-go)",
        );
        let src = apps_dir().join("go/main.go");
        let dir = profile_dir().join("baton-test-apps");
        std::fs::create_dir_all(&dir).expect("creating the Go build directory");
        let bin = dir.join("goserver");
        let fresh = match (std::fs::metadata(&bin), std::fs::metadata(&src)) {
            (Ok(b), Ok(s)) => b.modified().ok() >= s.modified().ok(),
            _ => false,
        };
        if !fresh {
            let tmp = dir.join(format!("goserver.{}.tmp", std::process::id()));
            let out = crate::output(
                Command::new(go)
                    .arg("build")
                    .arg("-o")
                    .arg(&tmp)
                    .arg(&src)
                    .env("GO111MODULE", "off")
                    .env("GOPROXY", "off")
                    .env("GOFLAGS", "")
                    .env("CGO_ENABLED", "0"),
            )
            .expect("running go build");
            assert!(
                out.status.success(),
                "go build {} failed:\n{}",
                src.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            // go wrote the file, not this process: no fd of ours is open on
            // it, so a rename cannot make a concurrent exec fail (ETXTBSY).
            std::fs::rename(&tmp, &bin).expect("installing the Go server");
        }
        bin
    })
    .clone()
}

/// The command line of the suite's Node `http` server (`node_server.js`).
pub fn node_server_cmd() -> Vec<String> {
    vec![
        node().display().to_string(),
        apps_dir().join("node_server.js").display().to_string(),
    ]
}

/// The command line of gunicorn (2 sync workers) serving `wsgi_app:app`,
/// taking its socket from `LISTEN_FDS`.
pub fn gunicorn_cmd() -> Vec<String> {
    let mut v = vec![venv_tool("gunicorn").display().to_string()];
    v.extend(strings(&[
        "--workers",
        "2",
        "--worker-class",
        "sync",
        "--graceful-timeout",
        "10",
        "--log-level",
        "warning",
        "--chdir",
    ]));
    v.push(apps_dir().display().to_string());
    v.push("wsgi_app:app".into());
    v
}

/// The command line of uvicorn serving `asgi_app:app` on fd 3.
pub fn uvicorn_cmd() -> Vec<String> {
    let mut v = vec![venv_tool("uvicorn").display().to_string()];
    v.extend(strings(&["--fd", "3", "--app-dir"]));
    v.push(apps_dir().display().to_string());
    v.extend(strings(&[
        "--lifespan",
        "off",
        "--log-level",
        "warning",
        "asgi_app:app",
    ]));
    v
}

/// The command line of the suite's Go `net/http` server.
pub fn go_server_cmd() -> Vec<String> {
    vec![go_server().display().to_string()]
}
