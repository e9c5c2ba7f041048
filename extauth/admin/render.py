"""The admin API's answers as terminal tables or JSON."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; numbers right-aligned."""
    text_rows = [[str(c) for c in row] for row in rows]
    numeric = [all(_is_num(r[i]) for r in text_rows) and bool(text_rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in text_rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in text_rows)])


def _is_num(s: str) -> bool:
    return bool(re.fullmatch(r"-?\d+(\.\d+)?", s))


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def time_left(ts: float, now: float) -> str:
    secs = max(0, int(ts - now + 0.5))
    d, rem = divmod(secs, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    parts = [f"{d}d"] if d else []
    if h or (d and (m or s)):
        parts.append(f"{h}h")
    if m and not d:
        parts.append(f"{m}m")
    if not d and not h:
        parts.append(f"{s}s")
    return "".join(parts)


def lease_dict(msg: Any) -> dict[str, Any]:
    return {"lease_id": msg.lease_id, "policy": msg.policy,
            "user": msg.user if msg.HasField("user") else None, "ip": msg.ip, "expires_at": msg.expires_at}


def ban_dict(msg: Any) -> dict[str, Any]:
    return {"ip": msg.ip, "expires_at": msg.expires_at, "reason": msg.reason}


def revocation_dict(msg: Any) -> dict[str, Any]:
    return {"kind": msg.kind, "subject": msg.subject, "value": msg.value or None,
            "before": msg.before if msg.kind == "before" else None, "expires_at": msg.expires_at}


def render_revocations(revocations: Sequence[Any], *, as_json: bool, now: float | None = None) -> str:
    if as_json:
        return json.dumps([revocation_dict(r) for r in revocations], indent=2)
    if not revocations:
        return "no revocations in force"
    now = time.time() if now is None else now
    rows = [(r.kind, r.subject, r.value if r.kind != "before" else f"issued before {when(r.before)}",
             when(r.expires_at), time_left(r.expires_at, now)) for r in revocations]
    return format_table(("KIND", "SUBJECT", "TOKENS", "EXPIRES", "IN"), rows)


def stats_dict(msg: Any) -> dict[str, Any]:
    return {
        "active_leases": msg.active_leases,
        "bans": msg.bans,
        "decisions": [{"policy": d.policy, "result": d.result, "reason": d.reason, "count": d.count}
                      for d in msg.decisions],
        "hostile_signals": dict(sorted(msg.hostile_signals.items())),
        "bans_issued": dict(sorted(msg.bans_issued.items())),
        "store_error": msg.store_error or None,
    }


def render_leases(leases: Sequence[Any], *, as_json: bool, now: float | None = None) -> str:
    if as_json:
        return json.dumps([lease_dict(m) for m in leases], indent=2)
    if not leases:
        return "no live leases"
    now = time.time() if now is None else now
    rows = [(m.lease_id, m.policy, m.user if m.HasField("user") else "-", m.ip, when(m.expires_at),
             time_left(m.expires_at, now)) for m in leases]
    return format_table(("LEASE", "POLICY", "USER", "IP", "EXPIRES", "IN"), rows)


def render_bans(bans: Sequence[Any], *, as_json: bool, now: float | None = None) -> str:
    if as_json:
        return json.dumps([ban_dict(b) for b in bans], indent=2)
    if not bans:
        return "no active bans"
    now = time.time() if now is None else now
    rows = [(b.ip, b.reason, when(b.expires_at), time_left(b.expires_at, now)) for b in bans]
    return format_table(("IP", "REASON", "EXPIRES", "IN"), rows)


def render_stats(stats: Any, *, as_json: bool) -> str:
    if as_json:
        return json.dumps(stats_dict(stats), indent=2)
    d = stats_dict(stats)
    lines = [
        f"active leases   {d['active_leases'] if d['active_leases'] >= 0 else 'unknown'}",
        f"active bans     {d['bans'] if d['bans'] >= 0 else 'unknown'}",
    ]
    if d["store_error"]:
        lines.append(f"store error     {d['store_error']}")
    if d["hostile_signals"]:
        lines.append("hostile signals " + ", ".join(f"{k}={v}" for k, v in d["hostile_signals"].items()))
    if d["bans_issued"]:
        lines.append("bans issued     " + ", ".join(f"{k}={v}" for k, v in d["bans_issued"].items()))
    lines.append("")
    decisions = sorted(d["decisions"], key=lambda x: (x["policy"], x["result"], x["reason"]))
    if decisions:
        lines.append(format_table(("POLICY", "RESULT", "REASON", "COUNT"),
                                  [(x["policy"] or "-", x["result"], x["reason"] or "-", x["count"])
                                   for x in decisions]))
    else:
        lines.append("no decisions yet")
    return "\n".join(lines)


def override_dict(o: Any) -> dict[str, Any]:
    return {
        "policy": o.policy, "user": o.user,
        "connections_per_user": o.connections_per_user if o.HasField("connections_per_user") else None,
        "attempts_per_user_per_minute": o.attempts_per_user_per_minute
        if o.HasField("attempts_per_user_per_minute") else None,
        "expires_at": o.expires_at or None,
    }


def render_overrides(overrides: Sequence[Any], *, as_json: bool, now: float | None = None) -> str:
    if as_json:
        return json.dumps([override_dict(o) for o in overrides], indent=2)
    if not overrides:
        return "no quota override (the configured limits apply)"
    now = time.time() if now is None else now
    rows = []
    for o in overrides:
        d = override_dict(o)
        rows.append((d["policy"], d["user"], _or_dash(d["connections_per_user"]),
                     _or_dash(d["attempts_per_user_per_minute"]),
                     when(o.expires_at) if o.expires_at else "until cleared",
                     time_left(o.expires_at, now) if o.expires_at else "-"))
    return format_table(("POLICY", "USER", "CONNECTIONS", "ATTEMPTS/MIN", "EXPIRES", "IN"), rows)


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)
