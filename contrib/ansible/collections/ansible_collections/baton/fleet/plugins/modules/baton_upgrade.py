#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: the baton authors. MIT OR Apache-2.0.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: baton_upgrade
short_description: Upgrade a running server in place with baton, with no dropped connection
description:
  - Runs C(baton upgrade --json) on the host against a control socket. The
    server starts the executable now on disk as its next generation, hands it
    its listening sockets (and, in library mode, its idle connections and
    state), promotes it once it is ready and drains the old one. If the new
    generation fails, the old one keeps serving (rollback).
  - "Maps baton's exit codes to results: upgraded (0) is C(changed);
    failed and rolled back (1), refused before anything started (3), usage (2),
    cannot connect (5), timeout (6) and internal (7) fail the task with
    baton's reason; another upgrade in progress (4) is retried
    O(retries) times, O(delay) seconds apart, then fails."
  - Reads C(baton status --json) before and after, for the diff (version, pid,
    generation, old -> new) and for check mode, which only reads the status
    and says what would happen.
  - With O(expect_sha256), an upgrade is refused (exit 3) unless the new
    executable has that SHA-256; and if the serving process already runs an
    executable with that SHA-256 (read through C(/proc/PID/exe)), nothing is
    done and the task is C(ok), not C(changed), unless O(force).
version_added: "0.1.0"
options:
  control:
    description: Path of the control socket (C(baton upgrade --control)).
    type: path
  name:
    description: Service name (C(baton upgrade --name)); the socket is found as baton finds it.
    type: str
  baton:
    description: The C(baton) executable (a name looked up in C(PATH), or a path).
    type: path
    default: baton
  expect_sha256:
    description:
      - Refuse unless the new executable's SHA-256 is this (64 hex digits). baton
        hashes the file through an open descriptor and executes that very
        descriptor, so the file cannot be swapped in between.
    type: str
  timeout:
    description:
      - Seconds to wait for the upgrade's result (C(baton upgrade --timeout)).
        Past it the task fails with C(result=timeout); the upgrade may still
        finish, so check with M(baton.fleet.baton_status).
    type: int
    default: 300
  retries:
    description: How many more times to try while another upgrade is in progress (exit code 4).
    type: int
    default: 10
  delay:
    description: Seconds between those tries.
    type: float
    default: 3
  force:
    description: Upgrade even if the serving process already runs O(expect_sha256).
    type: bool
    default: false
  command:
    description: A new command line for the next generation (C(baton run) only; C(baton upgrade -- CMD...)).
    type: list
    elements: str
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
notes:
  - Runs as the user the task runs as; the control socket only answers its owner (or root).
  - Deliver the new executable first (baton runs whatever is at the path the
    server was started from; a C(current) symlink flip works), then upgrade.
author:
  - the baton authors
"""

EXAMPLES = r"""
- name: Upgrade in place (no dropped connection)
  baton.fleet.baton_upgrade:
    control: /run/myapp/ctl.sock
    expect_sha256: "{{ lookup('file', 'dist/myapp-2.4.1.sha256') }}"
    timeout: 120
  register: up

- ansible.builtin.debug:
    msg: "{{ up.before.version }} (pid {{ up.before.pid }}) -> {{ up.after.version }} (pid {{ up.after.pid }})"
"""

RETURN = r"""
report:
  description: The object C(baton upgrade --json) printed (on success the upgrade report, on failure the message). Also set as the fact C(baton_upgrade).
  returned: when an upgrade was attempted
  type: dict
  sample:
    ok: true
    result: upgraded
    exit_code: 0
    from_generation: 2
    to_generation: 3
    old_pid: 4242
    new_pid: 4305
    ready_ms: 480
    drain_ms: 310
    total_ms: 812
    handed_over: 12
result:
  description: C(upgraded), C(unchanged) (already running O(expect_sha256)), C(would_upgrade) (check mode), or the failure's category (C(failed), C(refused), C(in_progress), C(cannot_connect), C(timeout), C(usage), C(internal)).
  returned: always
  type: str
exit_code:
  description: baton's exit code of the last attempt.
  returned: when an upgrade was attempted
  type: int
attempts:
  description: How many times C(baton upgrade) ran (more than one when another upgrade was in progress).
  returned: when an upgrade was attempted
  type: int
before:
  description: The serving generation before (C(version), C(pid), C(generation)).
  returned: when baton status answered
  type: dict
after:
  description: The serving generation after (on failure, the one still serving).
  returned: when an upgrade was attempted and baton status answered
  type: dict
running_sha256:
  description: SHA-256 of the executable the serving process ran before (when O(expect_sha256) is given and it could be read).
  returned: when O(expect_sha256) is given
  type: str
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.baton.fleet.plugins.module_utils import baton_cli


def main():
    args = dict(baton_cli.COMMON_ARGS)
    args.update(
        expect_sha256=dict(type="str"),
        timeout=dict(type="int", default=300),
        retries=dict(type="int", default=10),
        delay=dict(type="float", default=3),
        force=dict(type="bool", default=False),
        command=dict(type="list", elements="str"),
    )
    module = AnsibleModule(
        argument_spec=args,
        mutually_exclusive=[("control", "name")],
        required_one_of=[("control", "name")],
        supports_check_mode=True,
    )
    p = module.params
    if p["timeout"] < 1 or p["retries"] < 0 or p["delay"] < 0:
        module.fail_json(msg="timeout must be >= 1, retries and delay >= 0")
    want = (p["expect_sha256"] or "").strip().lower() or None

    st = baton_cli.status(module)
    if st.rc != baton_cli.OK or not isinstance(st.report, dict):
        module.fail_json(
            msg="baton status: %s (%s)" % (st.message, baton_cli.ADVICE.get(st.rc, "unexpected exit code")),
            result=st.category,
            exit_code=st.rc,
            cmd=st.argv,
        )
    before = baton_cli.summary(st.report)
    result = dict(before=before)

    if want:
        running = baton_cli.running_sha256(before.get("pid"))
        result["running_sha256"] = running
        if running == want and not p["force"]:
            module.exit_json(
                changed=False,
                result="unchanged",
                msg="pid %s already runs the executable with SHA-256 %s" % (before.get("pid"), want),
                **result
            )

    if module.check_mode:
        after = dict(version="(the new executable's)", pid="(new)", generation=(before.get("generation") or 0) + 1)
        note = " (an upgrade is in progress now)" if st.report.get("upgrade_in_progress") else ""
        module.exit_json(
            changed=True,
            result="would_upgrade",
            msg="would upgrade generation %s (pid %s, version %s)%s"
            % (before.get("generation"), before.get("pid"), before.get("version"), note),
            diff=dict(
                before_header="serving",
                after_header="after the upgrade",
                before=baton_cli.diff_text(before),
                after=baton_cli.diff_text(after),
            ),
            **result
        )

    argv = baton_cli.baton_command(module, "upgrade") + ["--timeout", "%ss" % p["timeout"]]
    if want:
        argv += ["--expect-sha256", want]
    if p["command"]:
        argv += ["--"] + p["command"]
    attempts = 0
    while True:
        attempts += 1
        out = baton_cli.run(module, argv, p["timeout"] + baton_cli.KILL_GRACE_SECONDS)
        if out.rc != baton_cli.IN_PROGRESS or attempts > p["retries"]:
            break
        time.sleep(p["delay"])

    result.update(report=out.report, exit_code=out.rc, attempts=attempts, cmd=argv)
    after_st = baton_cli.status(module)
    if after_st.rc == baton_cli.OK:
        result["after"] = baton_cli.summary(after_st.report)

    if out.rc == baton_cli.OK:
        after = result.get("after") or {}
        if isinstance(out.report, dict):
            after.setdefault("pid", out.report.get("new_pid"))
            after.setdefault("generation", out.report.get("to_generation"))
        module.exit_json(
            changed=True,
            result="upgraded",
            msg="upgraded: %s (pid %s) -> %s (pid %s)"
            % (before.get("version"), before.get("pid"), after.get("version"), after.get("pid")),
            diff=dict(
                before_header="serving before",
                after_header="serving after",
                before=baton_cli.diff_text(before),
                after=baton_cli.diff_text(after),
            ),
            ansible_facts=dict(baton_upgrade=out.report),
            **result
        )

    advice = baton_cli.ADVICE.get(out.rc, "unexpected exit code %s" % out.rc)
    if out.rc == baton_cli.IN_PROGRESS:
        advice += " (still, after %d tries %ss apart)" % (attempts, p["delay"])
    module.fail_json(
        msg="%s: %s (%s)" % (out.category, out.message, advice),
        result=out.category,
        stderr=out.stderr,
        **result
    )


if __name__ == "__main__":
    main()
