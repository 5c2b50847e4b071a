#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: the baton authors. MIT OR Apache-2.0.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: baton_status
short_description: Read the status of a server that baton upgrades in place
description:
  - Runs C(baton status --json) on the host against a control socket and
    returns the status object (serving generation, its pid, the app's version,
    listeners, the last upgrade) as RV(status) and as the fact C(baton_status).
  - Never changes anything; fails if baton cannot answer (no server at the
    socket, not allowed to use it, no answer in time).
version_added: "0.1.0"
options:
  control:
    description: Path of the control socket (C(baton status --control)).
    type: path
  name:
    description: Service name (C(baton status --name)); the socket is found as baton finds it.
    type: str
  baton:
    description: The C(baton) executable (a name looked up in C(PATH), or a path).
    type: path
    default: baton
  timeout:
    description: Seconds baton waits for the server's answer.
    type: int
    default: 10
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
notes:
  - Runs as the user the task runs as; the control socket only answers its owner (or root).
author:
  - the baton authors
"""

EXAMPLES = r"""
- name: Where does the host stand?
  baton.fleet.baton_status:
    control: /run/myapp/ctl.sock
  register: st

- ansible.builtin.debug:
    msg: "generation {{ st.status.generation }} (pid {{ st.status.pid }}) serves {{ st.status.app_version }}"
"""

RETURN = r"""
status:
  description: The object C(baton status --json) prints.
  returned: success
  type: dict
  sample:
    mode: library
    app_version: 2.4.1
    generation: 3
    pid: 4242
    phase: serving
    upgrade_in_progress: false
    last_upgrade: {result: success, reason: null, at_unix_ms: 1760000000000}
exit_code:
  description: baton's exit code (0 on success; see C(baton status --help)).
  returned: always
  type: int
result:
  description: The exit code's category (C(ok), C(cannot_connect), C(timeout), ...).
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.baton.fleet.plugins.module_utils import baton_cli


def main():
    args = dict(baton_cli.COMMON_ARGS)
    args["timeout"] = dict(type="int", default=10)
    module = AnsibleModule(
        argument_spec=args,
        mutually_exclusive=[("control", "name")],
        required_one_of=[("control", "name")],
        supports_check_mode=True,
    )
    out = baton_cli.status(module, module.params["timeout"])
    if out.rc != baton_cli.OK or not isinstance(out.report, dict):
        module.fail_json(
            msg="baton status: %s (%s)" % (out.message, baton_cli.ADVICE.get(out.rc, "unexpected exit code")),
            exit_code=out.rc,
            result=out.category,
            cmd=out.argv,
            stderr=out.stderr,
        )
    module.exit_json(
        changed=False,
        status=out.report,
        exit_code=out.rc,
        result=out.category,
        ansible_facts=dict(baton_status=out.report),
    )


if __name__ == "__main__":
    main()
