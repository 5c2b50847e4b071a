#!/usr/bin/env bash
# Build the previous release's fixture server for tests/wire_compat.rs, so
# that the test itself does not spend its time budget compiling: the commit
# is baton_tests::apps::PREVIOUS_RELEASE, its source comes from this
# repository's history (git archive), its build goes to
# ${CARGO_TARGET_DIR:-target}/previous-release/COMMIT/ (where the test looks
# first) and is kept: a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$(sed -n 's/^pub const PREVIOUS_RELEASE: &str = "\([0-9a-f]\{40\}\)";$/\1/p' crates/baton-tests/src/apps.rs)
[[ -n $rev ]] || { echo "build-previous-release: no PREVIOUS_RELEASE in crates/baton-tests/src/apps.rs" >&2; exit 1; }
target=${CARGO_TARGET_DIR:-$PWD/target}
root=$target/previous-release/$rev
[[ -x $root/target/debug/baton-fixture ]] && exit 0
git cat-file -e "$rev^{commit}" 2>/dev/null || {
  echo "build-previous-release: commit $rev is not in this clone (a shallow clone?); tests/wire_compat.rs needs it" >&2
  exit 1
}
echo "build-previous-release: building baton-fixture at ${rev:0:7} into $root" >&2
rm -rf "$root/src"
mkdir -p "$root/src"
git archive --format=tar "$rev" | tar -x -C "$root/src"
(cd "$root/src" && env -u CARGO_TARGET_DIR cargo build -q --locked -p baton-tests --bin baton-fixture \
  --target-dir "$root/target")
