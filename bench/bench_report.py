# ruff: noqa: E501, RUF001 - a markdown template: long prose lines and typographic characters on purpose
"""docs/benchmarks.md from one bench/run.py run: every figure comes from ``results``."""

from __future__ import annotations

import math
from typing import Any

TARGET_FLOOR_RATIO = 0.9
TARGET_ANCHOR_RATIO = 0.25
TARGET_UPGRADES = 1000.0
TARGET_P99 = 0.001
# "Flat": extauth's RSS grows by less than this per held connection (a per-connection dict
# entry with a lease id would already cost a few hundred bytes), or by less than the
# allocator noise in total (arenas grow with the handshakes themselves, not with what is held).
FLAT_BYTES_PER_CONN = 64.0
FLAT_NOISE_BYTES = 1 << 20


def n0(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.0f}"


def ms(us: float) -> str:
    if us is None or math.isnan(us):
        return "—"
    return f"{us / 1000:.2f} ms"


def usec(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    if math.isinf(seconds):
        return "> top bucket"
    return f"{seconds * 1e6:,.0f} µs"


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("**met**" if ok else "**missed**")


def targets(r: dict[str, Any]) -> dict[str, Any]:
    http = r.get("http", {})
    out: dict[str, Any] = {}
    if {"product", "noop", "jwt"} <= http.keys():
        p = http["product"]["rps"]
        out["floor_ratio"] = p / http["noop"]["rps"]
        out["anchor_ratio"] = p / http["jwt"]["rps"]
        out["anchor_cached_ratio"] = p / http["jwt_cached"]["rps"] if "jwt_cached" in http else math.nan
        out["ceiling_ratio"] = p / http["ceiling"]["rps"] if "ceiling" in http else math.nan
        out["floor_resp_ratio"] = p / http["floor_resp"]["rps"] if "floor_resp" in http else math.nan
        out["loop_ratio"] = (p / http["product_asyncio"]["rps"] if "product_asyncio" in http
                             else math.nan)
        if "product_const" in http:
            const = http["product_const"]["rps"]
            out["handler_ratio"] = p / const
            out["process_ratio"] = const / http["floor_resp"]["rps"] if "floor_resp" in http else math.nan
    if "half" in r:
        out["p99"] = r["half"]["check_p99"][0]
        out["p99_bound"] = r["half"]["check_p99"][1]
    if "churn" in r:
        c = r["churn"]
        out["exact"] = (c["leases_left"] == 0 and c["allowed"] == c["end_released"] == c["upgrades"])
        out["upgrades"] = c["rate"]
        refs = c.get("references", {})
        if refs.get("noop", {}).get("rate"):
            out["churn_floor_ratio"] = c["rate"] / refs["noop"]["rate"]
    if "held" in r:
        h = r["held"]
        rss = [x for x in h["rss"] if not x.get("after_close")]
        if h["held"]:
            out["rss_per_conn"] = (rss[-1]["extauth"] - rss[0]["extauth"]) / h["held"]
            half = rss[1] if len(rss) > 2 else rss[0]
            out["rss_per_conn_second_half"] = ((rss[-1]["extauth"] - half["extauth"])
                                               / max(1, h["held"] - half["held"]))
    return out


def summary(r: dict[str, Any]) -> str:
    t = targets(r)
    lines = ["", "=== extauth benchmark summary ==="]
    for entry in r.get("http", {}).values():
        lines.append(f"{entry['title']:<62} {entry['rps']:>10,.0f} req/s   p99 {ms(entry['p99_us'])}")
    if "floor_ratio" in t:
        spread = r["http"]["product"].get("round_ratios", {})
        lines.append(_ratio_line("4/3 (product / no-op floor)", t["floor_ratio"], spread.get("noop"),
                                 TARGET_FLOOR_RATIO))
        if "floor_resp" in r["http"]:
            lines.append(_ratio_line("4/3b (product / floor w/ allow)", t["floor_resp_ratio"],
                                     spread.get("floor_resp")))
        if "handler_ratio" in t:
            lines.append(_ratio_line("4/4c (product / constant Check)", t["handler_ratio"],
                                     spread.get("product_const")))
            lines.append(_ratio_line("4c/3b (constant Check / floor w/ allow)", t["process_ratio"],
                                     _process_rounds(r)))
        if "product_asyncio" in r["http"]:
            lines.append(_ratio_line("4/4a (uvloop / asyncio loop)", t["loop_ratio"], spread.get("product_asyncio")))
        lines.append(_ratio_line("4/2 (product / jwt_authn)", t["anchor_ratio"], spread.get("jwt"),
                                 TARGET_ANCHOR_RATIO))
    if "p99" in t:
        lines.append(f"check p99 at half load             {usec(t['p99'])}  target ≤ 1 ms  "
                     f"{'met' if t['p99_bound'] <= TARGET_P99 else 'MISSED'}")
    if "upgrades" in t:
        c = r["churn"]
        lines.append(f"WebSocket churn                     {t['upgrades']:,.0f} upgrades/s, handshake p50 "
                     f"{ms(c['handshake_p50_us'])} p99 {ms(c['handshake_p99_us'])}, exact accounting: "
                     f"{'yes' if t['exact'] else 'NO'}  target ≥ {TARGET_UPGRADES:,.0f}/s  "
                     f"{'met' if t['upgrades'] >= TARGET_UPGRADES and t['exact'] else 'MISSED'}")
        for name, label in _CHURN_REFERENCES:
            ref = c.get("references", {}).get(name)
            if ref:
                lines.append(f"  churn reference: {label:<29} {ref['rate']:,.0f} upgrades/s"
                             f"{_slices(ref)}")
        if "churn_floor_ratio" in t:
            lines.append(_ratio_line("5/5f (churn, product / no-op floor)", t["churn_floor_ratio"], None))
    if "held" in r:
        h = r["held"]
        lines.append(f"held connections                    {h['held']:,} of {h['target']:,} (cap {h['fd_cap']:,}), "
                     f"extauth RSS {t.get('rss_per_conn', math.nan):+.1f} B/conn, Redis "
                     f"{h['redis_used_per_lease']:.0f} B/lease (used_memory)")
    lines.append(f"runtime {r.get('runtime_seconds', 0):.0f} s" + (
        f"; FAILURES: {'; '.join(r['failures'])}" if r.get("failures") else ""))
    return "\n".join(lines)


def _c_tool(r: dict[str, Any], key: str, name: str, python_twin: str, what: str) -> str:
    """Which of a bench C tool and its Python twin ran (``results[key]``: "c" or "python")."""
    note = r.get(f"{key}_note", "")
    if r.get(key) == "c":
        return f"`bench/{name}.c` (built with `{note}`), one epoll process"
    return (f"**Python fallback** (`bench/{python_twin}`, {what}: {note}); with a C compiler the bench "
            f"builds `bench/{name}.c`, which costs the shared cores far less")


def render(r: dict[str, Any]) -> str:
    t = targets(r)
    m = r.get("machine", {})
    out: list[str] = []
    w = out.append
    w("# Benchmarks\n")
    w(f"Generated by `make bench` (`bench/run.py{' --quick' if r.get('quick') else ''}`) on {r.get('started')}; "
      f"the whole run took **{r.get('runtime_seconds', 0):.0f} s**. Every figure on this page was measured in "
      "that one run; rerun `make bench` to regenerate it.\n")
    if r.get("quick"):
        w("> **Quick mode**: short durations and a small held-connection target; a smoke test, "
          "not the reference figures.\n")
    if r.get("failures"):
        w("> **THIS RUN FAILED**: " + "; ".join(r["failures"]) + "\n")
    others = {k: e["cores"].get("others", 0.0) for k, e in r.get("http", {}).items()}
    if others and max(others.values()) > 0.2:
        w(f"> **Disturbed run**: other jobs used up to {max(others.values()):.2f} of the 2 cores during the HTTP "
          "scenarios (column *others* below; this machine is shared). Absolute figures are low by that much; the "
          "ratios between scenarios measured back to back are less affected.\n")
    w("## Machine\n")
    w("| | |\n|---|---|")
    w(f"| CPU | {m.get('cpu')} |")
    w(f"| cores | {m.get('cores')} (everything below shares them: Envoy, extauth, valkey, upstream, load "
      "generators) |")
    w(f"| RAM | {m.get('mem_bytes', 0) / 2**30:.1f} GiB |")
    w(f"| kernel | Linux {m.get('kernel')} |")
    w(f"| Python | {m.get('python')} (grpcio {m.get('grpcio')}, redis-py {m.get('redis_py')}, "
      f"websockets {m.get('websockets')}) |")
    if m.get("event_loop"):
        loop = f"uvloop {m.get('uvloop')}" if m["event_loop"] == "uvloop" else "asyncio's own"
        w(f"| event loop | {loop}: extauth's default (`event_loop: auto`), the no-op floors' too; "
          "4a runs extauth on asyncio's own |")
    w(f"| Envoy | {m.get('envoy')}, one worker thread (`--concurrency 1`) |")
    tool = r.get("load_tool")
    if tool == "wrk":
        w(f"| HTTP load | {m.get('wrk')}, 1 thread, 64 keep-alive connections |")
    else:
        w("| HTTP load | **Python fallback** (`bench/httpload.py`): wrk was not on PATH. "
          "Install it (`apt-get install wrk`, `brew install wrk`) for better figures: the Python "
          "generator spends a core of its own and caps the fastest scenarios |")
    churn_client = _c_tool(r, "churn_tool", "wschurn", "ws_clients.py", "lean asyncio client")
    w(f"| WebSocket clients | churn: {churn_client}; held connections: `websockets` asyncio clients "
      "(`bench/ws_clients.py`) in separate processes |")
    w(f"| WebSocket upstream | {_c_tool(r, 'upstream_tool', 'wsecho', 'ws_upstream.py', 'bare asyncio protocol')} |")
    nofile = m.get("nofile", ["?", "?"])
    w(f"| RLIMIT_NOFILE | soft {nofile[0]}, hard {nofile[1]} (soft raised to hard by the bench) |")
    w("")
    _headline(w, r, t)
    _http(w, r, t)
    _half(w, r)
    _churn(w, r)
    _held(w, r, t)
    _profiles(w, r)
    _inproc(w, r)
    _method(w, r, t)
    return "\n".join(out) + "\n"


def _ratio_line(label: str, value: float, rounds: list[float] | None, target: float | None = None) -> str:
    """One ratio of the console summary: against its target, or for information."""
    verdict_ = "(info)" if target is None else f"target ≥ {target}  {'met' if value >= target else 'MISSED'}"
    return f"ratio {label:<40} {value:.3f}  {verdict_}{_spread(rounds)}"


def _process_rounds(r: dict[str, Any]) -> list[float] | None:
    """4c/3b's per-round ratios (kept on 4c's entry: the product's are the product's own)."""
    rounds: list[float] | None = r["http"]["product_const"].get("round_ratios", {}).get("floor_resp")
    return rounds


def _spread(ratios: list[float] | None) -> str:
    """The range of the per-round ratios behind a whole-run ratio."""
    if not ratios or len(ratios) < 2:
        return ""
    return f" (rounds {min(ratios):.2f}-{max(ratios):.2f})"


def _headline(w: Any, r: dict[str, Any], t: dict[str, Any]) -> None:
    w("## Results and targets\n")
    w("| # | scenario | figure | target | |")
    w("|---|---|---|---|---|")
    http = r.get("http", {})
    for entry in http.values():
        w(f"| {entry['title'].split('.', 1)[0]} | {entry['title'].split('. ', 1)[1]} | "
          f"**{n0(entry['rps'])} req/s** (p50 {ms(entry['p50_us'])}, p99 {ms(entry['p99_us'])}) | | |")
    if "floor_ratio" in t:
        spread = http["product"].get("round_ratios", {})
        w(f"| 4/3 | product ÷ framework floor | **{t['floor_ratio']:.3f}**{_spread(spread.get('noop'))} | "
          f"≥ {TARGET_FLOOR_RATIO} | {verdict(t['floor_ratio'] >= TARGET_FLOOR_RATIO)} |")
        w(f"| 4/2 | product ÷ native jwt_authn | **{t['anchor_ratio']:.3f}**{_spread(spread.get('jwt'))} | "
          f"≥ {TARGET_ANCHOR_RATIO} | {verdict(t['anchor_ratio'] >= TARGET_ANCHOR_RATIO)} |")
        w(f"| 4/3b | product ÷ floor answering the product's allow (extauth's own code alone) | "
          f"{t['floor_resp_ratio']:.3f}{_spread(spread.get('floor_resp'))} | (info) | |")
        if "handler_ratio" in t:
            w(f"| 4/4c | product ÷ its own process with a constant Check (what the Check handler costs) | "
              f"{t['handler_ratio']:.3f}{_spread(spread.get('product_const'))} | (info) | |")
            w(f"| 4c/3b | extauth's process with a constant Check ÷ the floor answering the same bytes (what "
              f"the rest of the process costs) | {t['process_ratio']:.3f}{_spread(_process_rounds(r))} "
              "| (info) | |")
        w(f"| 4/4a | product on uvloop ÷ the same on asyncio's loop (what the default event loop is worth) | "
          f"{t['loop_ratio']:.3f}{_spread(spread.get('product_asyncio'))} | (info) | |")
        w(f"| 4/2b | product ÷ jwt_authn with its JWT cache | {t['anchor_cached_ratio']:.2f} | (info) | |")
        w(f"| 4/1 | product ÷ ceiling | {t['ceiling_ratio']:.2f} | (info) | |")
    if "half" in r:
        h = r["half"]
        w(f"| ½ | check latency p99 at half of max load ({n0(h['rps'])} req/s), "
          f"`extauth_check_duration_seconds` | **{usec(h['check_p99'][0])}** (bucket ≤ "
          f"{usec(h['check_p99'][1])}) | ≤ 1 ms | {verdict(h['check_p99'][1] <= TARGET_P99)} |")
    if "churn" in r:
        c = r["churn"]
        w(f"| 5 | WebSocket churn (connect, one echo, close) on Redis | **{n0(c['rate'])} upgrades/s**, "
          f"handshake p50 {ms(c['handshake_p50_us'])}, p99 {ms(c['handshake_p99_us'])}; exact accounting: "
          f"{'yes' if t['exact'] else '**no**'} ({n0(c['upgrades'])} upgrades = {n0(c['allowed'])} allowed = "
          f"{n0(c['end_released'])} released, {c['leases_left']} leases left) | ≥ 1,000/s, exact | "
          f"{verdict(t['upgrades'] >= TARGET_UPGRADES and t['exact'])} |")
        refs = c.get("references", {})
        for key, (name, label) in zip(("5f", "5c"), _CHURN_REFERENCES, strict=True):
            if name in refs:
                w(f"| {key} | churn reference: {label} (same clients and upstream) | "
                  f"{n0(refs[name]['rate'])} upgrades/s{_slices(refs[name])} | (info) | |")
        if "churn_floor_ratio" in t:
            w(f"| 5/5f | churn, product ÷ no-op floor | {t['churn_floor_ratio']:.2f} | (info) | |")
    if "held" in r:
        h = r["held"]
        flat = t.get("rss_per_conn")
        ok = None if flat is None else (abs(flat) < FLAT_BYTES_PER_CONN
                                        or abs(flat) * h["held"] < FLAT_NOISE_BYTES)
        w(f"| 6 | held WebSockets | **{n0(h['held'])} held** (target {n0(h['target'])}); extauth RSS "
          f"{mib(h['rss'][0]['extauth'])} → {mib([x for x in h['rss'] if not x.get('after_close')][-1]['extauth'])} "
          f"({flat:+.1f} B per connection); Redis {h['redis_used_per_lease']:.0f} B per lease (used_memory), "
          f"{h['redis_usage_per_lease']:.0f} B (MEMORY USAGE) | flat memory | {verdict(ok)} |")
    w("")
    missed = []
    if "floor_ratio" in t and t["floor_ratio"] < TARGET_FLOOR_RATIO:
        missed.append("4/3")
    if "anchor_ratio" in t and t["anchor_ratio"] < TARGET_ANCHOR_RATIO:
        missed.append("4/2")
    if "upgrades" in t and not (t["upgrades"] >= TARGET_UPGRADES and t["exact"]):
        missed.append("upgrade rate")
    if "p99_bound" in t and t["p99_bound"] > TARGET_P99:
        missed.append("p99 at half load")
    if missed:
        w(f"Missed in this run: **{', '.join(missed)}**. Where the time goes is measured below "
          "(CPU per request by process, then cProfile of extauth); the short version is in "
          "[Findings](#findings).\n")


def _cores(entry: dict[str, Any], name: str) -> str:
    v = entry.get("cores", {}).get(name)
    return "—" if v is None else f"{v:.2f}"


def _http(w: Any, r: dict[str, Any], t: dict[str, Any]) -> None:
    http = r.get("http")
    if not http:
        return
    w("## HTTP scenarios (saturation)\n")
    first = next(iter(http.values()))
    w(f"{first['connections']} connections, {first['elapsed']:.0f} s each after a 1 s warm-up, same Envoy process, "
      "one listener per scenario (identical HCM settings; only the auth filter differs), all answering with a "
      "`direct_response` so no upstream is involved. The native anchor (2), the floors (3, 3b) and the "
      "product (4, 4c with a constant Check, and 4a on the other event loop), whose ratios matter, are "
      "measured in interleaved 2-second slices, 2 3 3b 4 4c 4a 4a 4c 4 3b 3 2, "
      f"{len(http['product']['runs_rps']) // 2} rounds, and each is the sum of its slices: this machine's speed "
      "drifts by 10-20% within a minute, a ratio of two runs taken one after the other carries that drift "
      "whole, and the mirrored order cancels a steady drift. The ratios' *rounds* ranges are each round's own "
      "ratio, the run-to-run noise the whole-run figure averages (each slice's rate is in the JSON results). "
      "*req/s* counts 2xx answers only: an authz service that falls behind by Envoy's ext_authz timeout "
      "(500 ms) is answered 503 at once, and a scenario with more than 1% of those fails the run. *cores* = CPU "
      "seconds per second of each process during the run (2.00 = both cores); *µs/req* = that CPU divided by "
      "requests.\n")
    w("*others* = CPU used on the machine by anything else meanwhile (other jobs, kernel); *steal* = CPU the "
      "hypervisor took. Non-zero values mean the run was disturbed and its figures are low.\n")
    w("| scenario | req/s | p50 | p99 | non-2xx | Envoy cores | authz cores | load-gen cores | others | steal | "
      "Envoy µs/req | authz µs/req |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, e in http.items():
        authz = key if key in ("noop", "floor_resp", "product_asyncio", "product_const") else (
            "extauth" if key == "product" else None)
        per = e.get("cpu_us_per_request", {})
        w(f"| {e['title']} | {n0(e['rps'])} | {ms(e['p50_us'])} | {ms(e['p99_us'])} | {e['non2xx']} | "
          f"{_cores(e, 'envoy')} | {_cores(e, authz) if authz else '—'} | {_cores(e, 'load generator')} | "
          f"{_cores(e, 'others')} | {_cores(e, 'steal')} | "
          f"{n0(per.get('envoy', math.nan))} | {n0(per.get(authz, math.nan)) if authz else '—'} |")
    p = http.get("product", {})
    if "allowed" in p:
        w(f"\nThe product run was checked: extauth counted {n0(p['allowed'])} allowed and {n0(p['denied'])} "
          "denied decisions for the `api` policy while the load generator counted "
          f"{n0(p['requests'])} responses, all 2xx. Of those decisions, {n0(p.get('memo_hits', 0))} were "
          "answered from the allow memo (every request here repeats one token from one client: the "
          "best case for the memo, and the common one for an API client).\n")
    if "floor_ratio" in t:
        noop, prod = http["noop"], http["product"]
        extra = (prod.get("cpu_us_per_request", {}).get("extauth", math.nan)
                 - noop.get("cpu_us_per_request", {}).get("noop", math.nan))
        w(f"The product's authz process spends **{n0(extra)} µs more CPU per request** than the no-op servicer "
          "on the same grpc.aio stack; both run on one Python thread (event loop) plus gRPC's C-core threads, so "
          "that per-request CPU sets the ceiling of scenarios 3 and 4.\n")


def _half(w: Any, r: dict[str, Any]) -> None:
    h = r.get("half")
    if not h:
        return
    w("## Check latency at half of the product's max load\n")
    w(f"A paced load ({h['connections']} connections, fixed delay between requests, wrk Lua `delay()` or "
      f"the Python generator's open-loop schedule) at {n0(h['rps'])} req/s = "
      f"{h['fraction_of_max'] * 100:.0f}% of scenario 4's max; extauth's histograms were scraped before and "
      f"after, and the quantiles estimated from the bucket deltas ({n0(h['checks'])} checks).\n")
    w("| measure | p50 | p99 | ≤ 1 ms |")
    w("|---|---:|---:|---:|")
    w(f"| `extauth_check_duration_seconds` (the product's metric: from the gRPC handler's start, request "
      f"translation included, to its decision) | {usec(h['check_p50'][0])} | "
      f"{usec(h['check_p99'][0])} (bucket ≤ {usec(h['check_p99'][1])}) | "
      f"{h['check_share_le_1ms'] * 100:.2f}% |")
    w(f"| end to end at the client (through Envoy, incl. gRPC transport and scheduling on 2 shared cores) | "
      f"{ms(h['e2e_p50_us'])} | {ms(h['e2e_p99_us'])} | |")
    w("")


# The churn references (bench/run.py CHURN_REFERENCES), as the report names them.
_CHURN_REFERENCES = (("noop", "ext_authz to the no-op servicer"), ("ceiling", "no auth at all"))


def _slices(ref: dict[str, Any]) -> str:
    rates = ref.get("slice_rates", [])
    return f" (slices {', '.join(n0(x) for x in rates)})" if len(rates) > 1 else ""


def _churn_references(w: Any, c: dict[str, Any]) -> None:
    refs = c.get("references", {})
    if not refs:
        return
    names = ["extauth", "noop", "envoy", "upstream", "valkey", "load generator"]
    w("\n**The same churn against references**, one slice each just before the product's churn and "
      "(full run) one just after, on the same clients, upstream and Envoy. The no-op servicer's allow "
      "carries no lease, so Envoy streams no access-log entries for it and Redis is not used.\n")
    w("| listener | upgrades/s | " + " | ".join(f"{n} ms/upgrade" for n in names) + " | all |")
    w("|---|---:|" + "---:|" * (len(names) + 1))
    rows = [("product (extauth, quotas on valkey)", c)] + [
        (label, refs[name]) for name, label in _CHURN_REFERENCES if name in refs]
    for label, row in rows:
        per = row["cpu_ms_per_upgrade"]
        w(f"| {label} | {n0(row['rate'])} | " + " | ".join(f"{per.get(n, 0.0):.2f}" for n in names)
          + f" | {sum(per.values()):.2f} |")
    w("")


def _churn(w: Any, r: dict[str, Any]) -> None:
    c = r.get("churn")
    if not c:
        return
    w("## WebSocket churn (scenario 5)\n")
    procs = "1 client process" if c["procs"] == 1 else f"{c['procs']} client processes"
    w(f"{procs} × {c['lanes']} lanes = {c['procs'] * c['lanes']} upgrades in flight, "
      f"{c['seconds']:.1f} s after a warm-up; each lane: connect (upgrade through Envoy → extauth origin + JWT + "
      "per-user and per-IP quota on valkey → echo upstream), send one message, read the echo, close. "
      "Quotas: 100 connections per user (200 users), 50,000 per IP.\n")
    w("| | |\n|---|---|")
    w(f"| upgrades/s | **{n0(c['rate'])}** |")
    w(f"| handshake latency (client-side connect(), closed loop at saturation) | p50 {ms(c['handshake_p50_us'])}, "
      f"p99 {ms(c['handshake_p99_us'])} |")
    w(f"| server-side Check (`extauth_check_duration_seconds`, store acquire included) | "
      f"p50 {usec(c['check_p50'][0])}, p99 {usec(c['check_p99'][0])} |")
    w(f"| store acquire as extauth sees it (`extauth_store_call_duration_seconds{{op=\"acquire\"}}`) | "
      f"p50 {usec(c['acquire_p50'][0])}, p99 {usec(c['acquire_p99'][0])} |")
    w(f"| client statuses | {', '.join(f'{k}: {v:,}' for k, v in sorted(c['statuses'].items()))} |")
    w(f"| client errors | {', '.join(f'{k}: {v}' for k, v in c['errors'].items()) or 'none'} |")
    w("")
    w("**Accounting** (exact means every number in this table agrees and nothing is left):\n")
    w("| upgrades seen by clients | allowed by extauth | denied | end entries released | "
      "tunnel entries refreshed | store errors | leases left after drain | drain time |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|")
    w(f"| {n0(c['upgrades'])} | {n0(c['allowed'])} | {n0(c['denied'])} | {n0(c['end_released'])} | "
      f"{n0(c['tunnel_refreshed'])} | {n0(c['store_errors'])} | **{c['leases_left']}** | {c['drain_seconds']:.1f} s |")
    env = c.get("envoy", {})
    if env:
        w("\nEnvoy's own counters over the same run: " + ", ".join(f"`{k}` {v:,}" for k, v in sorted(env.items())
                                                                   if v) + ".")
    rt, refs = c["round_trips"], c["refs"]
    allowed = max(1.0, c["allowed"])
    rel = max(1.0, refs.get("release", 0))
    ref = max(1.0, refs.get("refresh", 0))
    w("\n**Round trips to Redis** (network writes counted inside extauth, on its request-path connection "
      "(`extauth.store.resp`) and its redis-py pool; a pipeline is one):\n")
    w("| operation | round trips | per lease |")
    w("|---|---:|---:|")
    w(f"| acquire (one EVALSHA: ban, both quotas, record) | {n0(rt['acquire'])} for {n0(c['allowed'])} upgrades | "
      f"**{rt['acquire'] / allowed:.2f} per upgrade** |")
    w(f"| refresh on tunnel-established entries (pipelined EVALSHA, batched per access-log message) | "
      f"{n0(rt['refresh'])} for {n0(refs.get('refresh', 0))} leases | {rt['refresh'] / ref:.3f} |")
    w(f"| release on end entries (pipelined ZREM, batched per access-log message) | {n0(rt['release'])} for "
      f"{n0(refs.get('release', 0))} leases | **{rt['release'] / rel:.3f} per release** |")
    w(f"| new connections' setup (CLIENT SETNAME, SETINFO…) | {n0(rt['connection_setup'])} | |")
    w(f"| other (the jail's ban refresh once a second, the lease-key check every 5 s) | {n0(rt['other'])} | |")
    w("")
    w("So one WebSocket costs exactly one Redis round trip on the request path (the acquire), and its refresh "
      f"and release ride on batched pipelines: {refs.get('release', 0) / max(1.0, rt['release']):.1f} releases "
      "per round trip in this run (Envoy's gRPC access logger flushes every 0.2 s or every 16 KiB of entries).\n")
    cmds = c.get("redis_commands", {})
    if cmds:
        w("Commands the server executed (INFO commandstats delta, scripts' inner commands included): "
          + ", ".join(f"{k} {v:,}" for k, v in sorted(cmds.items(), key=lambda kv: -kv[1])) + ".\n")
    w("CPU per upgrade by process (cores ÷ upgrades/s):\n")
    w("| " + " | ".join(c["cores"].keys()) + " |")
    w("|" + "---:|" * len(c["cores"]))
    w("| " + " | ".join(f"{v:.2f} cores" for v in c["cores"].values()) + " |")
    w("| " + " | ".join(f"{c['cpu_ms_per_upgrade'].get(k, math.nan):.2f} ms" for k in c["cores"]) + " |")
    per = c["cpu_ms_per_upgrade"]
    total = sum(per.values())
    if total and per.get("extauth"):
        w(f"\nThe machine spent **{total:.2f} ms of CPU per upgrade** in all, so its two cores cap churn at "
          f"about {n0(2000 / total)} upgrades/s with every component on them. extauth's own "
          f"{per['extauth']:.2f} ms per upgrade means **one extauth core takes about "
          f"{n0(1000 / per['extauth'])} upgrades/s** (finding 4).")
    _churn_references(w, c)


def _held(w: Any, r: dict[str, Any], t: dict[str, Any]) -> None:
    h = r.get("held")
    if not h:
        return
    w("## Held connections (scenario 6)\n")
    reason = ""
    if h["target"] < h["requested"]:
        reason = (f" The target was capped at {n0(h['target'])}: RLIMIT_NOFILE's hard limit here is "
                  f"{n0(h['nofile_hard'])} (it cannot be raised without CAP_SYS_RESOURCE) and Envoy holds two "
                  "descriptors per proxied WebSocket (downstream and upstream), so one Envoy process cannot hold "
                  "10,000.")
    w(f"Requested {n0(h['requested'])}, target {n0(h['target'])}, **held {n0(h['held'])}** "
      f"(opened in {h['open_seconds']:.1f} s by 4 client processes in two waves, {n0(h['open_rate'])} upgrades/s, "
      f"handshake p50 {ms(h['handshake_p50_us'])}, p99 {ms(h['handshake_p99_us'])}; Envoy had {n0(h['envoy_fds'])} "
      f"descriptors open at the peak).{reason}\n")
    w(f"Client statuses: {', '.join(f'{k}: {v:,}' for k, v in sorted(h['statuses'].items()))}; errors: "
      f"{', '.join(f'{k}: {v}' for k, v in h['errors'].items()) or 'none'}. Still open when the close was "
      f"requested: {n0(h['alive_before_close'])}. Leases counted in the store at the peak: "
      f"{n0(h['leases_full'])} (= held connections).\n")
    w("| held connections | extauth RSS | Envoy RSS | leases in the store |")
    w("|---:|---:|---:|---:|")
    for x in h["rss"]:
        label = "0 (after closing all)" if x.get("after_close") else n0(x["held"])
        w(f"| {label} | {mib(x['extauth'])} | {mib(x['envoy'])} | {n0(x.get('leases', 0))} |")
    w("")
    if "rss_per_conn" in t:
        growth = t["rss_per_conn"] * h["held"]
        flat = abs(t["rss_per_conn"]) < FLAT_BYTES_PER_CONN or abs(growth) < FLAT_NOISE_BYTES
        w(f"extauth's RSS changed by **{t['rss_per_conn']:+.1f} bytes per held connection** over the whole range "
          f"({growth / 2**20:+.2f} MiB in all; {t['rss_per_conn_second_half']:+.1f} B/conn over the second half). "
          + ("Flat, as designed: extauth keeps no per-connection state (a per-connection entry holding a lease "
             "id would cost a few hundred bytes each); a held WebSocket lives in Envoy (see its RSS) and as "
             "two ZSET members in Redis.\n" if flat else
             f"**Not flat** by this bench's rule (< {FLAT_BYTES_PER_CONN:.0f} B per connection, or < 1 MiB in "
             "all): look for per-connection state in extauth.\n"))
    base, full = h["redis_base"], h["redis_full"]
    w("| Redis | before | with all held | per lease |")
    w("|---|---:|---:|---:|")
    w(f"| INFO used_memory | {mib(base['used_memory'])} | {mib(full['used_memory'])} | "
      f"**{h['redis_used_per_lease']:.0f} B** |")
    w(f"| Σ MEMORY USAGE of lease keys | {n0(base['memory_usage_sum'])} B | {n0(full['memory_usage_sum'])} B | "
      f"**{h['redis_usage_per_lease']:.0f} B** |")
    w(f"| lease keys (ZSETs), members | {n0(base['lease_keys'])}, {n0(base['members'])} | "
      f"{n0(full['lease_keys'])}, {n0(full['members'])} | |")
    w(f"\nEncodings at the peak: {', '.join(f'{k} ×{v}' for k, v in full['encodings'].items())}. Every lease is "
      "a member of its user's ZSET and of its IP's ZSET; all clients here share 127.0.0.1, so the one IP "
      "ZSET holds every lease (skiplist encoding, the costly case). "
      f"Closing all took {h['close_seconds']:.1f} s including the drain; leases left afterwards: "
      f"**{h['leases_left']}**.\n")


def _profiles(w: Any, r: dict[str, Any]) -> None:
    for key, title in (("profile_http", "plain HTTP at saturation (scenario 4)"),
                       ("profile_churn", "WebSocket churn (scenario 5, 8 upgrades in flight)")):
        p = r.get(key)
        if not p:
            continue
        w(f"## Where extauth's time goes: {title}\n")
        w(f"cProfile of the event-loop thread ({p['total_seconds']:.1f} s of profiled time; the profiler slows "
          "Python code down, so read shares, not absolute times; gRPC's C-core threads are not in it). "
          "Indented rows are part of the row above them.\n")
        w("| part | seconds | share |")
        w("|---|---:|---:|")
        for g in p["groups"]:
            w(f"| {g['label']} | {g['seconds']:.2f} | {g['share'] * 100:.1f}% |")
        w("\nTop functions by own time:\n")
        w("| function | calls | own s | cumulative s | own share |")
        w("|---|---:|---:|---:|---:|")
        for row in p["top"][:12]:
            fn = row["function"].replace("|", "\\|")
            w(f"| `{fn}` | {row['ncalls']:,} | {row['tottime']:.3f} | {row['cumtime']:.3f} | "
              f"{row['share'] * 100:.1f}% |")
        w("")


def _inproc(w: Any, r: dict[str, Any]) -> None:
    inproc = r.get("inproc")
    if not inproc:
        return
    w("## In-process figures\n")
    w("Run as part of `make bench`, before the stack starts (the machine otherwise idle).\n")
    w("### Decision pipeline (`bench/decision_bench.py`)\n")
    w(inproc.get("decision", "").strip() + "\n")
    w("### Store (`bench/store_bench.py`)\n")
    text = inproc.get("store", "").strip()
    w("\n".join("####" + line[2:] if line.startswith("## ") else line for line in text.splitlines()))
    w("")


def _finding_churn(w: Any, r: dict[str, Any]) -> None:
    text = ("4. **Churn: what one upgrade costs the two cores, and what the product adds.** The churn table's "
            "CPU per upgrade, "
            "summed over Envoy, extauth, valkey, the upstream and the client, is what one upgrade costs the "
            "machine; at 2 cores that sum sets the ceiling on upgrades per second. extauth's own share (a gRPC "
            "Check, one EVALSHA and its part of two access-log entries) is shown as the upgrades one extauth "
            "core would take.")
    c = r.get("churn", {})
    refs = c.get("references", {})
    if "noop" in refs and "ceiling" in refs:
        noop, ceiling = refs["noop"], refs["ceiling"]
        mine, floor = c["cpu_ms_per_upgrade"], noop["cpu_ms_per_upgrade"]
        extra = mine.get("extauth", 0.0) - floor.get("noop", 0.0)
        envoy_extra = mine.get("envoy", 0.0) - floor.get("envoy", 0.0)
        total = sum(mine.values())
        bound = 2000.0 / (total - extra) if total > extra > 0 else math.nan
        text += (f" Measured in the same run: the same clients reach {n0(ceiling['rate'])} upgrades/s through "
                 f"Envoy with no auth at all, and {n0(noop['rate'])}/s with ext_authz to a servicer that does "
                 f"nothing. The product reaches {c['rate'] / noop['rate']:.2f} of that floor; its process "
                 f"spends {extra:.2f} ms more CPU per upgrade than the no-op servicer (the pipeline, the "
                 f"acquire, the access-log stream and its releases), Envoy {envoy_extra:.2f} ms more (two "
                 f"access-log entries per WebSocket, the lease metadata) and valkey "
                 f"{mine.get('valkey', 0.0):.2f} ms. Were extauth's process no dearer than the no-op servicer, "
                 f"an upgrade would cost the machine {total - extra:.2f} ms, about {n0(bound)} upgrades/s on "
                 "two cores")
        if c["rate"] >= TARGET_UPGRADES:
            text += (f". The product itself reached {n0(c['rate'])}/s in this run, over the "
                     f"{n0(TARGET_UPGRADES)}/s target with every component on the same two cores.")
        elif bound < TARGET_UPGRADES:
            text += (f": {n0(TARGET_UPGRADES)}/s here would take an extauth that costs no more than a "
                     "servicer doing nothing, or cores that the load generator, the upstream and Envoy do "
                     "not share.")
        else:
            text += (f": in this run, extauth's own {extra:.2f} ms per upgrade over the no-op servicer is "
                     f"what stands between the product and {n0(TARGET_UPGRADES)}/s on this machine.")
    w(text)


def _inproc_us(r: dict[str, Any], row: str) -> float:
    """A median from the in-process decision bench's tables, by the start of its row's name."""
    for line in r.get("inproc", {}).get("decision", "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith(row):
            try:
                return float(cells[1])
            except ValueError:
                return math.nan
    return math.nan


def _finding_floor(w: Any, r: dict[str, Any], t: dict[str, Any]) -> None:
    """Finding 2: the 4/3 gap split into the answer's cost, the process's and the Check handler's."""
    http = r.get("http", {})
    if not {"noop", "floor_resp", "product"} <= http.keys():
        return
    keys = ("noop", "floor_resp", "product", "product_const")
    cpu = {k: http[k].get("cpu_us_per_request", {}) if k in http else {} for k in keys}

    def more(a: str, b: str, proc_a: str, proc_b: str) -> str:
        return n0(cpu[a].get(proc_a, math.nan) - cpu[b].get(proc_b, math.nan))

    answer_share = 1 - http["floor_resp"]["rps"] / http["noop"]["rps"]
    w("2. **Where the 4/3 gap goes.** Three side-by-side steps split it. *The answer* (3 to 3b): the same "
      "no-op servicer answering extauth's own allow for the bench request. Envoy spends "
      f"{more('floor_resp', 'noop', 'envoy', 'envoy')} µs more CPU per request applying it (the identity "
      "header, the credential removal, four metadata fields) and the servicer "
      f"{more('floor_resp', 'noop', 'floor_resp', 'noop')} µs more sending it: {answer_share * 100:.0f}% of "
      "the floor's rate in this run is the price of what the answer does, whoever computes it.")
    if "product_const" in http:
        process_free = t["process_ratio"] >= 0.95
        w(f"\n   *The process* (3b to 4c, ratio {t['process_ratio']:.2f}): extauth's own process, with its "
          "services, store, jail, metrics and event loop, but a Check that answers those same bytes without "
          "reading the request. Its CPU per request differs from the servicer's by "
          f"{more('product_const', 'floor_resp', 'product_const', 'floor_resp')} µs"
          + (": being extauth's process costs about nothing." if process_free else "."))
        hit = _inproc_us(r, "Check handler, plain-HTTP allow-memo hit")
        key = _inproc_us(r, "of which the memo key")
        digest = _inproc_us(r, "of which the key's credential digest")
        const = _inproc_us(r, "constant handler")
        w(f"\n   *The Check handler* (4c to 4, ratio {t['handler_ratio']:.2f}) is the rest: extauth's process "
          f"spends {more('product', 'product_const', 'extauth', 'product_const')} µs more CPU per request in 4 "
          "than in 4c, and Envoy, applying the same answer but for the decision id, "
          f"{more('product', 'product_const', 'envoy', 'envoy')} µs more. In-process (the *Check handler* table in "
          f"[In-process figures](#in-process-figures)) the handler's memo hit costs {hit:.1f} µs against the constant handler's "
          f"{const:.1f}: its key {key:.1f} µs, of which the credential's digest {digest:.1f} (BLAKE2b, the "
          "fastest of hashlib's digests here: SHA-256 took 2.1 µs and MD5 1.5 on this token), and the rest "
          "reading the request's fields from the protobuf message; then the ban check, two metrics and the "
          "new decision id. Under saturation the same Python costs several times that: a `perf` profile of "
          "4 and 4c in one run (outside the bench) put 36 µs per request more in the interpreter (libpython) "
          "and 6 µs more in the protobuf module for 4, its caches shared with Envoy, gRPC's threads and the "
          "kernel on two busy cores; and a slower answer leaves fewer requests per wake-up for every process "
          "in the chain (gRPC frames, epoll rounds, event-loop iterations), so Envoy's share rises with it."
          + (" Nothing in the process but the handler's own Python separates 4 from the floor, and the "
             "handler is one dictionary lookup keyed by a digest." if process_free else ""))
    w("\n   The round ranges show how far one 2-second round strays from the run's figure on this machine: in "
      "eight 6-second runs outside the bench, with no steal, the no-op servicer alone measured 2,564-3,585 "
      "req/s and 290-401 µs of CPU per request. Nor does the order of the slices bias the ratio: outside "
      "the bench, six rounds in its order and six in a plain 3 4 4 3 order, alternated on one stack, gave "
      "4/3 of 0.94 and 0.86, single rounds 0.75-1.02. Before these figures: with a warm token cache the full "
      "pipeline cost about 40 µs per check in-process and 4/3 was 0.73; two changes took that back. The "
      "two metrics every check touches are lock-free (prometheus_client locks on every inc/observe, about "
      "4 µs a check), and the **allow memo** (`extauth/memo.py`, `docs/operations.md`) answers a repeated "
      "plain-HTTP allow with the serialized response already built plus a new decision id (the *memo hits* "
      "above count them). WebSocket upgrades, which need a lease, always take the whole pipeline.")
    w("")


def _method(w: Any, r: dict[str, Any], t: dict[str, Any]) -> None:
    w("## Method and caveats\n")
    w("- **One machine, 2 cores, everything on it.** Envoy (one worker), extauth, valkey-server, the echo "
      "upstream and the load generators compete for the same two cores; the *cores* columns show who used "
      "what. Ratios between scenarios are more meaningful than absolute numbers.")
    w("- **The churn client is C, for the reason wrk is.** Every CPU second the load generator spends is "
      "taken from Envoy and extauth on this box. A `websockets` client costs about 0.6 ms of CPU per "
      "connect-echo-close cycle (asyncio client and sans-I/O protocol alike) and a lean asyncio client "
      "(`bench/ws_clients.py`, the fallback when there is no C compiler, or with `--python-churn`) about "
      "0.8 ms under load, a quarter of what the whole machine spends per upgrade. `bench/wschurn.c`, built "
      "by the bench with the system compiler, costs about 0.1 ms (the churn table's *load generator* "
      "column). Both speak the same RFC 6455 cycle: a fresh random `Sec-WebSocket-Key` per connection and "
      "the `Sec-WebSocket-Accept` checked (a 101 without it counts as a failure), a masked text frame and "
      "its echo, the close handshake. The held connections use `websockets` clients.")
    w("- **The echo upstream is C too.** A real deployment runs its upstream on other machines; here it takes "
      "the same two cores. `bench/ws_upstream.py`, a bare asyncio protocol and the fallback without a C compiler "
      "(or with `--python-upstream`), costs about 0.3 ms of CPU per connection (accept, handshake, echo, close); "
      "`bench/wsecho.c`, its C twin, under 0.1 ms (the churn table's *upstream* column). Both answer the upgrade "
      "with the RFC 6455 `Sec-WebSocket-Accept`, echo data frames as they came, answer ping and close, and close "
      "TCP after the close handshake (`tests/test_bench_upstream.py` runs both against a `websockets` client).")
    w("- **Envoy bootstrap**: produced by `extauth envoy-config` (the product's generator), then adjusted in "
      "`bench/bench_stack.py` only: one listener per scenario with identical HCM settings; the stdout access "
      "log removed everywhere (the gRPC access log that releases leases is kept); `delayed_close_timeout: 0s` "
      "(with Envoy's default 1 s, every WebSocket closed by an RFC 6455 client lingers 1 s: the client waits for "
      "the server to close TCP and Envoy waits for the client; measured 1,000 ms per close() through Envoy "
      "vs 0.5 ms direct); circuit breakers raised on the upstream cluster (Envoy's default 1,024 connections "
      "and requests per cluster would cap held WebSockets at 1,024).")
    w("- **extauth** runs through `bench/extauth_serve.py`: `extauth serve` plus bench-only instrumentation "
      "(Redis round-trip counters, cProfile on SIGUSR1/2); nothing on the Check path, whose latency "
      "comes from the product's own histogram. Config: `store_timeout_ms` **250** (not the default 50: see finding 1), lease TTL 60 s, access-log "
      "flush interval 20 s, metrics sampling once an hour (so its SCAN stays out of the figures).")
    w("- **Origin on plain HTTP**: the `api` policy lists the origin and the requests carry it, but the "
      "pipeline checks `Origin` on WebSocket upgrades only (browsers' CORS covers plain HTTP), so scenario 4 "
      "exercises policy selection, token extraction, the verified-token cache and identity headers; scenario 5 "
      "exercises the origin check too.")
    w("- **Latency quantiles from histograms** are linear interpolations inside a bucket; the bucket's upper "
      "bound is shown next to the p99 so the target check does not depend on the interpolation.")
    w("- **Native anchor**: `jwt_authn` verifies RS256 on every request by default; 2b enables its JWT cache "
      "(`jwt_cache_config`), the closest match to extauth's verified-token cache. The 4/2 target is judged "
      "against the default configuration (scenario 2).")
    w("")
    w("## Findings\n")
    w("Measured while building this benchmark (the figures above are from the run; the causes were "
      "isolated with the bench's own tools):\n")
    w("1. **A store timeout could leak a lease until its TTL (fixed).** `store_timeout_ms` is enforced "
      "around the Redis call, so it includes event-loop queueing: when the loop stalls, an acquire can time "
      "out after its script already ran. The client got 503 `store_unavailable` while the lease held a slot "
      "for a whole TTL, and once the breaker opened, access-log releases failed fast too. Seen while building "
      "this bench with the default 50 ms (1-2 leases left in a full run; 66 at 64 upgrades in flight). "
      "Fixed in `GuardedStore`: a timed-out acquire releases its lease id in the background, and access-log "
      "refreshes and releases are never refused by the breaker. The bench still runs extauth with 250 ms "
      "(the e2e harness's value): at 50 ms a saturated 2-core box answers some upgrades 503, which is the "
      "designed overload behaviour but would make the churn figure measure refusals.")
    _finding_floor(w, r, t)
    w("3. **Envoy defaults that matter for WebSockets (fixed in `envoy/envoy.yaml` and `extauth "
      "envoy-config`).** With the default circuit breakers (1,024 connections and requests per cluster) a "
      "1,500-connection hold stalled after the first wave of 750: upgrades past the limit wait in Envoy's "
      "pending queue (the route has no timeout) and never open; the default `delayed_close_timeout` (1 s) "
      "added a second to every client-initiated close and delayed the lease release by as much. The shipped "
      "configs now set the upstream circuit breakers to the global connection limit and the delayed close "
      "to 100 ms.")
    _finding_churn(w, r)
    w("5. **A mass close lost its access-log entries (fixed in `envoy/envoy.yaml` and `extauth "
      "envoy-config`).** Envoy discards a whole batch of gRPC access-log entries when the stream to extauth "
      "is above the cluster's buffer limit (`per_connection_buffer_limit_bytes`, 1 MiB by default) rather "
      "than wait. Closing 6,000 held WebSockets at once lost 5,018 end entries "
      "(`access_logs.grpc_access_log.grpc_entries_flush_failed`): their leases were freed by TTL a minute "
      "later, and the held scenario's close took about 60 s. The shipped configs give the extauth cluster "
      "32 MiB (about 1 KiB an entry, taken only while extauth is behind): none lost, and closing all "
      "takes seconds (the held table above).")
    w("6. **The event loop.** extauth runs on uvloop by default (`event_loop: auto`); 4a is the same "
      "extauth on asyncio's own loop, interleaved with 4 in the same slices, so 4/4a is what uvloop is "
      "worth here. Across this session's side-by-side runs it was 1.04-1.16 (about 7% less CPU per check), "
      "and the no-op floors run on uvloop too, so 4/3 compares like with like.")
    w("7. **A check answered past Envoy's deadline kept its lease (fixed in `extauth/server.py`).** A quick "
      "run on a host whose hypervisor took up to 0.95 of a core left one lease after the churn warm-up, with "
      "no store timeout to explain it. When the event loop stalls right after an acquire, past Envoy's "
      "ext_authz timeout, nothing can cancel the check: it runs to its end and answers a call that has "
      "expired. Envoy has answered the client itself and never applies the allow or logs the lease, which "
      "then held its slot for a whole TTL. gRPC's `cancelled()` stays False for such a call; the deadline "
      "tells. extauth now gives the lease back at once and counts it in "
      "`extauth_leases_past_deadline_total`. What remains for the TTL: an allow sent in time that Envoy "
      "still drops (its timer firing while the answer travels, or the client leaving meanwhile), which "
      "the server cannot see: gRPC reports no cancellation for a call that already answered. A lease left after a warm-up "
      "now fails the run with its trail (allows, releases, Envoy's ext_authz and access-log counters).")
    w("")
    w("## How to run\n")
    w("```sh\nmake bench                         # full run, < 5 min, rewrites this page\n"
      ".venv/bin/python bench/run.py --quick   # ~1 min smoke run (bench/out/benchmarks-quick.md)\n"
      ".venv/bin/python bench/run.py --held 2000 --output /tmp/b.md\n```\n")
    w("Raw results of each run (JSON) and every process's log are kept under `bench/out/` (git-ignored). "
      "Any lease left in the store after a WebSocket scenario, or any mismatch between upgrades, allowed "
      "decisions and released leases, fails the run (exit status 1).")
