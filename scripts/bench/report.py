#!/usr/bin/env python3
"""Render scripts/bench/run.sh results (JSON lines) as Markdown.

  report.py RESULTS.jsonl              the report (run.sh prints it)
  report.py --doc RESULTS.jsonl        docs/benchmarks.md: how to re-run, what
                                       is measured and how, then the report
  report.py --readme README RESULTS.jsonl
                                       rewrite the README's summary (at most
                                       three lines) between its markers

Every figure comes from RESULTS.jsonl: nothing here is typed by hand.
Stdlib only.
"""

import json
import re
import statistics
import sys

PEER_LABEL = {
    "baton-demo": "baton-demo (library mode)",
    "baton-run": "`baton run` + plain hyper",
    "baton-run-node": "`baton run` + Node `http` server",
    "baton-run-node-front": "`baton run --front http` + Node `http` server",
    "nginx-binary": "nginx binary upgrade (USR2, WINCH, QUIT)",
    "nginx-reload": "nginx -s reload (HUP)",
    "haproxy": "HAProxy reload (master-worker, USR2)",
    "haproxy-idle-close": "HAProxy reload, idle-close-on-response",
    "haproxy-backend": "HAProxy reload (USR2), proxying to a backend",
    "tableflip": "Go net/http + tableflip (HUP, Shutdown)",
    "ecdysis": "Rust hyper + ecdysis (HUP, graceful shutdown)",
    "pingora": "pingora (-u + SIGQUIT)",
    "stop-start": "stop + start (plain hyper, SIGTERM then start)",
    "uvicorn-steer": "uvicorn under `baton run` (steering, the default)",
    "uvicorn-nosteer": "uvicorn under `baton run --no-steer --ready delay=1s`",
    "nginx-ws": "nginx -s reload (HUP) proxying to a WebSocket backend",
    "haproxy-ws": "HAProxy reload (USR2) proxying to a WebSocket backend",
    "nginx-tls": "nginx -s reload (HUP), terminating TLS",
    "haproxy-tls": "HAProxy reload (USR2), terminating TLS",
}

SHORT = {
    "baton-demo": "baton-demo",
    "baton-run": "`baton run`",
    "baton-run-node": "`baton run` + Node",
    "baton-run-node-front": "`baton run --front` + Node",
    "nginx-binary": "nginx binary upgrade",
    "nginx-reload": "nginx reload",
    "haproxy": "HAProxy",
    "haproxy-idle-close": "HAProxy idle-close",
    "haproxy-backend": "HAProxy (backend)",
    "tableflip": "tableflip",
    "ecdysis": "ecdysis",
    "pingora": "pingora",
    "stop-start": "stop + start",
    "nginx-ws": "nginx reload (proxy)",
    "haproxy-ws": "HAProxy reload (proxy)",
    "nginx-tls": "nginx reload (TLS)",
    "haproxy-tls": "HAProxy reload (TLS)",
}

TRIGGER = {
    "baton-demo": "SIGUSR2 to the serving process",
    "baton-run": "SIGHUP to the supervisor",
    "nginx-binary": "USR2 to the master (then WINCH + QUIT to the old master once the new one serves)",
    "nginx-reload": "HUP to the master",
    "haproxy": "USR2 to the master",
    "tableflip": "HUP to the serving process",
    "ecdysis": "HUP to the serving process",
    "pingora": "spawn of `server -u`; SIGQUIT to the old one as soon as the new one created its upgrade socket",
    "stop-start": "SIGTERM; start the new process once the old one exited",
}

CLIENT_LABEL = {
    "java-httpclient": "Java Apache HttpClient",
    "node-http": "Node `http.Agent`",
    "python-requests": "Python `requests.Session`",
}


# ------------------------------------------------------------- parsing ----
def ms(text):
    """wrk duration ("512.00us", "1.23ms", "2.00s", "1.00m") -> ms."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return None
    v = float(m.group(1))
    return v * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[m.group(2)]


def parse_wrk_text(text):
    r = {"raw_ok": "Requests/sec" in text}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    r["rps"] = float(m.group(1)) if m else None
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}(?:\.000)?%\s+(\S+)", text, re.M)
        r["p" + q] = ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", text)
    r["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    r["connect"], r["read"], r["write"], r["timeout"] = (
        [int(x) for x in m.groups()] if m else [0, 0, 0, 0])
    m = re.search(r"BATON closes=(\d+) non2xx=(\d+)", text)
    r["closes"], r["non2xx"] = ([int(x) for x in m.groups()] if m else [None, None])
    if r["non2xx"] is None:
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        r["non2xx"] = int(m.group(1)) if m else 0
    # wrk's timeouts are failures too: no answer within its 2 s
    r["failed"] = r["connect"] + r["read"] + r["write"] + r["timeout"] + (r["non2xx"] or 0)
    return r


def parse_wrk(path):
    try:
        return parse_wrk_text(open(path).read())
    except OSError:
        return None


def parse_oha(path):
    """oha --output-format json -> {rps, p50, p99 (ms), ok, failed}, or None."""
    try:
        x = json.load(open(path))
    except (OSError, ValueError, TypeError):
        return None
    lat = x.get("metrics", {}).get("latency_ms", {})
    codes = x.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    failed = sum(v for k, v in codes.items() if not k.startswith("2")) + sum(
        x.get("errorDistribution", {}).values())
    return {"rps": x.get("summary", {}).get("requestsPerSec"), "p50": lat.get("p50"), "p99": lat.get("p99"),
            "ok": ok, "failed": failed}


def jsonl(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except (OSError, TypeError):
        pass
    return out


# ---------------------------------------------------------- formatting ----
def f_ms(v):
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v / 1000:.2f} s"
    if abs(v) >= 10:
        return f"{v:.0f} ms"
    return f"{v:.2f} ms"


def f_rps(v):
    return "—" if v is None else f"{v:,.0f}"


def f_num(v):
    if v is None:
        return "—"
    if float(v).is_integer():
        return f"{int(v)}"
    return f"{v:.1f}"


def f_kib(v):
    return "—" if v is None else f"{v / 1024:.2f} MiB"


def mmm(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return min(vals), statistics.median(vals), max(vals)


def med_range(vals, fmt, unit=""):
    """'median (min–max)' of vals with fmt; one value: just it."""
    t = mmm(vals)
    if t is None:
        return "—"
    lo, med, hi = t
    if lo == hi:
        return fmt(med) + unit
    if unit:
        return f"{fmt(med)}{unit} ({fmt(lo)}–{fmt(hi)})"
    return f"{fmt(med)} ({fmt(lo)}–{fmt(hi)})"


class Report:
    def __init__(self, rows):
        self.rows = rows
        self.meta = next((r for r in rows if r["kind"] == "meta"), {})
        self.end = next((r for r in rows if r["kind"] == "end"), {})
        self.versions = next((r for r in rows if r["kind"] == "versions"), {})
        self.out = []
        self.goals = []      # (goal, met, measured)
        self.summary = {}    # figures for the README summary

    def kind(self, k):
        return [r for r in self.rows if r["kind"] == k]

    def p(self, line=""):
        self.out.append(line)

    def goal(self, name, met, measured):
        self.goals.append((name, met, measured))

    # ------------------------------------------------------------ header ----
    def header(self, level="###"):
        m = self.meta
        took = ""
        if self.end.get("t_end") and m.get("t_start"):
            took = f", took {(int(self.end['t_end']) - int(m['t_start'])) / 60:.0f} min"
        dirty = m.get("dirty", "0")
        tree = "clean tree" if dirty == "0" else f"**dirty tree: {dirty} changed file(s)**"
        self.p(f"{level} Benchmarks — {m.get('date', '?')}")
        self.p()
        self.p(f"`{m.get('cmd', 'scripts/bench/run.sh')}` at commit `{m.get('commit', '?')}` ({tree}){took}.")
        self.p()
        self.p(f"Machine: {m.get('cores')} cores ({m.get('cpu')}), {m.get('mem_gib')} GiB, kernel "
               f"{m.get('kernel')}. Servers pinned to CPU {m.get('srv_cpu')}, every client (wrk -t1, "
               f"probes, load clients) to CPU {m.get('load_cpu')} (taskset). "
               f"Load average (1/5/15 min) before: {m.get('load_before')}, after: "
               f"{self.end.get('load_after', '?')}.")
        scen = self.kind("scenario")
        if scen:
            self.p()
            self.p("Load average (1 min) at the start of each scenario: "
                   + ", ".join(f"{s['name']} {s['load'].split()[0]}" for s in scen) + ".")
        v = self.versions
        if v:
            parts = [m.get("wrk", "wrk")]
            for key, label in (("nginx", "nginx"), ("haproxy", "HAProxy"), ("go", "Go"),
                               ("tableflip", "tableflip (Debian)"), ("pingora", "pingora"),
                               ("ecdysis", "ecdysis"), ("node", "Node"), ("java", "Java"),
                               ("httpclient", "HttpClient (Debian)"), ("requests", "requests"),
                               ("uvicorn", "uvicorn"), ("oha", "oha")):
                if v.get(key):
                    parts.append(f"{label} {v[key]}")
            self.p()
            self.p("Versions: " + ", ".join(parts) + ".")
        if m.get("quick") == "1":
            self.p()
            self.p("**--quick**: a smoke run (seconds, not minutes; possibly debug builds): not figures to quote.")
        self.p()

    # ------------------------------------------------------------- load -----
    def load(self, n):
        load = self.kind("load")
        if not load:
            return
        m = self.meta
        self.p(f"#### {n}. Upgrade under load")
        self.p()
        for c in sorted({r.get("cmd", "") for r in load if r.get("cmd")}):
            self.p(f"- `{c}`")
        self.p()
        self.p(f"{m.get('rounds')} round(s); in each, every peer runs once per connection mode, in an "
               f"order that rotates from round to round, with {m.get('upgrades')} upgrades per run, "
               "spread over it, each complete (old generation gone) before the next. "
               "**Failed** = wrk's connect, read, write and timeout errors + non-2xx responses: each is a "
               "request that got no good answer. **Forced reconnects** = responses carrying "
               "`Connection: close` that the client did not ask for (counted by `count-closes.lua`) + "
               "read errors + write errors: wrk keeps a request in flight on each connection, so a "
               "connection the server closes or resets shows up as a read error (EOF/RST) or a write "
               "error (EPIPE), and wrk reconnects. With `-H 'Connection: close'` every response closes by "
               "request, so only the errors count. Per upgrade: the run's count divided by the upgrades "
               "it did; median (min–max) over the rounds.")
        self.p()
        self.p("| peer | connections | upgrades done | failed per upgrade | forced reconnects per upgrade "
               "| req/s | p99 | errors c/r/w/t (all rounds) | non-2xx (all rounds) |")
        self.p("|---|---|---:|---:|---:|---:|---:|---|---:|")
        groups = {}
        for r in load:
            groups.setdefault((r["peer"], r["mode"], r["upgrading"]), []).append(r)
        steady = {}
        order = []
        for r in load:
            k = (r["peer"], r["mode"], r["upgrading"])
            if k not in order:
                order.append(k)
        order.sort(key=lambda k: (list(PEER_LABEL).index(k[0]) if k[0] in PEER_LABEL else 99,
                                  k[1] != "keepalive", k[2]))
        for key in order:
            peer, mode, up = key
            runs = groups[key]
            label = PEER_LABEL.get(peer, peer)
            conn = "keep-alive" if mode == "keepalive" else "`Connection: close`"
            per_fail, per_forced, rps, p99 = [], [], [], []
            tot = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "non2xx": 0, "failed": 0, "forced": 0}
            done_all, want_all, bad = 0, 0, []
            for r in runs:
                if r.get("error"):
                    bad.append(r["error"])
                    continue
                w = parse_wrk(r["wrk"])
                if not w or not w.get("raw_ok"):
                    bad.append("wrk failed")
                    continue
                ups = jsonl(r.get("upgrades", ""))
                done = sum(1 for u in ups if u.get("gone_ms") is not None and u.get("ready_ms") is not None)
                for u in ups:
                    if u.get("error"):
                        bad.append(f"upgrade {u.get('n')}: {u['error']}")
                    elif u.get("ready_ms") is None:
                        bad.append(f"upgrade {u.get('n')}: no new generation answered within 30 s")
                    elif u.get("gone_ms") is None:
                        bad.append(f"upgrade {u.get('n')}: the old generation still ran at the limit")
                forced = w["read"] + w["write"] + ((w.get("closes") or 0) if mode == "keepalive" else 0)
                for k2 in ("connect", "read", "write", "timeout"):
                    tot[k2] += w[k2]
                tot["non2xx"] += w["non2xx"] or 0
                tot["failed"] += w["failed"]
                tot["forced"] += forced
                rps.append(w["rps"])
                p99.append(w["p99"])
                if up == "1":
                    done_all += done
                    want_all += int(m.get("upgrades", 0))
                    if done:
                        per_fail.append(w["failed"] / done)
                        per_forced.append(forced / done)
            errs = "/".join(str(tot[k2]) for k2 in ("connect", "read", "write", "timeout"))
            if up == "1":
                up_txt = f"{done_all}/{want_all}"
                fcell = med_range(per_fail, f_num)
                rcell = med_range(per_forced, f_num)
            else:
                up_txt = "0 (steady baseline)"
                fcell = f"{tot['failed']} in all"
                rcell = f"{tot['forced']} in all"
            note = f" ({len(bad)} problem(s); the first: {bad[0]})" if bad else ""
            self.p(f"| {label} | {conn} | {up_txt}{note} | {fcell} | {rcell} | {med_range(rps, f_rps)} | "
                   f"{med_range(p99, f_ms)} | {errs} | {tot['non2xx']} |")
            if up == "0":
                steady[mode] = statistics.median(p99) if p99 else None
            if up == "1":
                self.summary.setdefault("load_fail", {})[(peer, mode)] = (
                    statistics.median(per_fail) if per_fail else None)
            if peer == "baton-demo" and up == "1":
                self.goal(f"baton-demo, {conn}, {want_all} upgrades under load: 0 failed requests, "
                          "0 forced reconnects",
                          tot["failed"] == 0 and tot["forced"] == 0 and done_all == want_all and not bad,
                          f"{tot['failed']} failed, {tot['forced']} forced reconnects, {done_all} upgrades done")
                s99 = steady.get(mode)
                if s99 and p99:
                    ratio = statistics.median(p99) / s99
                    self.goal(f"baton-demo, {conn}: p99 during upgrades ≤ 1.5 × steady p99 (medians)",
                              ratio <= 1.5, f"{f_ms(statistics.median(p99))} vs {f_ms(s99)}: × {ratio:.2f}")
            if peer == "baton-run" and mode == "close" and up == "1":
                self.goal("`baton run`, Connection: close under load: 0 failed requests", tot["failed"] == 0,
                          f"{tot['failed']} failed over {done_all} upgrades")
        self.p()

    # ------------------------------------------------------------- idle -----
    def idle(self, n):
        idle = self.kind("idle")
        if not idle:
            return
        self.p(f"#### {n}. Idle keep-alive connections through one upgrade")
        self.p()
        self.p("64 connections each make one request (`GET /`), stay open and idle while one upgrade runs "
               "to its end (old generation gone, or 60 s), then send a second request on the same socket. "
               "*closed while idle*: the server closed the connection before the second request (a client "
               "that sends at that moment gets a reset). *failed*: no answer after sending. The answering "
               "generation is read from the pid in the answer. One upgrade per round; totals over the rounds.")
        self.p()
        self.p("| peer | rounds | answered by the new generation | by the old one | closed while idle | failed |")
        self.p("|---|---:|---:|---:|---:|---:|")
        by = {}
        for r in idle:
            by.setdefault(r["peer"], []).append(r)
        for peer in sorted(by, key=lambda k: list(PEER_LABEL).index(k) if k in PEER_LABEL else 99):
            t = {"conns": 0, "new": 0, "old": 0, "closed_idle": 0, "failed": 0}
            errs = []
            for r in by[peer]:
                res = jsonl(r.get("file", ""))
                if r.get("error") or not res:
                    errs.append(r.get("error", "no result"))
                    continue
                for k in t:
                    t[k] += res[-1][k]
            note = f" ({len(errs)}: {errs[0]})" if errs else ""
            self.p(f"| {PEER_LABEL.get(peer, peer)} | {len(by[peer])}{note} | {t['new']}/{t['conns']} | "
                   f"{t['old']} | {t['closed_idle']} | {t['failed']} |")
            self.summary.setdefault("idle", {})[peer] = (t["new"], t["conns"])
            if peer == "baton-demo":
                self.goal("baton-demo: every idle connection answered on its own socket by the new generation",
                          t["new"] == t["conns"] > 0 and not errs,
                          f"{t['new']}/{t['conns']} new, {t['old']} old, {t['closed_idle']} closed, "
                          f"{t['failed']} failed")
        self.p()

    # ------------------------------------------------------------ steady ----
    def steady(self, n):
        steady = self.kind("steady")
        if not steady:
            return
        m = self.meta
        self.p(f"#### {n}. Steady overhead: baton-demo vs the same handler on plain hyper")
        self.p()
        self.p(f"`{steady[0]['cmd']}`: both servers up at once (on CPU {m.get('srv_cpu')}), one uncounted "
               f"warm-up second each, then {m.get('steady_rounds')} rounds alternating the order "
               "(baton, plain; then plain, baton; ...). *plain* is `baton-demo --plain`: the same `handle` "
               "function served by hyper-util's auto builder, no baton. Ratio = baton-demo req/s ÷ plain "
               "req/s of the same round.")
        self.p()
        self.p("| round | order | baton-demo req/s | plain req/s | ratio | baton-demo p99 | plain p99 | errors |")
        self.p("|---:|---|---:|---:|---:|---:|---:|---:|")
        rounds = {}
        for r in steady:
            rounds.setdefault(int(r["round"]), {})[r["server"]] = parse_wrk(r["wrk"])
            rounds[int(r["round"])].setdefault("order", []).append(r["server"])
        ratios, b_rps, p_rps, b99, p99 = [], [], [], [], []
        for rn in sorted(rounds):
            x = rounds[rn]
            b, pl = x.get("baton"), x.get("plain")
            if not (b and pl and b.get("rps") and pl.get("rps")):
                self.p(f"| {rn} | | wrk failed | | | | | |")
                continue
            ratio = b["rps"] / pl["rps"]
            ratios.append(ratio)
            b_rps.append(b["rps"])
            p_rps.append(pl["rps"])
            b99.append(b["p99"])
            p99.append(pl["p99"])
            self.p(f"| {rn} | {', '.join(x['order'])} | {f_rps(b['rps'])} | {f_rps(pl['rps'])} | "
                   f"× {ratio:.3f} | {f_ms(b['p99'])} | {f_ms(pl['p99'])} | {b['failed'] + pl['failed']} |")
        if ratios:
            med = statistics.median(ratios)
            self.p()
            self.p(f"Ratio per round, median: **× {med:.3f}** (min × {min(ratios):.3f}, max × {max(ratios):.3f}); "
                   f"median req/s: baton-demo {f_rps(statistics.median(b_rps))}, plain "
                   f"{f_rps(statistics.median(p_rps))}; median p99: baton-demo "
                   f"{f_ms(statistics.median(b99))}, plain {f_ms(statistics.median(p99))}.")
            self.summary["steady"] = (med, min(ratios), max(ratios), len(ratios))
            self.goal("steady req/s ≥ 0.97 × plain hyper (median of the per-round ratios)", med >= 0.97,
                      f"× {med:.3f} (× {min(ratios):.3f}–{max(ratios):.3f}, {len(ratios)} rounds)")
        self.p()

    # ----------------------------------------------------------- latency ----
    def latency(self, n):
        lat = self.kind("latency")
        if not lat:
            return
        self.p(f"#### {n}. Upgrade latency (idle server)")
        self.p()
        self.p(f"Every peer up at once and idle; {self.meta.get('latn')} rounds, one upgrade of each peer "
               "per round in a rotating order. *trigger → ready*: from the trigger until a fresh "
               "connection's `GET /` is answered by a process that is not of the old generation (polled by "
               "`probe.py`, one connection at a time, ~0.1–0.3 ms apart; each poll is one whole request, "
               "see the probe's own cost under *Spawn*). *ready → old gone* and *trigger → old gone*: until "
               "every process of the old generation has exited (its /proc entry is gone or a zombie), "
               "polled in the same loop. Median (min–max).")
        self.p()
        self.p("| peer | trigger | trigger → ready | ready → old gone | trigger → old gone | measured |")
        self.p("|---|---|---:|---:|---:|---|")
        for r in sorted(lat, key=lambda r: list(PEER_LABEL).index(r["peer"]) if r["peer"] in PEER_LABEL else 99):
            label = PEER_LABEL.get(r["peer"], r["peer"])
            res = jsonl(r.get("file", ""))
            if r.get("error") or not res:
                self.p(f"| {label} | {TRIGGER.get(r['peer'], '')} | {r.get('error', 'no result')} | | | |")
                continue
            ok = [x for x in res if x.get("ready_ms") is not None and x.get("gone_ms") is not None]
            errs = [x.get("error") for x in res if x.get("error")]
            ready = [x["ready_ms"] for x in ok]
            stuck = sum(1 for x in res if x.get("ready_ms") is not None and x.get("gone_ms") is None)
            perr = sum(len(x.get("poll_errors") or []) for x in res)
            note = f"{len(ok)}/{self.meta.get('latn')}"
            if stuck:
                note += f"; {stuck}× old generation still running at the limit"
            failed_up = [x for x in res if x.get("ready_ms") is None and not x.get("error")]
            if failed_up:
                note += f"; upgrade {failed_up[0]['n']}: no new generation answered within 30 s, stopped there"
            if perr:
                note += f"; {perr} poll request(s) failed"
            if errs:
                note += f"; {errs[0]}"
            self.p(f"| {label} | {TRIGGER.get(r['peer'], '')} | {med_range(ready, f_ms)} | "
                   f"{med_range([x['gone_after_ready_ms'] for x in ok], f_ms)} | "
                   f"{med_range([x['gone_ms'] for x in ok], f_ms)} | {note} |")
            if r["peer"] == "baton-demo" and ok:
                t = mmm(ready)
                self.goal("baton-demo: trigger → ready median ≤ 5 ms (issue 9)", t[1] <= 5,
                          f"{f_ms(t[1])} ({f_ms(t[0])}–{f_ms(t[2])})")
                a = mmm([x["gone_after_ready_ms"] for x in ok])
                self.goal("baton-demo: old generation gone ≤ 25 ms after ready (idle)", a[1] <= 25,
                          f"median {f_ms(a[1])}, max {f_ms(a[2])}")
        self.p()

    # ----------------------------------------------------------- handoff ----
    def handoff(self, n):
        ho = self.kind("handoff")
        if not ho:
            return
        r = ho[0]
        self.p(f"#### {n}. Handoff scale")
        self.p()
        self.p(f"`{r['cmd']}`: N idle keep-alive connections (one request each), one upgrade through the "
               "control socket, then one more request on every connection. The old generation's *drain_ms* "
               "is its own report (from promoting the new generation until its drain is done, before it "
               "exits); the last timing is measured outside, until `bench-handoff` reaps the old process.")
        self.p()
        try:
            text = open(r["file"]).read()
        except OSError:
            text = ""
        table = [ln for ln in text.splitlines() if ln.startswith("|")]
        if table:
            self.out.extend(table)
            for ln in table:
                cells = [c.strip() for c in ln.strip("|").split("|")]
                if cells and cells[0] == "10000":
                    mm = re.match(r"(\d+) ms", cells[5])
                    if mm:
                        self.goal("10k idle connections: upgrade request → old process exited < 250 ms",
                                  int(mm.group(1)) < 250,
                                  f"{cells[5]} (its own drain_ms {cells[2]}), {cells[6]} answered by the new "
                                  "generation")
        else:
            err = ""
            try:
                err = open(r["err"]).read().strip().splitlines()[-1]
            except (OSError, IndexError):
                pass
            self.p(f"bench-handoff failed: {err}")
        self.p()

    # ------------------------------------------------------------- spawn ----
    def spawn(self, n):
        sp = self.kind("spawn")
        rd = self.kind("spawn_ready")
        if not sp and not rd:
            return
        self.p(f"#### {n}. Spawn cost and a large parent")
        self.p()
        if sp:
            r = sp[0]
            res = jsonl(r.get("file", ""))
            self.p(f"`{r['cmd']}`: a parent with that much memory allocated and touched starts `/bin/true` "
                   "with one fd placed at 3, alternately with `fork` + a `pre_exec` hook (how baton started "
                   "the next generation before) and with `posix_spawn` (how it does now); the parent's time "
                   "in the spawn call, median (min–max).")
            self.p()
            if res:
                self.p("| parent resident | iterations | fork + pre_exec | posix_spawn |")
                self.p("|---:|---:|---:|---:|")
                for x in res:
                    def cell(d):
                        return f"{d['median_us']:.0f} µs ({d['min_us']:.0f}–{d['max_us']:.0f})"
                    self.p(f"| {x['resident_mib']} MiB | {x['iterations']} | {cell(x['fork'])} | "
                           f"{cell(x['posix_spawn'])} |")
            else:
                err = ""
                try:
                    err = open(r["err"]).read().strip().splitlines()[-1]
                except (OSError, IndexError):
                    pass
                self.p(f"bench-spawn failed: {err}")
            self.p()
        if rd:
            rtt = jsonl(next((r.get("file") for r in self.kind("probe_rtt")), ""))
            builds = sorted({r.get("build", "dynamic") for r in rd})
            self.p(f"A real upgrade from a large parent: `baton-demo --ballast-mib MIB` servers (after "
                   "ready, each generation allocates and touches MIB MiB, so it is that big when it starts the "
                   "next one)"
                   + (", in the default build (dynamic: the loader maps and relocates libc, libm and "
                      "libgcc_s at every start) and linked statically (`scripts/build-static.sh baton-demo`)"
                      if "static" in builds else "")
                   + f", upgraded in rotation, {self.meta.get('latn')} times each, by `SIGUSR2`; "
                   "before each trigger the probe waits until the serving process is resident for MIB MiB. "
                   "*trigger → ready* is measured by the probe as in *Upgrade latency* (not the `ready_ms` of "
                   "`baton upgrade --json`, which counts whole milliseconds from the spawn, not from the "
                   "trigger); it includes one probe request"
                   + (f", which by itself takes {f_ms(rtt[-1]['median_ms'])} (median of {rtt[-1]['n']}, "
                      f"{f_ms(rtt[-1]['min_ms'])}–{f_ms(rtt[-1]['max_ms'])}) on the idle server"
                      if rtt and rtt[-1].get("median_ms") is not None else "")
                   + ".")
            self.p()
            self.p("| build | --ballast-mib | parent resident at the trigger | upgrades | trigger → ready | "
                   "ready → old gone |")
            self.p("|---|---:|---:|---:|---:|---:|")
            meds = {}
            for r in rd:
                build = r.get("build", "dynamic")
                res = jsonl(r.get("file", ""))
                ok = [x for x in res if x.get("ready_ms") is not None]
                errs = [x.get("error") for x in res if x.get("error")]
                rss = [x.get("parent_rss_kib") for x in ok]
                note = f"; {len(errs)} failed: {errs[0]}" if errs else ""
                self.p(f"| {build} | {r['mib']} | {med_range(rss, lambda v: f'{v / 1024:.0f}', ' MiB')} | "
                       f"{len(ok)}{note} | {med_range([x['ready_ms'] for x in ok], f_ms)} | "
                       f"{med_range([x['gone_after_ready_ms'] for x in ok if x.get('gone_after_ready_ms') is not None], f_ms)} |")
                if ok:
                    meds.setdefault(build, {})[int(r["mib"])] = statistics.median(x["ready_ms"] for x in ok)
            self.p()
            for build, m in sorted(meds.items()):
                small, big = min(m), max(m)
                self.goal(f"trigger → ready ≤ 2 ms median ({small} MiB parent, {build} build)", m[small] <= 2,
                          f_ms(m[small]))
                if big != small:
                    d = m[big] - m[small]
                    self.goal(f"trigger → ready with a {big} MiB parent within ±1 ms of {small} MiB "
                              f"(medians, {build} build)",
                              abs(d) <= 1, f"{f_ms(m[big])} vs {f_ms(m[small])}: {d:+.2f} ms")

    # ---------------------------------------------------------------- h2 ----
    def h2(self, n):
        h2 = self.kind("h2")
        if not h2:
            return
        self.p(f"#### {n}. HTTP/2 streams through upgrades")
        self.p()
        self.p("Node's `http2` client (`crates/baton-tests/apps/h2_client.js`): 16 sessions × 8 concurrent "
               f"streams of `GET /`, h2c with prior knowledge, {self.meta.get('h2_upgrades')} upgrades per round "
               "(ready: a process of the new generation exists, since these listeners speak only h2c). "
               "nginx: `listen … http2` on a cleartext listener; HAProxy: `proto h2` on the bind line. A "
               "stream is *ok* (a full 200), *refused* (REFUSED_STREAM, or above a GOAWAY's last stream "
               "id: the server says it did not process it, and the client retries it), *retry* (never sent: "
               "its session was already closing), or *failed* (anything else: reset, error, bad status). "
               "Per upgrade: median (min–max) over the rounds; totals over every round.")
        self.p()
        self.p("| peer | upgrades done | streams ok | refused per upgrade | retry per upgrade | "
               "failed per upgrade | failed (all) | GOAWAY frames |")
        self.p("|---|---:|---:|---:|---:|---:|---:|---:|")
        by = {}
        for r in h2:
            by.setdefault(r["peer"], []).append(r)
        for peer in sorted(by, key=lambda k: list(PEER_LABEL).index(k) if k in PEER_LABEL else 99):
            ok = failed = goaways = done = 0
            per = {"refused": [], "retry": [], "failed": []}
            errs = []
            for r in by[peer]:
                res = jsonl(r.get("file", ""))
                if r.get("error") or not res:
                    errs.append(r.get("error", "no result"))
                    continue
                x = res[-1]
                c = x.get("client")
                d = sum(1 for u in x.get("upgrades", []) if u.get("ready_ms") is not None)
                if not c:
                    errs.append(x.get("error") or "the client printed no totals")
                    continue
                done += d
                ok += c["ok"]
                failed += c["failed"]
                goaways += c.get("goaways", 0)
                if d:
                    for k in per:
                        per[k].append(c[k] / d)
                if x.get("error"):
                    errs.append(x["error"])
            note = f" ({errs[0]})" if errs else ""
            self.p(f"| {PEER_LABEL.get(peer, peer)} | {done}{note} | {ok:,} | {med_range(per['refused'], f_num)} | "
                   f"{med_range(per['retry'], f_num)} | {med_range(per['failed'], f_num)} | {failed} | {goaways} |")
            if peer == "baton-demo":
                refused = sum(per["refused"])
                self.goal("baton-demo, HTTP/2: 0 failed and 0 refused streams", failed == 0 and refused == 0
                          and done > 0 and not errs, f"{failed} failed, refused per upgrade "
                          f"{med_range(per['refused'], f_num)}, {done} upgrades")
        self.p()

    # ------------------------------------------------------------ memory ----
    def memory(self, n):
        mem = self.kind("memory")
        sup = self.kind("supervisor_mem")
        if not mem and not sup:
            return
        self.p(f"#### {n}. Memory")
        self.p()
        if mem:
            self.p("From /proc/PID/status: VmRSS (resident), RssAnon (its anonymous part: heap, stacks).")
            self.p()
            self.p("| process | VmRSS | RssAnon |")
            self.p("|---|---:|---:|")
            for r in mem:
                try:
                    x = json.loads(r.get("mem") or "{}")
                except ValueError:
                    x = {}
                self.p(f"| {r['what']} | {f_kib(x.get('VmRSS'))} | {f_kib(x.get('RssAnon'))} |")
            self.p()
        if sup:
            at = self.meta.get("sup_at", "10,100").split(",")
            self.p(f"The `baton run` supervisor (its own process, not the app) supervising `baton-demo --plain`, "
                   f"upgraded {self.meta.get('sup_count')} times in a row with `baton upgrade --json` (each "
                   "after the previous old generation exited); VmRSS and RssAnon at the start (1 s after "
                   f"generation 1 is ready) and after {' and '.join(at)} upgrades (1 s after the old "
                   "generation exited).")
            self.p()
            head = ["start"] + [f"after {a}" for a in at]
            self.p("| build | upgrades done | " + " | ".join(f"VmRSS {h}" for h in head) + " | "
                   + " | ".join(f"RssAnon {h}" for h in head) + " |")
            self.p("|---|---:|" + "---:|" * (2 * len(head)))
            for r in sup:
                res = jsonl(r.get("file", ""))
                if r.get("error") or not res:
                    self.p(f"| {r['build']} | {r.get('error', 'no result')} |" + " |" * (2 * len(head)))
                    continue
                x = res[-1]
                pts = [x["at"].get(k, {}) for k in ["0"] + at]
                fails = f" ({len(x['failed'])} failed: {x['failed'][0]['message']})" if x.get("failed") else ""
                self.p(f"| {r['build']} | {x['upgrades']}{fails} | "
                       + " | ".join(f_kib(p.get("VmRSS")) for p in pts) + " | "
                       + " | ".join(f_kib(p.get("RssAnon")) for p in pts) + " |")
                first, mid, last = pts[0], pts[1] if len(pts) > 2 else pts[0], pts[-1]
                name = r["build"].split(" ")[0]
                if first.get("RssAnon") and last.get("RssAnon"):
                    d = last["RssAnon"] - first["RssAnon"]
                    self.goal(f"supervisor ({name}): RssAnon after {at[-1]} upgrades ≤ at start + 512 KiB",
                              d <= 512, f"{d:+d} KiB")
                if mid.get("VmRSS") and last.get("VmRSS"):
                    d = last["VmRSS"] - mid["VmRSS"]
                    self.goal(f"supervisor ({name}): VmRSS after {at[-1]} − after {at[0]} upgrades ≤ 256 KiB",
                              d <= 256, f"{d:+d} KiB")
                if name == "static":
                    worst = max((p.get("VmRSS") or 0) for p in pts)
                    self.goal("supervisor (static build): VmRSS ≤ 4 MiB at every point", 0 < worst <= 4096,
                              f"at most {f_kib(worst)}")
                self.summary.setdefault("sup", {})[name] = pts
            self.p()

    # ----------------------------------------------------------- clients ----
    def clients(self, n):
        cl = self.kind("clients")
        if not cl:
            return
        self.p(f"#### {n}. Third-party keep-alive clients")
        self.p()
        self.p("`scripts/bench/clients/`: Java Apache HttpClient (pooled, `DefaultHttpRequestRetryHandler(0, "
               "false)`, no stale-connection check), Node `http.Agent({keepAlive: true})`, Python "
               "`requests.Session` (`HTTPAdapter(max_retries=0)`), each with 8 workers that send `GET /`, read "
               "the answer and stay idle 0–40 ms (uniformly random) before the next, "
               f"through {self.meta.get('client_upgrades')} upgrades 0.5 s apart. No client retries. Each "
               "cell: failed requests / requests, over the whole run. `baton run` supervises "
               "`crates/baton-tests/apps/node_server.js`, with the clients on the app's own connections or, "
               "with `--front http`, on baton's (which forwards each request to the serving generation); "
               "nginx serves a static `return 200` itself; HAProxy proxies to the plain hyper server (not "
               "reloaded).")
        self.p()
        clients = [c for c in CLIENT_LABEL if any(r["client"] == c for r in cl)]
        self.p("| peer | upgrades done | " + " | ".join(CLIENT_LABEL[c] for c in clients) + " |")
        self.p("|---|---:|" + "---:|" * len(clients))
        by = {}
        kinds = {}
        for r in cl:
            by.setdefault(r["peer"], {})[r["client"]] = r
        for peer in sorted(by, key=lambda k: list(PEER_LABEL).index(k) if k in PEER_LABEL else 99):
            cells, dones = [], []
            for c in clients:
                r = by[peer].get(c)
                res = jsonl(r.get("file", "")) if r else []
                if not r or r.get("error") or not res or not res[-1].get("client"):
                    why = (r or {}).get("error") or (res[-1].get("error") if res else None) or "no result"
                    cells.append(f"— ({why})")
                    continue
                x = res[-1]
                c_ = x["client"]
                d = sum(1 for u in x.get("upgrades", []) if u.get("ready_ms") is not None)
                dones.append(d)
                cells.append(f"{c_['errors']} / {c_['ok'] + c_['errors']:,}")
                for k, v in c_.get("kinds", {}).items():
                    kinds.setdefault((peer, c), []).append(f"{k} × {v}")
                self.summary.setdefault("clients", {}).setdefault(peer, {})[c] = c_["errors"]
            done = "/".join(str(d) for d in dones) if len(set(dones)) > 1 else (str(dones[0]) if dones else "—")
            self.p(f"| {PEER_LABEL.get(peer, peer)} | {done} | " + " | ".join(cells) + " |")
            if peer in ("baton-demo", "baton-run-node-front"):
                got = self.summary.get("clients", {}).get(peer, {})
                errs = sum(got.values())
                self.goal(f"{SHORT[peer]}: 0 errors for every keep-alive client",
                          errs == 0 and len(cells) == len(got) and min(dones, default=0) > 0,
                          "/".join(str(got.get(c, "—")) for c in clients)
                          + f" ({done} upgrades)")
        if kinds:
            self.p()
            self.p("Errors by kind: " + "; ".join(
                f"{SHORT.get(p, p)}, {CLIENT_LABEL[c]}: {', '.join(v)}" for (p, c), v in kinds.items()) + ".")
        self.p()

    # ---------------------------------------------------------- steering ----
    def steering(self, n):
        st = self.kind("steering")
        if not st:
            return
        self.p(f"#### {n}. Steering: uvicorn under `baton run`")
        self.p()
        self.p(f"`{st[0].get('cmd', '')}`; uvicorn started as in the supervisor test "
               "`uvicorn_ten_upgrades_lose_nothing_with_steering_compared_with_plain_sigterm` (`uvicorn --fd 3 "
               "… --lifespan off asgi_app:app`, `--drain-timeout 20s`), with steering (the default) and "
               f"without (`--no-steer --ready delay=1s`), {self.meta.get('steer_upgrades')} upgrades (SIGHUP) "
               f"per run, {self.meta.get('steer_runs')} runs each, alternating. Failed = wrk's connect, read, "
               "write and timeout errors + non-2xx. Per run: median (min–max).")
        self.p()
        self.p("| mode | runs | upgrades done | requests (all runs) | failed per run | errors c/r/w/t (all runs) "
               "| non-2xx |")
        self.p("|---|---:|---:|---:|---:|---|---:|")
        by = {}
        for r in st:
            by.setdefault(r["peer"], []).append(r)
        for peer in ("uvicorn-nosteer", "uvicorn-steer"):
            if peer not in by:
                continue
            fails, done, reqs = [], 0, 0
            tot = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "non2xx": 0}
            errs = []
            for r in by[peer]:
                res = jsonl(r.get("file", ""))
                w = parse_wrk(r.get("wrk", "")) if not r.get("error") else None
                if not w or not w.get("raw_ok"):
                    errs.append(r.get("error") or (res[-1].get("error") if res else None) or "wrk failed")
                    continue
                x = res[-1] if res else {}
                done += sum(1 for u in x.get("upgrades", []) if u.get("ready_ms") is not None)
                fails.append(w["failed"])
                reqs += w["requests"] or 0
                for k in tot:
                    tot[k] += w[k] or 0
            note = f" ({errs[0]})" if errs else ""
            self.p(f"| {PEER_LABEL[peer]} | {len(by[peer])}{note} | {done} | {reqs:,} | {med_range(fails, f_num)} | "
                   f"{tot['connect']}/{tot['read']}/{tot['write']}/{tot['timeout']} | {tot['non2xx']} |")
            self.summary.setdefault("steer", {})[peer] = (sum(fails), done)
            if peer == "uvicorn-steer":
                self.goal("uvicorn with steering: 0 failed requests", sum(fails) == 0 and not errs and done > 0,
                          f"{sum(fails)} failed over {done} upgrades")
        self.p()

    # ---------------------------------------------------------- failures ----
    def failures(self):
        fl = self.kind("failure")
        if fl:
            self.p("#### Failures of this run")
            self.p()
            for r in fl:
                self.p(f"- **{r['what']}**: {r['reason']}")
            self.p()

    def goals_table(self):
        if not self.goals:
            return
        self.p("#### Goals, this run")
        self.p()
        self.p("| goal | met | measured |")
        self.p("|---|---|---|")
        for name, ok, txt in self.goals:
            self.p(f"| {name} | {'yes' if ok else '**no**'} | {txt} |")
        self.p()

    # ---------------------------------------------------------------- ws -----
    def ws(self, n):
        rows = self.kind("ws")
        if not rows:
            return
        stop_after = rows[0].get("stop_after", "?")
        self.p(f"#### {n}. Long-lived WebSockets through one upgrade")
        self.p()
        self.p("Each connection (scripts/bench/ws_probe.py, its own RFC 6455 client) exchanges a text message "
               "every second with baton-demo's `GET /ws` echo; one upgrade is triggered and the probe waits "
               "until every process of the old generation has exited, then one more second. *survived*: "
               "still answering on its own connection; *closed*: the server sent a close frame (code); "
               "*cut*: the connection ended without one. *old generation gone*: trigger to the last old "
               "process exiting (median, min-max over the rounds). nginx and HAProxy proxy to one named "
               "backend, baton-demo's `/ws` on its own port (never upgraded), and are reloaded with "
               f"`worker_shutdown_timeout {stop_after}s` / `hard-stop-after {stop_after}s`.")
        self.p()
        self.p("| peer | rounds | connections | survived | closed (code: n) | cut | old generation gone |")
        self.p("|---|---:|---:|---:|---|---:|---:|")
        by = {}
        for r in rows:
            by.setdefault(r["peer"], []).append(r)
        for peer in sorted(by, key=lambda k: list(PEER_LABEL).index(k) if k in PEER_LABEL else 99):
            t = {"opened": 0, "survived": 0, "cut": 0, "stalled": 0}
            closes, gone, errs = {}, [], []
            for r in by[peer]:
                res = jsonl(r.get("file", ""))
                if r.get("error") or not res:
                    errs.append(r.get("error", "no result"))
                    continue
                x = res[-1]
                for k in t:
                    t[k] += x[k]
                for code, c in x["closes"].items():
                    closes[code] = closes.get(code, 0) + c
                if x["gone_ms"] is not None:
                    gone.append(x["gone_ms"])
            note = f" ({len(errs)}: {errs[0]})" if errs else ""
            closed = ", ".join(f"{k}: {v}" for k, v in sorted(closes.items())) or "0"
            stalled = f" (+{t['stalled']} stalled)" if t["stalled"] else ""
            self.p(f"| {PEER_LABEL.get(peer, peer)} | {len(by[peer])}{note} | {t['opened']} | {t['survived']} | "
                   f"{closed} | {t['cut']}{stalled} | {med_range(gone, f_ms) if gone else 'not gone'} |")
            self.summary.setdefault("ws", {})[peer] = (t["survived"], t["opened"])
            if peer == "baton-demo":
                self.goal("baton-demo: every WebSocket survives the upgrade on its own connection",
                          t["survived"] == t["opened"] > 0 and not errs,
                          f"{t['survived']}/{t['opened']} survived, {sum(closes.values())} closed, {t['cut']} cut")
                self.goal("baton-demo: old generation gone within 1 s with the WebSockets open",
                          bool(gone) and max(gone) < 1000,
                          med_range(gone, f_ms) if gone else "not gone")
        self.p()

    # --------------------------------------------------------------- tls -----
    def tls(self, n):
        rows = self.kind("tls")
        if not rows:
            return
        self.p(f"#### {n}. Idle HTTPS keep-alive connections through upgrades")
        self.p()
        self.p("Each round, the probe (scripts/bench/tls_probe.py, Python `ssl`, TLS 1.3, HTTP/1.1) opens "
               "its connections with one `GET /` each and leaves them idle; then, per upgrade, it waits until "
               "every process of the old generation has exited and, like a pooled client, checks each "
               "connection and sends one `GET /` on it. *survived*: answered on its own socket (no new "
               "handshake); *closed*: the server had closed it (clean: with close_notify), the client "
               "reconnects — one TLS handshake (*resumed*: with its session ticket); *failed*: a request "
               "sent on a connection that then failed. *handshakes per upgrade*: new handshakes over all "
               "upgrades and rounds ÷ upgrades (the connections per round are in *connections*). nginx and "
               "HAProxy terminate TLS with the same certificate and the same handler as in the other "
               "scenarios, and are reloaded.")
        self.p()
        self.p("| peer | rounds | connections | upgrades | survived on their socket | handshakes per upgrade "
               "(resumed) | closed (clean/other) | failed | old generation gone |")
        self.p("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        by = {}
        for r in rows:
            by.setdefault(r["peer"], []).append(r)
        for peer in sorted(by, key=lambda k: list(PEER_LABEL).index(k) if k in PEER_LABEL else 99):
            t = {"opened": 0, "upgrades": 0, "survived": 0, "handshakes": 0, "resumed": 0,
                 "closed_clean": 0, "closed_other": 0, "failed": 0}
            gone, errs, conns, checks = [], [], [], 0
            for r in by[peer]:
                res = jsonl(r.get("file", ""))
                if r.get("error") or not res:
                    errs.append(r.get("error", "no result"))
                    continue
                x = res[-1]
                for k in t:
                    t[k] += x[k]
                conns.append(x["opened"])
                checks += x["opened"] * x["upgrades"]
                gone += [g for g in x["gone_ms"] if g is not None]
                if any(g is None for g in x["gone_ms"]):
                    errs.append("an old generation was still there at the timeout")
            note = f" ({len(errs)}: {errs[0]})" if errs else ""
            per_up = t["handshakes"] / t["upgrades"] if t["upgrades"] else None
            self.p(f"| {PEER_LABEL.get(peer, peer)} | {len(by[peer])}{note} | "
                   f"{'/'.join(sorted(set(map(str, conns)))) or '—'} | {t['upgrades']} | "
                   f"{t['survived']}/{checks} | {f_num(per_up) if per_up is not None else '—'} "
                   f"({t['resumed']}) | {t['closed_clean']}/{t['closed_other']} | {t['failed']} | "
                   f"{med_range(gone, f_ms) if gone else 'not gone'} |")
            self.summary.setdefault("tls", {})[peer] = (t["survived"], checks, per_up)
            if peer == "baton-demo":
                self.goal("baton-demo: every idle TLS connection answers on its own socket after each upgrade, "
                          "with no new handshake",
                          t["survived"] == checks > 0 and t["handshakes"] == 0 and not errs,
                          f"{t['survived']}/{checks} survived, {t['handshakes']} handshakes, "
                          f"{t['failed']} failed")
                self.goal("baton-demo: old generation gone within 1 s with the TLS connections idle",
                          bool(gone) and max(gone) < 1000,
                          med_range(gone, f_ms) if gone else "not gone")
        self.p()
    # ------------------------------------------------------------- front ----
    def front(self, n):
        mx, rt, mem = self.kind("front_max"), self.kind("front_rate"), self.kind("front_mem")
        if not (mx or rt or mem):
            return
        m = self.meta
        self.p(f"#### {n}. `baton run --front http`: through the front vs direct (Go app)")
        self.p()
        self.p("The suite's Go app (`crates/baton-tests/apps/go`: standard-library `net/http`, `GET /health` "
               "answers `ok`) under `baton run --ready http://…/health`, *direct* (the clients connect to the "
               "app's socket; the supervisor only supervises) and *through the front* (`--front http`: baton "
               "accepts the clients' connections and forwards each request over its own keep-alive upstream "
               f"connections to the app). Both are up at once on CPU {m.get('srv_cpu')} (the front, its "
               "supervisor and the app share it; Go sizes itself to that one CPU), the client on CPU "
               f"{m.get('load_cpu')}; the load alternates between them, the order swapped every round "
               f"(direct, front; front, direct; …), {m.get('front_rounds')} rounds, after one uncounted "
               "warm-up second each. No upgrade during these runs: this is what the front costs per request.")
        self.p()
        ratios = []
        # the ways compared with direct: the front over TCP, and over a Unix
        # upstream (`--front-upstream unix`) when the run has it
        ways = ["front"] + (["front-unix"] if any(r["way"] == "front-unix" for r in mx + rt) else [])
        wname = {"front": "front", "front-unix": "front-unix"}
        if "front-unix" in ways:
            self.p("*front-unix*: the same front with `--front-upstream unix` (each generation gets a Unix "
                   "stream socket instead of a loopback TCP one), a third supervisor up at the same time; the "
                   "order of the three rotates every round.")
            self.p()
        if mx:
            self.p(f"**Max req/s**: `{mx[0].get('cmd', '')}` (keep-alive, as many requests as the server "
                   "answers). Ratio = through the front ÷ direct, same round.")
            self.p()
            head = "| round | order | direct req/s |"
            for w in ways:
                head += f" {wname[w]} req/s | ratio |"
            head += " direct p99 |" + "".join(f" {wname[w]} p99 |" for w in ways) + " failed |"
            self.p(head)
            self.p("|---:|---|---:|" + "---:|---:|" * len(ways) + "---:|" * (len(ways) + 1) + "---:|")
            rounds = {}
            cpu = {w: {"self": [], "children": []} for w in ["direct"] + ways}
            for r in mx:
                w = parse_wrk(r["wrk"])
                rounds.setdefault(int(r["round"]), {})[r["way"]] = w
                rounds[int(r["round"])].setdefault("order", []).append(r["way"])
                try:
                    c0, c1 = json.loads(r["cpu_before"]), json.loads(r["cpu_after"])
                except (KeyError, ValueError):
                    continue
                if w and w.get("requests") and r["way"] in cpu:
                    for k in ("self", "children"):
                        cpu[r["way"]][k].append((c1[f"{k}_s"] - c0[f"{k}_s"]) * 1e6 / w["requests"])
            rat = {w: [] for w in ways}
            wrps = {w: [] for w in ["direct"] + ways}
            for rn in sorted(rounds):
                x = rounds[rn]
                d = x.get("direct")
                got = [x.get(w) for w in ways]
                if not (d and d.get("rps") and all(g and g.get("rps") for g in got)):
                    self.p(f"| {rn} | {', '.join(x['order'])} | wrk failed |" + " |" * (3 * len(ways) + 1))
                    continue
                line = f"| {rn} | {', '.join(x['order'])} | {f_rps(d['rps'])} |"
                wrps["direct"].append(d["rps"])
                for w, g in zip(ways, got):
                    rat[w].append(g["rps"] / d["rps"])
                    wrps[w].append(g["rps"])
                    line += f" {f_rps(g['rps'])} | × {rat[w][-1]:.3f} |"
                line += f" {f_ms(d['p99'])} |" + "".join(f" {f_ms(g['p99'])} |" for g in got)
                line += f" {d['failed'] + sum(g['failed'] for g in got)} |"
                self.p(line)
            self.p()
            ratios = rat["front"]
            for w in ways:
                if not rat[w]:
                    continue
                med = statistics.median(rat[w])
                self.p(f"Ratio per round, {wname[w]}, median: **× {med:.3f}** (× {min(rat[w]):.3f}–"
                       f"{max(rat[w]):.3f}); median req/s: direct {f_rps(statistics.median(wrps['direct']))}, "
                       f"{wname[w]} {f_rps(statistics.median(wrps[w]))}.")
                self.p()
            if ratios:
                med = statistics.median(ratios)
                if cpu["front"]["self"] and cpu["direct"]["self"]:
                    def us(v):
                        return f"{v:.1f}"
                    self.p("CPU time per request during these runs (utime + stime from /proc, ÷ wrk's requests; "
                           "median, min–max over the rounds): the `baton run` process "
                           f"{med_range(cpu['front']['self'], us, ' µs')} through the front "
                           f"({med_range(cpu['direct']['self'], us, ' µs')} direct), the Go app "
                           f"{med_range(cpu['front']['children'], us, ' µs')} through the front "
                           f"({med_range(cpu['direct']['children'], us, ' µs')} direct).")
                    if "front-unix" in ways and cpu["front-unix"]["self"]:
                        self.p(f"With `--front-upstream unix`: the `baton run` process "
                               f"{med_range(cpu['front-unix']['self'], us, ' µs')}, the Go app "
                               f"{med_range(cpu['front-unix']['children'], us, ' µs')}.")
                    self.p()
                self.summary["front_ratio"] = (med, min(ratios), max(ratios), len(ratios))
            if rat.get("front-unix"):
                u = rat["front-unix"]
                self.summary["front_unix_ratio"] = (statistics.median(u), min(u), max(u), len(u))
            self.goal("`--front http`, Go app: max req/s ≥ 0.5 × direct (median of the per-round ratios, "
                      "2 shared cores)", bool(ratios) and statistics.median(ratios) >= 0.5,
                      f"× {statistics.median(ratios):.3f} (× {min(ratios):.3f}–{max(ratios):.3f}, "
                      f"{len(ratios)} rounds)" if ratios else "wrk failed")
        shares = sorted({int(r.get("share", 2)) for r in rt})
        for share in shares:
            rows_ = [r for r in rt if int(r.get("share", 2)) == share]
            rate = rows_[0].get("rate")
            part = {2: "half", 4: "a quarter"}.get(share, f"1/{share}")
            self.p(f"**Latency at a fixed rate, {part} of the direct max**: `{rows_[0].get('cmd', '')}`: "
                   f"{f_rps(float(rate))} req/s, {part} of the direct median above; `--latency-correction`: a "
                   "request's latency counts from when it was due, so a server that falls behind is not hidden "
                   "by the client waiting for it (coordinated omission). *achieved*: oha's requests/s over the "
                   "run.")
            self.p()
            head = "| round | order | direct p50 | direct p99 |"
            for w in ways:
                head += f" {wname[w]} p50 | {wname[w]} p99 | {wname[w]} − direct p99 |"
            head += " achieved req/s direct / " + " / ".join(wname[w] for w in ways) + " | failed |"
            self.p(head)
            self.p("|---:|---|---:|---:|" + "---:|---:|---:|" * len(ways) + "---|---:|")
            rounds = {}
            why = {}
            for r in rows_:
                rounds.setdefault(int(r["round"]), {})[r["way"]] = parse_oha(r["file"])
                rounds[int(r["round"])].setdefault("order", []).append(r["way"])
                try:
                    why.setdefault(int(r["round"]), open(r["err"]).read().strip().splitlines()[-1])
                except (OSError, IndexError, KeyError):
                    pass
            p99 = {w: [] for w in ["direct"] + ways}
            diffs = {w: [] for w in ways}
            for rn in sorted(rounds):
                x = rounds[rn]
                d = x.get("direct")
                got = [x.get(w) for w in ways]
                if not (d and d.get("p99") is not None and all(g and g.get("p99") is not None for g in got)):
                    err = f" ({why[rn]})" if rn in why else ""
                    self.p(f"| {rn} | {', '.join(x['order'])} | oha failed{err} |" + " |" * (3 * len(ways) + 3))
                    continue
                p99["direct"].append(d["p99"])
                line = f"| {rn} | {', '.join(x['order'])} | {f_ms(d['p50'])} | {f_ms(d['p99'])} |"
                for w, g in zip(ways, got):
                    p99[w].append(g["p99"])
                    diffs[w].append(g["p99"] - d["p99"])
                    line += f" {f_ms(g['p50'])} | {f_ms(g['p99'])} | {diffs[w][-1]:+.2f} ms |"
                line += (f" {f_rps(d['rps'])} / " + " / ".join(f_rps(g["rps"]) for g in got)
                         + f" | {d['failed'] + sum(g['failed'] for g in got)} |")
                self.p(line)
            self.p()
            for w in ways:
                if diffs[w]:
                    dm, fm = statistics.median(p99["direct"]), statistics.median(p99[w])
                    self.p(f"Median p99: direct {f_ms(dm)}, {wname[w]} {f_ms(fm)} ({fm - dm:+.2f} ms); "
                           f"per-round difference {med_range(diffs[w], lambda v: f'{v:+.2f}', ' ms')}.")
                    self.p()
                    if share == 2 and w == "front":
                        self.summary["front_p99"] = (dm, fm)
            if share == 2:
                d99, f99 = p99["direct"], p99["front"]
                self.goal(f"`--front http`, Go app: p99 at {f_rps(float(rate))} req/s (half the direct max) ≤ "
                          "direct p99 + 1 ms (medians)",
                          bool(diffs["front"]) and statistics.median(f99) <= statistics.median(d99) + 1,
                          f"{f_ms(statistics.median(f99))} vs {f_ms(statistics.median(d99))}" if diffs["front"]
                          else "oha failed")
        if mem:
            self.p("**The supervisor's own figures** (the `baton run` process, not the app; /proc/PID/status): "
                   "*idle*: 1 s after start, no client connection yet; *under load*: sampled every 0.2 s during "
                   "every max-req/s run of that supervisor, the highest sample (median of the samples in "
                   "brackets); *after*: 1 s after the last of those runs, its connections closed.")
            self.p()
            self.p("| supervisor | state | VmRSS | RssAnon | threads |")
            self.p("|---|---|---:|---:|---:|")
            label = {"direct": "`baton run` (direct)", "front": "`baton run --front http`",
                     "front-unix": "`baton run --front http --front-upstream unix`"}
            for way in ["direct"] + ways:
                rows = {r["state"]: r for r in mem if r["way"] == way}

                def row(state, x):
                    self.p(f"| {label[way]} | {state} | {f_kib(x.get('VmRSS'))} | {f_kib(x.get('RssAnon'))} | "
                           f"{f_num(x.get('Threads'))} |")
                if "idle" in rows:
                    row("idle", json.loads(rows["idle"].get("mem") or "{}"))
                samples = [x for r in mx if r["way"] == way for x in jsonl(r.get("sample", ""))]
                if samples:
                    peak = {k: max(x["peak"].get(k) or 0 for x in samples) for k in ("VmRSS", "RssAnon", "Threads")}
                    medv = {k: statistics.median(x["median"].get(k) or 0 for x in samples)
                            for k in ("VmRSS", "RssAnon", "Threads")}
                    self.p(f"| {label[way]} | under load ({sum(x['n'] for x in samples)} samples) | "
                           f"{f_kib(peak['VmRSS'])} ({f_kib(medv['VmRSS'])}) | "
                           f"{f_kib(peak['RssAnon'])} ({f_kib(medv['RssAnon'])}) | "
                           f"{f_num(peak['Threads'])} ({f_num(medv['Threads'])}) |")
                if "after" in rows:
                    row("after", json.loads(rows["after"].get("mem") or "{}"))
            self.p()

    def render(self, level="###"):
        self.header(level)
        self.failures()
        n = 0
        for section in (self.load, self.idle, self.steady, self.latency, self.handoff, self.spawn,
                        self.h2, self.memory, self.clients, self.steering, self.ws, self.tls, self.front):
            before = len(self.out)
            section(n + 1)
            if len(self.out) > before:
                n += 1
        self.goals_table()
        return "\n".join(self.out)

    # ------------------------------------------------------------ README ----
    def readme_lines(self):
        """At most three lines, every figure from this run."""
        m = self.meta
        s = self.summary
        lines = []
        lf = s.get("load_fail", {})
        first = (f"Measured by `{m.get('cmd')}` on {m.get('date')} at `{m.get('commit')}` "
                 f"({m.get('cores')} cores, servers and clients on separate CPUs, load average "
                 f"{m.get('load_before', '?').split()[0]} before)")
        parts = [f"{SHORT.get(p, p)} {f_num(v)}" for (p, mode), v in lf.items()
                 if mode == "keepalive" and v is not None]
        if parts:
            first += (": failed requests per upgrade under wrk keep-alive load (median of "
                      f"{m.get('rounds')} rounds): " + ", ".join(parts))
        lines.append(first + ".")
        idle = s.get("idle", {})
        cl = s.get("clients", {})
        bits = []
        if idle:
            bits.append("idle keep-alive connections answered by the new generation on the same socket: "
                        + ", ".join(f"{SHORT.get(p, p)} {a}/{b}" for p, (a, b) in idle.items()))
        if cl:
            bits.append("keep-alive client errors (Java/Node/Python) over "
                        f"{m.get('client_upgrades')} upgrades: "
                        + ", ".join(f"{SHORT.get(p, p)} "
                                    + "/".join(str(v.get(c, "—")) for c in CLIENT_LABEL)
                                    for p, v in cl.items()))
        ws = s.get("ws", {})
        if ws:
            bits.append("WebSockets still answering on their own connection after one upgrade: "
                        + ", ".join(f"{SHORT.get(p, p)} {a}/{b}" for p, (a, b) in ws.items()))
        tls = s.get("tls", {})
        if tls:
            bits.append("idle TLS connections answering on their own socket after upgrades: "
                        + ", ".join(f"{SHORT.get(p, p)} {a}/{b}" for p, (a, b, _) in tls.items()))
        if "steady" in s:
            med, lo, hi, k = s["steady"]
            bits.append(f"steady req/s baton-demo ÷ plain hyper × {med:.3f} (× {lo:.3f}–{hi:.3f}, {k} rounds)")
        if "front_ratio" in s:
            med, lo, hi, k = s["front_ratio"]
            txt = (f"`baton run --front http` ÷ direct, Go app, max req/s × {med:.3f} (× {lo:.3f}–{hi:.3f}, "
                   f"{k} rounds)")
            if "front_p99" in s:
                d, f = s["front_p99"]
                txt += f", p99 at half the direct max {f_ms(f)} vs {f_ms(d)}"
            if "front_unix_ratio" in s:
                med, lo, hi, k = s["front_unix_ratio"]
                txt += f"; with `--front-upstream unix` × {med:.3f} (× {lo:.3f}–{hi:.3f})"
            bits.append(txt)
        if bits:
            line = "; ".join(bits) + "."
            lines.append(line[0].upper() + line[1:])
        met = sum(1 for g in self.goals if g[1])
        lines.append(f"Goals met: {met}/{len(self.goals)}. Every table, the machine and how to re-run: "
                     "[docs/benchmarks.md](docs/benchmarks.md).")
        return lines[:3]


DOC_HEAD = """# Benchmarks

This page is written by [`scripts/bench/run.sh --write-docs`](../scripts/bench/run.sh) (its
[`report.py`](../scripts/bench/report.py)): every figure, the date, the commit, the machine and the
load average come from the run below; nothing here is typed by hand. To re-run:

```sh
scripts/bench/run.sh --write-docs                   # every peer and scenario; rewrites this page and the README summary
scripts/bench/run.sh                                # the same, report on stdout only (and target/bench/latest.md)
scripts/bench/run.sh --only baton-demo,pingora      # some peers…
scripts/bench/run.sh --only baton-demo,latency      # …and/or some scenarios
scripts/bench/run.sh --quick                        # a smoke run (the test suite runs it): never writes docs
```

Options: `--rounds N` (default 5), `--duration S` (wrk `-d` of a load run, default 8), `--upgrades N`
(per load run, default 2), `--latency-count N` (rounds of the latency and spawn scenarios, default 20),
`--server-cpu N` / `--load-cpu N` (default 0 / 1), `--bin-dir DIR` (prebuilt `baton-demo`,
`bench-handoff`, `bench-spawn` and `baton`), `--keep` (keep the run directory with every raw output),
`--ws-conns N` (WebSockets in the ws scenario, default 1000), `--tls-conns N` (idle HTTPS connections in
the tls scenario, default 200).
Every process it starts is stopped by pid on exit, every port is picked free on 127.0.0.1, every wait
and every load loop has a deadline. It installs what the peers need (Debian packages, a pinned Python
venv, oha from crates.io at a pinned version) and builds pingora and ecdysis from their own lockfiles;
a peer that cannot be installed is a failure of the run, named in the report, and the script exits 1.

**How it measures.** Every server runs on one CPU (`taskset -c 0`, one worker process or thread each:
nginx `worker_processes 1`, HAProxy `nbthread 1`, pingora `threads: 1`; tokio and Go size themselves to
the CPU they may use), every client on the other (`taskset -c 1`: wrk `-t1`, the probe, the load
clients). Peers alternate: each round runs every peer once, in an order that rotates from round to
round, and figures are the median with min–max over the rounds.

**The peers** (`scripts/bench/`), each with a one-line handler that names its pid, so a client can tell
which generation answered:

| peer | upgrade | notes |
|---|---|---|
| baton-demo | `SIGUSR2` | `--no-state` (no peer carries state); everything else default |
| `baton run` + plain hyper | `SIGHUP` to the supervisor | `baton run --listen http=… --ready notify -- baton-demo --plain`, the static build (`scripts/build-static.sh`) |
| nginx (Debian's nginx-light) | binary upgrade: `USR2`, then `WINCH` + `QUIT` to the old master once the new one serves; and `nginx -s reload` (`HUP`) | `return 200`; `keepalive_requests` lifted so that only upgrades close connections |
| HAProxy (Debian) | master-worker reload (`USR2` to the master), default and with `option idle-close-on-response` | `http-request return status 200`; `hard-stop-after 30s` |
| Go `net/http` + tableflip (Debian's package, GOPATH mode) | `SIGHUP`: `Upgrade()`, then `http.Server.Shutdown` in the old process | as tableflip's documentation shows |
| Rust hyper + ecdysis (crates.io, Cloudflare's Rust port of tableflip) | `SIGHUP`: ecdysis starts the new binary, which inherits the listener and calls `ready()`; the old one's listener stream ends and hyper-util's `GracefulShutdown` finishes its connections | `scripts/bench/ecdysis-server`, as ecdysis' example shows |
| pingora | start the new binary with `-u`, `SIGQUIT` the old one as soon as the new one created its upgrade socket | `scripts/bench/pingora-server`; `grace_period_seconds: 1`, `graceful_shutdown_timeout_seconds: 1` |
| stop + start | `SIGTERM`, start the new process once the old one exited | the plain hyper server below |

**The plain hyper server** is `baton-demo --plain`: the demo's own `handle` function served by
hyper-util's auto builder (HTTP/1.1 + HTTP/2), no baton at all. It takes fd 3 when `LISTEN_FDS=1` and
`LISTEN_PID` is its pid (so `baton run` can drive it), binds otherwise, sends `READY=1` when
`NOTIFY_SOCKET` is set, and on `SIGTERM` stops accepting, closes idle connections and finishes the
others. It is the baseline of the steady-overhead comparison.

**Definitions** (the same for every peer, measured from outside by `scripts/bench/probe.py`):
*trigger* is the operator's first action (the signal; for pingora the spawn of the new binary; for
stop + start the `SIGTERM`). *Ready*: a fresh connection's `GET /` is answered by a process that is
not of the old generation. *Old gone*: every process of the old generation has exited. A failed
request is one that got no good answer (wrk: connect, read, write and timeout errors, non-2xx).

## Latest full run

"""


def main():
    args = sys.argv[1:]
    mode = "report"
    readme = None
    if args and args[0] == "--doc":
        mode, args = "doc", args[1:]
    elif args and args[0] == "--readme":
        mode, readme, args = "readme", args[1], args[2:]
    rep = Report(jsonl(args[0]))
    text = rep.render("###" if mode != "doc" else "###")
    if mode == "report":
        print(text)
    elif mode == "doc":
        print(DOC_HEAD + text)
    else:
        begin, end = "<!-- bench-summary:begin (written by scripts/bench/run.sh --write-docs) -->", \
            "<!-- bench-summary:end -->"
        src = open(readme).read()
        if begin not in src or end not in src:
            sys.exit(f"report.py: {readme} has no {begin} … {end} markers")
        head, rest = src.split(begin, 1)
        _, tail = rest.split(end, 1)
        lines = rep.readme_lines()
        open(readme, "w").write(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)


if __name__ == "__main__":
    main()
