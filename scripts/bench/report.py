#!/usr/bin/env python3
"""Render scripts/bench/run.sh results (JSON lines) as one Markdown report.

Usage: report.py RESULTS.jsonl   (stdlib only)
"""

import json
import re
import statistics
import sys

PEER_LABEL = {
    "baton-demo": "baton-demo (library mode)",
    "baton-run": "`baton run` + plain hyper",
    "nginx-binary": "nginx binary upgrade (USR2, WINCH, QUIT)",
    "nginx-reload": "nginx -s reload (HUP)",
    "haproxy": "HAProxy reload (master-worker, USR2)",
    "haproxy-idle-close": "HAProxy reload, idle-close-on-response",
    "tableflip": "Go net/http + tableflip (HUP, Shutdown)",
    "pingora": "pingora 0.9 (-u + SIGQUIT)",
    "stop-start": "stop + start (plain hyper, SIGTERM then start)",
}

READY_DEF = {
    "baton-demo": "SIGUSR2 to the serving process",
    "baton-run": "SIGHUP to the supervisor",
    "nginx-binary": "USR2 to the master (then WINCH + QUIT to the old master once the new one serves)",
    "nginx-reload": "HUP to the master",
    "haproxy": "USR2 to the master",
    "tableflip": "HUP to the serving process",
    "pingora": "spawn of `server -u`; SIGQUIT to the old one as soon as the new one created its upgrade socket",
    "stop-start": "SIGTERM; start the new process once the old one exited",
}


def ms(text):
    """wrk duration ("512.00us", "1.23ms", "2.00s", "1.00m") -> ms."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return None
    v = float(m.group(1))
    return v * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[m.group(2)]


def parse_wrk(path):
    try:
        text = open(path).read()
    except OSError:
        return None
    r = {"raw_ok": "Requests/sec" in text}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    r["rps"] = float(m.group(1)) if m else None
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", text, re.M)
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
    return r


def jsonl(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    except OSError:
        pass
    return out


def f_ms(v):
    if v is None:
        return "—"
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    if v >= 10:
        return f"{v:.0f} ms"
    return f"{v:.2f} ms"


def f_rps(v):
    return "—" if v is None else f"{v:,.0f}"


def mmm(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return min(vals), statistics.median(vals), max(vals)


def f_mmm(t):
    return "—" if t is None else " / ".join(f_ms(v) for v in t)


def main():
    rows = jsonl(sys.argv[1])
    meta = next((r for r in rows if r["kind"] == "meta"), {})
    end = next((r for r in rows if r["kind"] == "end"), {})
    skips = {r["peer"]: r["reason"] for r in rows if r["kind"] == "skip"}
    out = []
    p = out.append
    p(f"### Benchmarks — {meta.get('date', '?')}")
    p("")
    p(f"`scripts/bench/run.sh {meta.get('args', '')}`".replace(" `", "`"))
    p("")
    p(f"Machine: {meta.get('cores')} cores ({meta.get('cpu')}), kernel {meta.get('kernel')}, "
      f"{meta.get('wrk')}. Load average (1/5/15 min) before: {meta.get('load_before')}, "
      f"after: {end.get('load_after', '?')}."
      + (" **--quick**: a smoke run, not figures to quote." if meta.get("quick") == "1" else ""))
    p("")
    bars = []

    # ------------------------------------------------------------ load ------
    load = [r for r in rows if r["kind"] == "load"]
    if load:
        cmds = sorted({r.get("cmd", "") for r in load if r.get("cmd")})
        p("#### 1. Upgrade under load")
        p("")
        for c in cmds:
            p(f"- `{c}`")
        p("")
        p(f"{meta.get('upgrades')} upgrades per run, spread over it, each complete (old generation gone) "
          "before the next. Errors are wrk's socket errors: connect / read / write / timeout. "
          "**Forced reconnects** = responses carrying `Connection: close` that the client did not ask for "
          "(counted by `count-closes.lua`) + read errors + write errors: wrk always has a request in "
          "flight on each connection, so a connection the server closes or resets shows up as a read "
          "error (EOF/RST) or a write error (EPIPE), and wrk then reconnects. With "
          "`-H 'Connection: close'` every response closes by request, so only the errors count.")
        p("")
        p("| peer | connections | upgrades done | req/s | p50 | p99 | errors c/r/w/t | non-2xx | "
          "`Connection: close` responses | forced reconnects |")
        p("|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
        steady_p99 = {}
        for r in load:
            label = PEER_LABEL.get(r["peer"], r["peer"])
            conn = "keep-alive" if r["mode"] == "keepalive" else "`Connection: close`"
            if r.get("error"):
                p(f"| {label} | {conn} | — | {r['error']} | | | | | | |")
                continue
            w = parse_wrk(r["wrk"]) or {}
            ups = jsonl(r.get("upgrades", ""))
            done = sum(1 for u in ups if u.get("gone_ms") is not None and u.get("ready_ms") is not None)
            up_txt = f"{done}/{meta.get('upgrades')}" if r["upgrading"] == "1" else "0 (steady)"
            closes = w.get("closes")
            if r["mode"] == "keepalive":
                forced = (closes or 0) + w.get("read", 0) + w.get("write", 0)
            else:
                forced = w.get("read", 0) + w.get("write", 0)
            errs = "/".join(str(w.get(k, "?")) for k in ("connect", "read", "write", "timeout"))
            if not w.get("raw_ok"):
                p(f"| {label} | {conn} | {up_txt} | wrk failed | | | | | | |")
                continue
            p(f"| {label} | {conn} | {up_txt} | {f_rps(w.get('rps'))} | {f_ms(w.get('p50'))} | "
              f"{f_ms(w.get('p99'))} | {errs} | {w.get('non2xx')} | "
              f"{closes if r['mode'] == 'keepalive' else f'{closes} (asked)'} | {forced} |")
            if r["peer"] == "baton-demo":
                failed = w.get("connect", 0) + w.get("read", 0) + w.get("write", 0) + (w.get("non2xx") or 0)
                if r["upgrading"] == "0":
                    steady_p99[r["mode"]] = w.get("p99")
                else:
                    bars.append((f"baton-demo, {conn}, {done} upgrades under load: 0 failed requests, "
                                 "0 forced reconnects",
                                 failed == 0 and forced == 0 and done == int(meta.get("upgrades", 0)),
                                 f"{failed} failed, {forced} forced reconnects, {done} upgrades done"))
                    s99 = steady_p99.get(r["mode"])
                    if s99 and w.get("p99"):
                        ratio = w["p99"] / s99
                        bars.append((f"baton-demo, {conn}: p99 during the upgrade storm ≤ 1.5 × steady p99",
                                     ratio <= 1.5, f"{f_ms(w['p99'])} vs {f_ms(s99)} steady: × {ratio:.2f}"))
            if r["peer"] == "baton-run" and r["mode"] == "close" and r["upgrading"] == "1":
                failed = w.get("connect", 0) + w.get("read", 0) + w.get("write", 0) + (w.get("non2xx") or 0)
                bars.append(("`baton run`, Connection: close: 0 failed requests", failed == 0,
                             f"{failed} failed"))
        p("")

    # ------------------------------------------------------------ idle ------
    idle = [r for r in rows if r["kind"] == "idle"]
    if idle:
        p("#### 2. Idle keep-alive connections through one upgrade")
        p("")
        p("64 connections each make one request (`GET /`), stay open and idle while one upgrade runs "
          "to its end (old generation gone, or 60 s), then send a second request on the same socket. "
          "*closed while idle*: the server closed the connection before the second request (the "
          "client sees EOF/RST when it looks: a client that sends at that moment gets a reset). "
          "*failed*: no answer after sending. The answering generation is read from the pid in the body.")
        p("")
        p("| peer | answered by the new generation | by the old one | closed while idle | failed |")
        p("|---|---:|---:|---:|---:|")
        for r in idle:
            label = PEER_LABEL.get(r["peer"], r["peer"])
            res = jsonl(r.get("file", ""))
            if r.get("error") or not res:
                p(f"| {label} | {r.get('error', 'no result')} | | | |")
                continue
            x = res[-1]
            n = x["conns"]
            p(f"| {label} | {x['new']}/{n} | {x['old']} | {x['closed_idle']} | {x['failed']} |")
            if r["peer"] == "baton-demo":
                bars.append(("baton-demo: idle connections answered 64/64 on the same socket by the new generation",
                             x["new"] == n == 64, f"{x['new']}/{n} new, {x['old']} old, "
                             f"{x['closed_idle']} closed, {x['failed']} failed"))
        p("")

    # ------------------------------------------------------------ steady ----
    steady = [r for r in rows if r["kind"] == "steady"]
    if steady:
        p("#### 3. Steady overhead: baton-demo vs the same handler on plain hyper")
        p("")
        p(f"`{steady[0]['cmd']}`, {meta.get('rounds')} round(s) each, alternating (baton, plain, then "
          "plain, baton, ...); medians. *plain* is `baton-demo --plain`: the same `handle` function "
          "served by hyper-util's auto builder, no baton.")
        p("")
        p("| server | req/s (median) | p50 | p99 (median) | every round req/s | errors (all rounds) |")
        p("|---|---:|---:|---:|---|---:|")
        med = {}
        for srv in ("baton", "plain"):
            ws = [parse_wrk(r["wrk"]) for r in steady if r["server"] == srv]
            ws = [w for w in ws if w and w.get("raw_ok")]
            if not ws:
                continue
            rps = statistics.median(w["rps"] for w in ws)
            p50 = statistics.median(w["p50"] for w in ws)
            p99 = statistics.median(w["p99"] for w in ws)
            errs = sum(w["connect"] + w["read"] + w["write"] + w["timeout"] + (w["non2xx"] or 0) for w in ws)
            med[srv] = (rps, p99)
            name = "baton-demo" if srv == "baton" else "baton-demo --plain (plain hyper)"
            p(f"| {name} | {f_rps(rps)} | {f_ms(p50)} | {f_ms(p99)} | "
              f"{', '.join(f_rps(w['rps']) for w in ws)} | {errs} |")
        if "baton" in med and "plain" in med:
            rr = med["baton"][0] / med["plain"][0]
            pr = med["baton"][1] / med["plain"][1]
            p("")
            p(f"Ratio baton / plain: **req/s × {rr:.3f}**, **p99 × {pr:.2f}**.")
            bars.append(("steady req/s ≥ 0.97 × plain hyper", rr >= 0.97, f"× {rr:.3f}"))
        p("")

    # ------------------------------------------------------------ latency ---
    lat = [r for r in rows if r["kind"] == "latency"]
    if lat:
        p("#### 4. Upgrade latency (idle server)")
        p("")
        p(f"{meta.get('latn')} upgrades in a row, 0.2 s apart, no load. *ready*: a fresh connection's "
          "`GET /` is answered by a process that is not of the old generation (polled by "
          "`probe.py`, one connection at a time, ~0.1–0.3 ms apart). *old gone*: every process of "
          "the old generation has exited (its /proc entry is gone or a zombie), polled in the same "
          "loop. Min / median / max.")
        p("")
        p("| peer | trigger | trigger → ready | ready → old gone | trigger → old gone | measured |")
        p("|---|---|---:|---:|---:|---:|")
        for r in lat:
            label = PEER_LABEL.get(r["peer"], r["peer"])
            res = jsonl(r.get("file", ""))
            if r.get("error") or not res:
                p(f"| {label} | {READY_DEF.get(r['peer'], '')} | {r.get('error', 'no result')} | | | |")
                continue
            ok = [x for x in res if x.get("ready_ms") is not None and x.get("gone_ms") is not None]
            errs = [x.get("error") for x in res if x.get("error")]
            ready = mmm([x["ready_ms"] for x in ok])
            after = mmm([x["gone_after_ready_ms"] for x in ok])
            gone = mmm([x["gone_ms"] for x in ok])
            stuck = sum(1 for x in res if x.get("ready_ms") is not None and x.get("gone_ms") is None)
            perr = sum(len(x.get("poll_errors") or []) for x in res)
            note = f"{len(ok)}/{meta.get('latn')}"
            if stuck:
                note += f"; {stuck}× old generation still running after the {'20' if r['peer'] == 'pingora' else '10'} s limit"
            failed_up = [x for x in res if x.get("ready_ms") is None and not x.get("error")]
            if failed_up:
                note += (f"; upgrade {failed_up[0]['n']}: no new generation answered within the "
                         "30 s limit, stopped there")
            if perr:
                note += f"; {perr} poll request(s) failed"
            if errs:
                note += f"; {errs[0]}"
            p(f"| {label} | {READY_DEF.get(r['peer'], '')} | {f_mmm(ready)} | {f_mmm(after)} | "
              f"{f_mmm(gone)} | {note} |")
            if r["peer"] == "baton-demo" and ready and after:
                bars.append(("baton-demo: trigger → ready median ≤ 5 ms", ready[1] <= 5,
                             f"median {f_ms(ready[1])} (min {f_ms(ready[0])}, max {f_ms(ready[2])})"))
                bars.append(("baton-demo: old generation gone ≤ 25 ms after ready (idle)", after[1] <= 25,
                             f"median {f_ms(after[1])}, max {f_ms(after[2])}"))
        p("")

    # ------------------------------------------------------------ handoff ---
    ho = [r for r in rows if r["kind"] == "handoff"]
    if ho:
        r = ho[0]
        p("#### 5. Handoff scale")
        p("")
        p(f"`{r['cmd']}`: N idle keep-alive connections (one request each), one upgrade through the "
          "control socket, then one more request on every connection.")
        p("")
        try:
            text = open(r["file"]).read()
        except OSError:
            text = ""
        table = [ln for ln in text.splitlines() if ln.startswith("|")]
        if table:
            out.extend(table)
            for ln in table:
                cells = [c.strip() for c in ln.strip("|").split("|")]
                if cells and cells[0] == "10000":
                    m = re.match(r"(\d+) ms", cells[2])
                    if m:
                        bars.append(("10k idle connections handed over in < 250 ms", int(m.group(1)) < 250,
                                     f"drain {cells[2]}, {cells[5]} answered by the new generation"))
        else:
            err = ""
            try:
                err = open(r["err"]).read().strip().splitlines()[-1]
            except (OSError, IndexError):
                pass
            p(f"bench-handoff failed: {err}")
        p("")

    # ------------------------------------------------------------ memory ----
    mem = [r for r in rows if r["kind"] == "memory"]
    if mem:
        p("#### 6. Memory (VmRSS)")
        p("")
        p("| process | RSS |")
        p("|---|---:|")
        for r in mem:
            kib = r.get("kib")
            val = f"{int(kib) / 1024:.1f} MiB" if kib else r.get("note", "—")
            p(f"| {r['what']} | {val} |")
            if "supervisor" in r["what"] and kib:
                build = r["what"].rpartition("(")[2].rstrip(")") if "(" in r["what"] else ""
                bars.append((f"supervisor RSS ≤ 4 MiB{f' ({build})' if build else ''}", int(kib) <= 4096,
                             f"{int(kib) / 1024:.1f} MiB"))
        p("")

    # ------------------------------------------------------------ skipped ---
    if skips:
        p("Skipped: " + "; ".join(f"{PEER_LABEL.get(k, k)}: {v}" for k, v in skips.items()) + ".")
        p("")
    if bars:
        p("#### The bar (issue 9), this run")
        p("")
        p("| bar | met | measured |")
        p("|---|---|---|")
        for name, ok, txt in bars:
            p(f"| {name} | {'yes' if ok else '**no**'} | {txt} |")
        p("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
