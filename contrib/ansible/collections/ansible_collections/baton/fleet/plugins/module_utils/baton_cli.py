# -*- coding: utf-8 -*-
# Copyright: the baton authors. MIT OR Apache-2.0.
"""Run the `baton` command on the managed host and read its `--json` output.

Shared by the baton_upgrade and baton_status modules. Standard library and
ansible-core only. The exit codes are baton's (`baton upgrade --help`); each
one is a category a rollout acts on differently, so the modules never tell
outcomes apart by message text.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import subprocess

# baton's exit codes (crates/baton-cli/src/exit.rs), by name.
OK = 0
FAILED = 1
USAGE = 2
REFUSED = 3
IN_PROGRESS = 4
CANNOT_CONNECT = 5
TIMEOUT = 6
INTERNAL = 7

CATEGORY = {
    OK: "ok",
    FAILED: "failed",
    USAGE: "usage",
    REFUSED: "refused",
    IN_PROGRESS: "in_progress",
    CANNOT_CONNECT: "cannot_connect",
    TIMEOUT: "timeout",
    INTERNAL: "internal",
}

# What a rollout should make of each failure, for the module's message.
ADVICE = {
    FAILED: "the new generation was started and rolled back; the host still serves the old version",
    USAGE: "bad arguments, or a request the server cannot apply: fix the play",
    REFUSED: "nothing was started; the host is untouched",
    IN_PROGRESS: "another upgrade is in progress",
    CANNOT_CONNECT: "no server at the control socket, or not allowed to use it",
    TIMEOUT: "no answer in time; the upgrade may still finish: check baton_status",
    INTERNAL: "internal error in the server, the client or the control protocol: read the server log",
}

# Extra seconds the module gives the baton command beyond its own --timeout
# before killing it (the command answers on its own at --timeout).
KILL_GRACE_SECONDS = 30

# Common options of both modules.
COMMON_ARGS = dict(
    control=dict(type="path"),
    name=dict(type="str"),
    baton=dict(type="path", default="baton"),
)


def baton_command(module, subcommand):
    """`baton SUBCOMMAND --json --control PATH|--name NAME`."""
    baton = module.params["baton"]
    if os.sep not in baton:
        baton = module.get_bin_path(baton, required=True)
    argv = [baton, subcommand, "--json"]
    if module.params["control"]:
        argv += ["--control", module.params["control"]]
    if module.params["name"]:
        argv += ["--name", module.params["name"]]
    return argv


class Outcome(object):
    """One run of the baton command: exit code, JSON object, stderr."""

    def __init__(self, argv, rc, report, stdout, stderr):
        self.argv = argv
        self.rc = rc
        self.report = report
        self.stdout = stdout
        self.stderr = stderr

    @property
    def category(self):
        return CATEGORY.get(self.rc, "internal")

    @property
    def message(self):
        """baton's message: `message` in the JSON, else its last stderr line."""
        if isinstance(self.report, dict) and self.report.get("message"):
            return self.report["message"]
        lines = [l for l in self.stderr.splitlines() if l.strip()]
        if lines:
            last = lines[-1]
            return last[len("baton: "):] if last.startswith("baton: ") else last
        return "baton exited with code %s and said nothing" % self.rc


def run(module, argv, timeout_seconds):
    """Run argv; kill it after `timeout_seconds` (exit code TIMEOUT then)."""
    try:
        p = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=timeout_seconds,
        )
    except subprocess.TimeoutExpired:
        return Outcome(argv, TIMEOUT, None, "", "baton did not answer within %ss and was killed" % timeout_seconds)
    except OSError as e:
        module.fail_json(msg="cannot run %s: %s" % (argv[0], e), cmd=argv)
    stdout = p.stdout.decode("utf-8", "replace")
    stderr = p.stderr.decode("utf-8", "replace")
    report = None
    if stdout.strip():
        try:
            report = json.loads(stdout)
        except ValueError:
            report = None
    rc = p.returncode if p.returncode >= 0 else INTERNAL
    return Outcome(argv, rc, report, stdout, stderr)


def status(module, timeout_seconds=10):
    """`baton status --json`: the Outcome (report is the status object)."""
    argv = baton_command(module, "status") + ["--timeout", "%ss" % timeout_seconds]
    return run(module, argv, timeout_seconds + KILL_GRACE_SECONDS)


def running_sha256(pid):
    """SHA-256 of the executable process `pid` runs (through /proc/PID/exe,
    which still reads the old file after a deploy replaced it), or None if
    it cannot be read (another user's process, another pid namespace)."""
    try:
        h = hashlib.sha256()
        with open("/proc/%d/exe" % int(pid), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except (OSError, ValueError, TypeError):
        return None


def summary(st):
    """The part of a status object a diff shows."""
    if not isinstance(st, dict):
        return {}
    return dict(
        version=st.get("app_version"),
        pid=st.get("pid"),
        generation=st.get("generation"),
    )


def diff_text(s):
    return "".join("%s: %s\n" % (k, s.get(k)) for k in ("version", "pid", "generation"))
