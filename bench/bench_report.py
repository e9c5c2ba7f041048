# ruff: noqa: E501, RUF001 - Markdown rows: long lines and typographic characters on purpose
"""The results of one bench/run.py run as Markdown: the block between the markers in
docs/benchmarks.md is replaced, the method around it is prose kept by hand."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench results: written by bench/run.py -->"
END = "<!-- end of bench results -->"
TARGET_FLOOR_RATIO = 0.9
TARGET_ANCHOR_RATIO = 0.25
TARGET_UPGRADES = 1000.0
TARGET_P99 = 0.001
TARGET_BYTES_PER_LEASE = 200.0
# "Flat": extauth's RSS grows by less than this per held connection (a per-connection dict entry
# with a lease id would already cost a few hundred bytes), or by less than allocator noise in all.
FLAT_BYTES_PER_CONN = 64.0
FLAT_NOISE_BYTES = 1 << 20


def n0(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:,.0f}"


def usec(seconds: float) -> str:
    if math.isnan(seconds):
        return "—"
    return "> top bucket" if math.isinf(seconds) else f"{seconds * 1e6:,.0f} µs"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _spread(ratios: list[float] | None) -> str:
    return f" (rounds {min(ratios):.2f}–{max(ratios):.2f})" if ratios and len(ratios) > 1 else ""


def rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, measured, target and verdict) for every figure the run has."""
    out: list[tuple[str, str, str]] = []
    http = r.get("http", {})
    for entry in http.values():
        number, title = entry["title"].split(". ", 1)
        out.append((f"{number}. {title}", f"{n0(entry['rps'])} req/s (p99 {entry['p99_us'] / 1000:.1f} ms)", ""))
    if {"product", "noop", "jwt"} <= http.keys():
        p, spread = http["product"]["rps"], http["product"].get("round_ratios", {})
        floor, anchor = p / http["noop"]["rps"], p / http["jwt"]["rps"]
        out.append(("4/3 product ÷ no-op ext_authz floor", f"**{floor:.2f}**{_spread(spread.get('noop'))}",
                    f"≥ {TARGET_FLOOR_RATIO}: {verdict(floor >= TARGET_FLOOR_RATIO)}"))
        out.append(("4/2 product ÷ Envoy's native jwt_authn", f"**{anchor:.2f}**{_spread(spread.get('jwt'))}",
                    f"≥ {TARGET_ANCHOR_RATIO}: {verdict(anchor >= TARGET_ANCHOR_RATIO)}"))
    if "half" in r:
        h = r["half"]
        p99, bound = h["check_p99"]
        out.append((f"½ check p99 at half of max load ({n0(h['rps'])} req/s)",
                    f"**{usec(p99)}** (bucket ≤ {usec(bound)})", f"≤ 1 ms: {verdict(bound <= TARGET_P99)}"))
    if "churn" in r:
        c = r["churn"]
        exact = c["leases_left"] == 0 and c["upgrades"] == c["allowed"] == c["released"]
        out.append(("5. WebSocket churn on Redis (connect, echo, close)",
                    f"**{n0(c['rate'])} upgrades/s**, handshake p99 {c['handshake_p99_us'] / 1000:.1f} ms; "
                    f"{n0(c['upgrades'])} upgrades = {n0(c['allowed'])} allowed = {n0(c['released'])} released, "
                    f"{c['leases_left']} leases left",
                    f"≥ {n0(TARGET_UPGRADES)}/s, exact: {verdict(exact and c['rate'] >= TARGET_UPGRADES)}"))
        refs = c.get("references", {})
        out.append(("5. the same churn through the no-op floor / with no auth",
                    f"{n0(refs.get('noop'))} / {n0(refs.get('ceiling'))} upgrades/s", "(info)"))
    if "held" in r:
        h = r["held"]
        flat = (abs(h["rss_per_conn"]) < FLAT_BYTES_PER_CONN
                or abs(h["rss_per_conn"]) * h["held"] < FLAT_NOISE_BYTES)
        out.append(("6. held WebSockets", f"**{n0(h['held'])}** (of {n0(h['target'])}); extauth RSS "
                    f"{h['rss_per_conn']:+.0f} B per connection; closing all {h['close_seconds']:.1f} s",
                    f"flat: {verdict(flat)}"))
        out.append(("6. Redis memory per lease (used_memory)", f"{n0(h['redis_per_lease'])} B",
                    f"≤ {n0(TARGET_BYTES_PER_LEASE)} B: {verdict(h['redis_per_lease'] <= TARGET_BYTES_PER_LEASE)}"))
    return out


def block(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    lines = [BEGIN, ""]
    lines.append(f"Run of {r.get('started')}{' (`--quick`: a smoke run, not reference figures)' if r.get('quick') else ''}, "
                 f"{r.get('runtime_seconds', 0):.0f} s.")
    if r.get("failures"):
        lines.append(f"\n**This run failed**: {'; '.join(r['failures'])}")
    lines += ["", "| machine | |", "|---|---|",
              f"| CPU | {m.get('cpu')}, {m.get('cores')} cores, {m.get('mem_bytes', 0) / 2**30:.0f} GiB |",
              f"| software | Python {m.get('python')}, grpcio {m.get('grpcio')}, uvloop {m.get('uvloop')}, "
              f"Envoy {m.get('envoy')} (one worker) |",
              f"| HTTP load | {m.get('http_load')}, 64 connections |", "",
              "| figure | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(r)]
    for name in ("decision", "store"):
        text = r.get("inproc", {}).get(name)
        if text:
            tables = "\n".join(line for line in text.splitlines() if not line.startswith("machine:"))
            lines += ["", f"In-process, `bench/{name}_bench.py`:", "", re.sub(r"^## ", "#### ", tables, flags=re.M)]
    lines += ["", END]
    return "\n".join(lines)


def write(path: Path, r: dict[str, Any]) -> None:
    """Replace the results block of ``path`` (a new page holding only the block if it has none)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block(r) + rest.split(END, 1)[1]
    else:
        text = f"# Benchmarks\n\nMethod: docs/benchmarks.md.\n\n{block(r)}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def summary(r: dict[str, Any]) -> str:
    """The console's view of the same rows."""
    lines = ["", "=== extauth benchmark summary ==="]
    lines += [f"{a:<58} {b.replace('*', ''):<60} {c.replace('*', '')}" for a, b, c in rows(r)]
    lines.append(f"runtime {r.get('runtime_seconds', 0):.0f} s"
                 + (f"; FAILURES: {'; '.join(r['failures'])}" if r.get("failures") else ""))
    return "\n".join(lines)
