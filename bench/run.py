"""``make bench``: every benchmark side by side in ONE run, through one Envoy at one worker
thread (``--concurrency 1``), then docs/benchmarks.md written from the figures measured.

1. ceiling: Envoy direct_response, no auth
2. native anchor: Envoy jwt_authn, same RS256 key, inline local JWKS (and 2b: with its JWT cache)
3. framework floor: ext_authz to a no-op servicer on the product's grpc.aio stack (and 3b: the
   same servicer answering the product's own allow)
4. product, plain HTTP: origin + JWT (token cache and allow memo warm) through Envoy -> extauth
   (and 4c: extauth's process with a constant Check, which splits 4/3b into the process's cost
   and the handler's; 4a: extauth on asyncio's own event loop)
5. product, WebSocket churn: real upgrades (connect, one echo, close) with quotas on a real
   valkey-server; afterwards zero leases must be left (any leak: exit 1)
6. held connections: as many concurrent WebSockets as the file-descriptor limit allows (up to
   10,000), extauth RSS and Redis memory per lease

plus the in-process decision and store benchmarks (bench/decision_bench.py, store_bench.py),
server-side check latency at half of the product's max load, and cProfile of extauth under load.

    .venv/bin/python bench/run.py            # full run (< 5 min), writes docs/benchmarks.md
    .venv/bin/python bench/run.py --quick    # ~1 min smoke run, writes bench/out/benchmarks-quick.md

Every process started here is stopped in ``finally`` (and the harness reaps its own at exit);
every port is ephemeral; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import pstats
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import bench_measure as bm  # noqa: E402
import bench_report  # noqa: E402
from bench_stack import HTTP_USER, BenchStack, wait_for  # noqa: E402

from tests.e2e.harness import ALLOWED_ORIGIN, envoy_binary, token  # noqa: E402

HTTP_SCENARIOS = (
    ("ceiling", "1. Ceiling: Envoy direct_response, no auth"),
    ("jwt", "2. Native anchor: Envoy jwt_authn (RS256, local JWKS)"),
    ("jwt_cached", "2b. jwt_authn with its JWT cache (jwt_cache_config)"),
    ("noop", "3. Framework floor: ext_authz to a no-op grpc.aio servicer"),
    ("floor_resp", "3b. Floor answering the product's allow (same servicer, extauth's response pre-built)"),
    ("product", "4. Product: extauth, origin + JWT (token cache and allow memo warm)"),
    ("product_const", "4c. extauth's process with a constant Check (answers 3b's bytes, reads nothing)"),
    ("product_asyncio", "4a. Product on asyncio's own event loop (event_loop: asyncio; 4 runs on uvloop)"),
)


class Settings:
    def __init__(self, quick: bool, held: int | None) -> None:
        self.quick = quick
        self.http_seconds = 3.0 if quick else 8.0
        self.http_warmup = 1.0
        self.http_connections = 64
        self.half_seconds = 3.0 if quick else 8.0
        self.profile_seconds = 2.0 if quick else 5.0
        self.churn_procs = 2
        # The churn client: bench/wschurn.c when it builds, else bench/ws_clients.py (set in main).
        self.wschurn: Path | None = None
        # In-flight upgrades = procs x lanes. Beyond ~16 on this 2-core machine extauth's
        # event-loop queueing alone exceeds store_timeout_ms (50 ms): see the findings.
        self.churn_lanes = 8
        self.churn_seconds = 4.0 if quick else 10.0
        self.churn_warmup = 1.0 if quick else 2.0
        # Each churn reference runs one slice before the product's churn and (full run) one after.
        self.churn_reference_seconds = 2.0 if quick else 4.0
        self.held_target = held if held is not None else (1000 if quick else 10_000)
        self.held_lanes = 8
        self.users = 200
        self.decision_n = 5000 if quick else 20000
        self.store_args = ["--ops", "500", "--no-cluster"] if quick else []


# -- child processes (load clients) ---------------------------------------------------------------

_CHILDREN: list[subprocess.Popen[str]] = []


def spawn(args: list[str], *, stdin: bool = False, python: bool = True) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, *args] if python else args,
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=REPO)
    _CHILDREN.append(proc)
    return proc


def kill_children() -> None:
    for proc in _CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
    _CHILDREN.clear()


def read_json_line(proc: subprocess.Popen[str], within: float, what: str) -> dict[str, Any]:
    """The next JSON line on a child's stdout, within ``within`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + within
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {within}s waiting for {what}")
            if sel.select(timeout=min(left, 1.0)):
                line = proc.stdout.readline()
                if not line:
                    err = proc.stderr.read() if proc.stderr else ""
                    raise RuntimeError(f"{what}: client exited ({proc.poll()}):\n{err[-3000:]}")
                if line.startswith("{"):
                    return dict(json.loads(line))


def finish(proc: subprocess.Popen[str], within: float, what: str) -> dict[str, Any]:
    out = read_json_line(proc, within, what)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return out


# -- store ----------------------------------------------------------------------------------------


def count_leases(url: str) -> int:
    from extauth.store import open_store

    async def run() -> int:
        store = open_store(url)
        try:
            return await store.count_all()
        finally:
            await store.close()

    return asyncio.run(run())


def wait_leases(url: str, expected: int, within: float) -> tuple[int, float]:
    """Poll count_all() until it equals ``expected`` (bounded); (last count, seconds waited)."""
    t0 = time.monotonic()
    n = count_leases(url)
    while n != expected and time.monotonic() - t0 < within:
        time.sleep(0.2)
        n = count_leases(url)
    return n, time.monotonic() - t0


def redis_memory(stack: BenchStack) -> dict[str, Any]:
    assert stack.redis is not None
    client = stack.redis.client()
    try:
        used = int(client.info("memory")["used_memory"])
        keys = list(client.scan_iter(match="extauth:*:leases:*", count=1000))
        usage = 0
        encodings: dict[str, int] = {}
        members = 0
        for k in keys:
            usage += int(client.memory_usage(k, samples=0) or 0)
            enc = str(client.object("encoding", k))
            encodings[enc] = encodings.get(enc, 0) + 1
            members += int(client.zcard(k))
        return {"used_memory": used, "lease_keys": len(keys), "memory_usage_sum": usage,
                "encodings": encodings, "members": members}
    finally:
        client.close()


def redis_cmdstats(stack: BenchStack) -> dict[str, int]:
    assert stack.redis is not None
    client = stack.redis.client()
    try:
        raw = client.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in raw.items()}
    finally:
        client.close()


# -- scenarios ------------------------------------------------------------------------------------


def run_inproc(s: Settings) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, cmd in (("decision", [str(BENCH / "decision_bench.py"), "--n", str(s.decision_n)]),
                      ("store", [str(BENCH / "store_bench.py"), *s.store_args])):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=180, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} bench failed:\n{proc.stderr[-3000:]}")
        out[name] = proc.stdout.strip()
        log(f"in-process {name} bench: {time.perf_counter() - t0:.1f} s")
    return out


def _default_loop() -> str:
    """The loop extauth and the floors run on here (``event_loop: auto``)."""
    from extauth import eventloop

    loop = eventloop.loop_factory("auto")()
    try:
        return eventloop.loop_name(loop)
    finally:
        loop.close()


def _version_or_none(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# The native anchor (2), the floors (3, 3b) and the product (4, 4c, 4a), whose ratios matter, are
# measured in interleaved 2-second slices, 2 3 3b 4 4c 4a 4a 4c 4 3b 3 2 repeated, and each is the
# sum of its slices: this machine's speed drifts by 10-20% within a minute, and a ratio of two runs taken
# one after the other carries that drift whole, while the mirrored order cancels a steady drift
# and the repetition averages the rest. Two rounds left 4/3 spread over 0.78-0.85 from run to
# run; each round's own ratios are kept, so the report shows the spread within a run too.
_PAIRED = ("jwt", "noop", "floor_resp", "product", "product_const", "product_asyncio")
_PAIRED_ROUNDS = 4
_SLICE_SECONDS = 2.0


def http_scenarios(stack: BenchStack, s: Settings, headers: list[str], python_load: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    titles = dict(HTTP_SCENARIOS)
    for key in titles:
        if key in _PAIRED:
            continue
        bm.http_load(stack.ports[key], "/api/bench", headers, connections=s.http_connections,
                     duration=s.http_warmup, workdir=stack.dir, force_python=python_load)
        before = bm.scrape(stack.metrics_port)
        r = _http_run(stack, s, key, headers, s.http_seconds, python_load)
        out[key] = _http_entry(stack, key, titles[key], [r], before)
    for key in _PAIRED:
        bm.http_load(stack.ports[key], "/api/bench", headers, connections=s.http_connections,
                     duration=s.http_warmup, workdir=stack.dir, force_python=python_load)
    runs: dict[str, list[bm.HttpResult]] = {key: [] for key in _PAIRED}
    rounds = 1 if s.quick else _PAIRED_ROUNDS
    before = bm.scrape(stack.metrics_port)
    for _ in range(rounds):
        for key in (*_PAIRED, *reversed(_PAIRED)):
            runs[key].append(_http_run(stack, s, key, headers, _SLICE_SECONDS, python_load))
    for key in _PAIRED:
        out[key] = _http_entry(stack, key, titles[key], runs[key], before)
    out["product"]["round_ratios"] = {
        other: _round_ratios(runs["product"], runs[other]) for other in _PAIRED if other != "product"}
    # 4c/3b: the product's process without its handler against the floor answering the same bytes.
    out["product_const"]["round_ratios"] = {
        "floor_resp": _round_ratios(runs["product_const"], runs["floor_resp"])}
    return {key: out[key] for key in titles}


def _rate(runs: list[bm.HttpResult]) -> float:
    """2xx answers per second over several runs taken as one."""
    elapsed = sum(r.elapsed for r in runs)
    return sum(r.ok for r in runs) / elapsed if elapsed else 0.0


def _round_ratios(ours: list[bm.HttpResult], theirs: list[bm.HttpResult]) -> list[float]:
    """Per interleaved round (two slices each, mirrored), our rate over theirs."""
    pairs = [(ours[i:i + 2], theirs[i:i + 2]) for i in range(0, len(ours), 2)]
    return [_rate(a) / _rate(b) for a, b in pairs if _rate(b)]


def _http_run(stack: BenchStack, s: Settings, key: str, headers: list[str], seconds: float,
              python_load: bool) -> bm.HttpResult:
    meter = bm.CpuMeter(stack.pids()).start()
    r = bm.http_load(stack.ports[key], "/api/bench", headers, connections=s.http_connections,
                     duration=seconds, workdir=stack.dir, force_python=python_load)
    r.cores = meter.stop()
    return r


def _http_entry(stack: BenchStack, key: str, title: str, runs: list[bm.HttpResult],
                before: bm.Samples) -> dict[str, Any]:
    requests = sum(r.requests for r in runs)
    elapsed = sum(r.elapsed for r in runs)
    rps = _rate(runs)
    cores = {k: sum(r.cores.get(k, 0.0) * r.elapsed for r in runs) / elapsed for k in runs[0].cores}
    non2xx = sum(r.non2xx for r in runs)
    entry: dict[str, Any] = {
        "title": title, "rps": rps, "requests": requests, "elapsed": elapsed, "non2xx": non2xx,
        "errors": sum(r.errors for r in runs), "p50_us": sum(r.p50_us for r in runs) / len(runs),
        "p99_us": max(r.p99_us for r in runs), "connections": runs[0].connections, "tool": runs[0].tool,
        "runs_rps": [r.ok_rps for r in runs], "cores": cores,
        "cpu_us_per_request": {k: v / rps * 1e6 for k, v in cores.items() if rps}}
    if key == "product":
        after = bm.scrape(stack.metrics_port)
        for result in ("allow", "deny"):
            entry["allowed" if result == "allow" else "denied"] = bm.delta(
                before, after, "extauth_decisions_total", policy="api", result=result)
        entry["memo_hits"] = bm.delta(before, after, "extauth_allow_memo_hits_total")
    log(f"{key}: {rps:,.0f} req/s ({', '.join(f'{r.ok_rps:,.0f}' for r in runs)}), "
        f"p99 {entry['p99_us'] / 1000:.2f} ms, non-2xx {non2xx}, "
        f"cores {', '.join(f'{k} {v:.2f}' for k, v in cores.items() if v >= 0.01)}")
    if requests == 0 or non2xx > 0.01 * requests:
        # Recorded, and the run goes on: a host that stalls the authz service past Envoy's
        # ext_authz timeout (503s) should still get the rest of its report. The rate above
        # counts 2xx answers only.
        what = f"{non2xx:,} of {requests:,} responses not 2xx, more than 1%" if requests else "no response"
        entry["failure"] = f"{key}: {what} (host steal {cores.get('steal', 0.0):.2f} cores meanwhile)"
    return entry


def half_load(stack: BenchStack, s: Settings, headers: list[str], max_rps: float,
              python_load: bool) -> dict[str, Any]:
    """Paced load at ~50% of the product's max; server-side check latency from extauth's own
    histograms (bucket deltas between two scrapes)."""
    target = max_rps / 2
    port = stack.ports["product"]
    conns = max(2, round(target / 100))  # ~10 ms between requests per connection
    rate_arg = target
    if not python_load and bm.wrk_path():
        # wrk's delay() comes on top of each response time: measure that time once at this load
        # and shorten the delay by it, so the achieved rate lands on the target.
        cal = bm.http_load(port, "/api/bench", headers, connections=conns, duration=2, rate=target,
                           workdir=stack.dir)
        if cal.rps > 0:
            response_s = max(0.0, conns / cal.rps - conns / target)
            rate_arg = conns / max(0.001, conns / target - response_s)
    before = bm.scrape(stack.metrics_port)
    meter = bm.CpuMeter(stack.pids()).start()
    r = bm.http_load(port, "/api/bench", headers, connections=conns, duration=s.half_seconds,
                     rate=target if python_load else rate_arg, workdir=stack.dir, force_python=python_load)
    cores = meter.stop()
    after = bm.scrape(stack.metrics_port)
    check = bm.histogram_delta(before, after, "extauth_check_duration_seconds")
    return {
        "target_rps": target, "rps": r.ok_rps, "fraction_of_max": r.ok_rps / max_rps if max_rps else math.nan,
        "connections": conns, "non2xx": r.non2xx, "e2e_p50_us": r.p50_us, "e2e_p99_us": r.p99_us,
        "cores": cores, "checks": check.count,
        "check_p50": check.quantile(0.5), "check_p99": check.quantile(0.99),
        "check_share_le_1ms": check.share_at_or_below(0.001),
    }


def profile(stack: BenchStack, seconds: float, load: Any) -> dict[str, Any]:
    """cProfile of extauth's event-loop thread while ``load()`` runs."""
    assert stack.extauth is not None and stack.extauth.popen is not None
    pid = stack.extauth.popen.pid
    stack.profile_out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    try:
        load()
    finally:
        os.kill(pid, signal.SIGUSR2)
    wait_for(lambda: stack.profile_out.exists() and stack.profile_out.stat().st_size > 0, 15,
             "the profile to be written")
    time.sleep(0.3)
    return summarize_profile(stack.profile_out)


# (label, file suffix, function, counted in the top-level sum). GuardedStore bounds store calls
# with asyncio.timeout (no task of their own), so a store call is nested under its caller:
# the acquire under the pipeline, refresh and release under the access-log stream.
_PROFILE_GROUPS = (
    ("Check handler, whole", "extauth/server.py", "Check", True),
    ("  allow-memo key (every check that may repeat; a hit ends there)", "extauth/envoy_api.py",
     "repeat_key", False),
    ("  CheckRequest -> CheckInput", "extauth/envoy_api.py", "check_input", False),
    ("  decision pipeline (Authorizer.check, store acquire included)", "extauth/pipeline.py", "check", False),
    ("    store acquire: RedisStore.acquire (RespLane)", "extauth/store/redis.py", "acquire", False),
    ("  Decision -> CheckResponse", "extauth/envoy_api.py", "check_response", False),
    ("access-log stream, whole (entries parsed, refresh and release included)", "extauth/accesslog.py",
     "StreamAccessLogs", True),
    ("  lease refresh: RedisStore.refresh (RespLane)", "extauth/store/redis.py", "refresh", False),
    ("  lease release: RedisStore.release (RespLane)", "extauth/store/redis.py", "release", False),
    ("idle: waiting in epoll", "~", "<method 'poll' of 'select.epoll' objects>", True),
)


def summarize_profile(path: Path, top: int = 18) -> dict[str, Any]:
    st = pstats.Stats(str(path))
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    groups = []
    counted = 0.0
    for label, file_part, func, top_level in _PROFILE_GROUPS:
        seconds = sum(v[3] for k, v in raw.items()
                      if k[2] == func and (k[0] == "~" if file_part == "~" else k[0].endswith(file_part)))
        if top_level:
            counted += seconds
        groups.append({"label": label, "seconds": seconds, "share": seconds / total if total else 0})
    rest = max(0.0, total - counted)
    groups.append({"label": "everything else: grpc.aio (Cython/C-core callbacks), asyncio loop, other",
                   "seconds": rest, "share": rest / total if total else 0})
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    top_rows = [{"function": _fname(k), "ncalls": v[1], "tottime": v[2], "cumtime": v[3],
                 "share": v[2] / total if total else 0} for k, v in rows]
    return {"total_seconds": total, "groups": groups, "top": top_rows}


def _fname(key: tuple[str, int, str]) -> str:
    file, line, func = key
    if file == "~":
        return func
    for marker in ("site-packages/", "lib/python3.11/", str(REPO) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{line}({func})"


def churn_clients(stack: BenchStack, s: Settings, tokens: Path, lanes: int, seconds: float,
                  label: str, listener: str = "product") -> list[dict[str, Any]]:
    """``lanes`` per client process x ``s.churn_procs`` upgrades in flight; the C client
    runs them all in one process."""
    port = stack.ports[listener]
    if s.wschurn is not None:
        procs = [spawn([str(s.wschurn), "--host", "127.0.0.1", "--port", str(port), "--path", "/ws",
                        "--origin", ALLOWED_ORIGIN, "--tokens", str(tokens),
                        "--concurrency", str(lanes * s.churn_procs), "--duration", str(seconds)],
                       python=False)]
    else:
        procs = [spawn([str(BENCH / "ws_clients.py"), "churn", "--url", f"ws://127.0.0.1:{port}/ws",
                        "--origin", ALLOWED_ORIGIN, "--tokens", str(tokens), "--concurrency", str(lanes),
                        "--duration", str(seconds), "--offset", str(i * lanes)])
                 for i in range(s.churn_procs)]
    return [finish(p, seconds + 60, f"{label} client {i}") for i, p in enumerate(procs)]


# The churn references, on the same clients, upstream and Envoy: no auth at all (the machine's
# own churn limit) and ext_authz to the no-op servicer (the framework floor; its allow carries
# no lease, so Envoy streams no access-log entries and Redis is not used).
CHURN_REFERENCES = ("ceiling", "noop")


def churn_reference(stack: BenchStack, s: Settings, tokens: Path, listener: str) -> dict[str, Any]:
    """One slice of churn through a reference listener: its rate and CPU per upgrade."""
    meter = bm.CpuMeter(stack.pids()).start()
    outs = churn_clients(stack, s, tokens, s.churn_lanes, s.churn_reference_seconds,
                         f"churn reference {listener}", listener)
    cores = meter.stop()
    upgrades = sum(o["upgrades"] for o in outs)
    elapsed = max(o["elapsed"] for o in outs)
    rate = upgrades / elapsed if elapsed else 0.0
    return {"upgrades": upgrades, "seconds": elapsed, "rate": rate,
            "statuses": _sum_counts(outs, "statuses"), "errors": _sum_counts(outs, "errors"),
            "cpu_ms_per_upgrade": {k: v / rate * 1e3 for k, v in cores.items() if rate}}


def _sum_counts(outs: list[dict[str, Any]], field: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for o in outs:
        for k, v in o[field].items():
            total[k] = total.get(k, 0) + v
    return total


def churn_references(stack: BenchStack, s: Settings, tokens: Path,
                     slices: dict[str, list[dict[str, Any]]]) -> None:
    for listener in CHURN_REFERENCES:
        slices.setdefault(listener, []).append(churn_reference(stack, s, tokens, listener))


def merge_references(slices: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each reference over all its slices: the rate over the summed time, CPU averaged."""
    merged: dict[str, Any] = {}
    for listener, runs in slices.items():
        upgrades = sum(r["upgrades"] for r in runs)
        seconds = sum(r["seconds"] for r in runs)
        names = {k for r in runs for k in r["cpu_ms_per_upgrade"]}
        merged[listener] = {
            "upgrades": upgrades, "seconds": seconds, "rate": upgrades / seconds if seconds else 0.0,
            "slice_rates": [r["rate"] for r in runs],
            "statuses": _sum_counts(runs, "statuses"), "errors": _sum_counts(runs, "errors"),
            "cpu_ms_per_upgrade": {k: sum(r["cpu_ms_per_upgrade"].get(k, 0.0) for r in runs) / len(runs)
                                   for k in names},
        }
    return merged


def churn(stack: BenchStack, s: Settings, tokens: Path) -> dict[str, Any]:
    url = stack.store_url
    # Warm-up in two steps: a gentle one (2 in flight) that verifies every user's token once,
    # then one at full concurrency that grows extauth's Redis connection pool. Cold work in
    # bursts (RS256 verifications, new pooled connections) stalls the event loop, and a stall
    # past store_timeout_ms leaks a lease (see the findings): that still fails the run.
    before_warm, envoy_before = bm.scrape(stack.metrics_port), envoy_stats(stack)
    churn_clients(stack, s, tokens, 1, s.churn_warmup, "churn warm-up (gentle)")
    churn_clients(stack, s, tokens, s.churn_lanes, s.churn_warmup, "churn warm-up")
    left, _ = wait_leases(url, 0, 20)
    if left:
        raise RuntimeError(f"{left} leases left after the churn warm-up: "
                           + _lease_trail(before_warm, bm.scrape(stack.metrics_port), envoy_before,
                                          envoy_stats(stack)))
    # The references run just before and just after the product, so a change in the machine's
    # speed during the run falls on both sides alike.
    references: dict[str, list[dict[str, Any]]] = {}
    churn_references(stack, s, tokens, references)
    before = bm.scrape(stack.metrics_port)
    cmd_before = redis_cmdstats(stack)
    env_before = envoy_stats(stack)
    meter = bm.CpuMeter(stack.pids()).start()
    outs = churn_clients(stack, s, tokens, s.churn_lanes, s.churn_seconds, "churn")
    cores = meter.stop()
    left, drain = wait_leases(url, 0, 30)
    # The releases that follow the last closes: wait (bounded) until every allowed upgrade's end
    # entry has been handled, then read the counters.
    allowed_now = bm.delta(before, bm.scrape(stack.metrics_port), "extauth_decisions_total",
                           policy="chat", result="allow")
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: bm.delta(before, bm.scrape(stack.metrics_port), "extauth_accesslog_entries_total",
                                  type="end", outcome="release") >= allowed_now, 15, "end entries")
    after = bm.scrape(stack.metrics_port)
    cmd_after = redis_cmdstats(stack)
    env_after = envoy_stats(stack)
    if not s.quick:
        churn_references(stack, s, tokens, references)
    upgrades = sum(o["upgrades"] for o in outs)
    cycles = sum(o["cycles"] for o in outs)
    elapsed = max(o["elapsed"] for o in outs)
    lat = sorted(x for o in outs for x in o["latencies_us"])
    statuses = _sum_counts(outs, "statuses")
    errors = _sum_counts(outs, "errors")
    d = {op: bm.delta(before, after, "extauth_bench_redis_round_trips_total", op=op)
         for op in ("acquire", "refresh", "release", "connection_setup", "other", "count_all")}
    refs = {op: bm.delta(before, after, "extauth_bench_store_refs_total", op=op)
            for op in ("refresh", "release")}
    allowed = bm.delta(before, after, "extauth_decisions_total", policy="chat", result="allow")
    denied = bm.delta(before, after, "extauth_decisions_total", policy="chat", result="deny")
    check = bm.histogram_delta(before, after, "extauth_check_duration_seconds")
    acquire = bm.histogram_delta(before, after, "extauth_store_call_duration_seconds", op="acquire")
    rate = upgrades / elapsed if elapsed else 0.0
    return {
        "procs": len(outs), "lanes": s.churn_lanes * s.churn_procs // len(outs), "seconds": elapsed,
        "upgrades": upgrades,
        "cycles": cycles, "rate": rate, "statuses": statuses, "errors": errors,
        "handshake_p50_us": bm.percentile(lat, 50), "handshake_p99_us": bm.percentile(lat, 99),
        "cores": cores,
        "cpu_ms_per_upgrade": {k: v / rate * 1e3 for k, v in cores.items() if rate},
        "allowed": allowed, "denied": denied,
        "end_released": bm.delta(before, after, "extauth_accesslog_entries_total",
                                 type="end", outcome="release"),
        "tunnel_refreshed": bm.delta(before, after, "extauth_accesslog_entries_total",
                                     type="tunnel_established", outcome="refresh"),
        "als_messages_ignored": bm.delta(before, after, "extauth_accesslog_entries_total", outcome="ignored"),
        "store_errors": bm.delta(before, after, "extauth_store_errors_total"),
        "round_trips": d, "refs": refs, "leases_left": left, "drain_seconds": drain,
        "redis_commands": {k: cmd_after.get(k, 0) - cmd_before.get(k, 0) for k in cmd_after
                           if cmd_after.get(k, 0) - cmd_before.get(k, 0) > 0},
        "envoy": {k: env_after.get(k, 0) - env_before.get(k, 0) for k in env_after},
        "check_p50": check.quantile(0.5), "check_p99": check.quantile(0.99),
        "acquire_p50": acquire.quantile(0.5),
        "acquire_p99": acquire.quantile(0.99),
        "references": merge_references(references),
    }


def _lease_trail(before: bm.Samples, after: bm.Samples, envoy_before: dict[str, int],
                 envoy_after: dict[str, int]) -> str:
    """Where leases went between two points, for a leak's message: allows that never reached
    Envoy, or reached it with no end entry back."""
    def ext(name: str, **labels: str) -> str:
        return f"{bm.delta(before, after, name, **labels):,.0f}"

    def envoy(name: str) -> str:
        return f"{envoy_after.get(name, 0) - envoy_before.get(name, 0):,}"

    return (f"extauth allowed {ext('extauth_decisions_total', policy='chat', result='allow')} upgrades and "
            f"released {ext('extauth_accesslog_entries_total', outcome='release')} on end entries; "
            f"Envoy counted ext_authz.ok {envoy('http.product.ext_authz.ok')}, "
            f"ext_authz.error {envoy('http.product.ext_authz.error')}, "
            f"access-log entries lost {envoy('access_logs.grpc_access_log.grpc_entries_flush_failed')}; "
            f"given back: {ext('extauth_leases_past_deadline_total')} past Envoy's deadline, "
            f"{ext('extauth_decisions_total', reason='store_unavailable')} after a store timeout")


def envoy_stats(stack: BenchStack) -> dict[str, int]:
    assert stack.envoy is not None
    _, body = stack.envoy.admin_get("/stats?filter=(grpc_access_log|product\\.ext_authz|"
                                    "product\\.downstream_cx_upgrades_total|cluster\\.app\\.upstream_cx_overflow|"
                                    "cluster\\.app\\.upstream_rq_pending_overflow)")
    out: dict[str, int] = {}
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


def fd_cap() -> tuple[int, int]:
    """(held-connection cap, RLIMIT_NOFILE hard): Envoy holds 2 fds per proxied WebSocket."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 10_000, hard
    return max(100, (hard - 400) // 2 // 100 * 100), hard


def held(stack: BenchStack, s: Settings, tokens: Path) -> dict[str, Any]:
    assert stack.extauth is not None and stack.extauth.popen is not None
    assert stack.envoy is not None and stack.envoy.popen is not None
    ext_pid, envoy_pid = stack.extauth.popen.pid, stack.envoy.popen.pid
    cap, hard = fd_cap()
    target = min(s.held_target, cap, 10_000)
    url = stack.store_url
    base_leases = count_leases(url)
    if base_leases:
        raise RuntimeError(f"{base_leases} leases before the held-connection scenario")
    base_mem = redis_memory(stack)
    rss: list[dict[str, Any]] = [{"held": 0, "extauth": bm.rss_bytes(ext_pid),
                                  "envoy": bm.rss_bytes(envoy_pid)}]
    waves = [target // 2, target - target // 2]
    procs: list[subprocess.Popen[str]] = []
    opened: list[dict[str, Any]] = []
    held_total = 0
    offset = 0
    t_open = time.perf_counter()
    for wave in waves:
        per = [wave // 2, wave - wave // 2]
        wave_procs = []
        for count in per:
            p = spawn([str(BENCH / "ws_clients.py"), "hold", "--url",
                       f"ws://127.0.0.1:{stack.ports['product']}/ws", "--origin", ALLOWED_ORIGIN,
                       "--tokens", str(tokens), "--concurrency", str(s.held_lanes), "--count", str(count),
                       "--offset", str(offset), "--max-hold", "240"], stdin=True)
            offset += count
            wave_procs.append(p)
        for i, p in enumerate(wave_procs):
            o = read_json_line(p, 150, f"hold client {i} to open its connections")
            opened.append(o)
            held_total += int(o["held"])
        procs += wave_procs
        time.sleep(0.5)
        rss.append({"held": held_total, "extauth": bm.rss_bytes(ext_pid), "envoy": bm.rss_bytes(envoy_pid),
                    "leases": count_leases(url)})
        log(f"held {held_total:,}: extauth RSS {rss[-1]['extauth'] / 2**20:.1f} MiB, "
            f"leases {rss[-1]['leases']:,}")
    open_seconds = time.perf_counter() - t_open
    full_mem = redis_memory(stack)
    envoy_fds = bm.open_fds(envoy_pid)
    leases_full = rss[-1]["leases"]
    t_close = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            p.stdin.write("close\n")
            p.stdin.flush()
    closed = [finish(p, 120, f"hold client {i} to close") for i, p in enumerate(procs)]
    left, drain = wait_leases(url, 0, 60)
    close_seconds = time.perf_counter() - t_close
    rss.append({"held": 0, "extauth": bm.rss_bytes(ext_pid), "envoy": bm.rss_bytes(envoy_pid), "leases": left,
                "after_close": True})
    statuses = _sum_counts(opened, "statuses")
    errors = _sum_counts(opened, "errors")
    lat = sorted(x for o in opened for x in o["latencies_us"])
    leases = max(1, leases_full)
    return {
        "target": target, "requested": s.held_target, "fd_cap": cap, "nofile_hard": hard, "held": held_total,
        "statuses": statuses, "errors": errors, "open_seconds": open_seconds,
        "open_rate": held_total / open_seconds if open_seconds else 0,
        "handshake_p50_us": bm.percentile(lat, 50), "handshake_p99_us": bm.percentile(lat, 99),
        "alive_before_close": sum(int(c.get("alive_before_close", 0)) for c in closed),
        "rss": rss, "leases_full": leases_full, "envoy_fds": envoy_fds,
        "redis_base": base_mem, "redis_full": full_mem,
        "redis_used_per_lease": (full_mem["used_memory"] - base_mem["used_memory"]) / leases,
        "redis_usage_per_lease": full_mem["memory_usage_sum"] / leases,
        "leases_left": left, "drain_seconds": drain, "close_seconds": close_seconds,
    }


# -- machine --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    wrk = bm.wrk_path()
    wrk_version = ""
    if wrk:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
        text = out.stdout or out.stderr
        wrk_version = text.splitlines()[0].split(" [")[0] if text else "wrk"
    from importlib.metadata import version

    return {
        "cpu": cpu, "cores": os.cpu_count(), "mem_bytes": mem, "kernel": platform.release(),
        "python": platform.python_version(), "envoy": m.group(1) if m else envoy.strip(),
        "wrk": wrk_version, "grpcio": version("grpcio"), "websockets": version("websockets"),
        "redis_py": version("redis"), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "event_loop": _default_loop(), "uvloop": _version_or_none("uvloop"),
    }


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _sigterm(_sig: int, _frame: Any) -> None:
    raise SystemExit(143)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    ap.add_argument("--output", help="markdown report path (default: docs/benchmarks.md, "
                                     "bench/out/benchmarks-quick.md with --quick)")
    ap.add_argument("--held", type=int, help="held-connection target (default 10,000; 1,000 with --quick)")
    ap.add_argument("--python-load", action="store_true",
                    help="use the Python HTTP load generator even if wrk exists")
    ap.add_argument("--python-churn", action="store_true",
                    help="use the Python churn client (bench/ws_clients.py) even if a C compiler exists")
    ap.add_argument("--python-upstream", action="store_true",
                    help="use the Python echo upstream (bench/ws_upstream.py) even if a C compiler exists")
    args = ap.parse_args()
    s = Settings(args.quick, args.held)
    signal.signal(signal.SIGTERM, _sigterm)
    raise_nofile()
    started = time.perf_counter()
    out_dir = BENCH / "out"
    workdir = out_dir / time.strftime("run-%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    output = Path(args.output) if args.output else (
        out_dir / "benchmarks-quick.md" if args.quick else REPO / "docs" / "benchmarks.md")
    python_load = args.python_load or bm.wrk_path() is None
    results: dict[str, Any] = {"quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "load_tool": "python" if python_load else "wrk", "failures": []}
    log(f"workdir {workdir}; HTTP load with {results['load_tool']}"
        + ("" if not python_load else " (wrk not found: apt-get install wrk for better figures)"))
    s.wschurn, why = (None, "--python-churn") if args.python_churn else bm.build_c_tool("wschurn", out_dir)
    results["churn_tool"] = "c" if s.wschurn is not None else "python"
    results["churn_tool_note"] = why
    log(f"churn client: bench/wschurn.c built with {why}" if s.wschurn
        else f"churn client: bench/ws_clients.py ({why})")
    upstream, why = ((None, "--python-upstream") if args.python_upstream
                     else bm.build_c_tool("wsecho", out_dir))
    results["upstream_tool"] = "c" if upstream is not None else "python"
    results["upstream_tool_note"] = why
    log(f"echo upstream: bench/wsecho.c built with {why}" if upstream
        else f"echo upstream: bench/ws_upstream.py ({why})")
    stack: BenchStack | None = None
    try:
        results["machine"] = machine()
        results["inproc"] = run_inproc(s)
        stack = BenchStack(workdir, upstream).start()
        log(f"stack up: envoy {stack.ports}")
        http_tok = token(HTTP_USER, lifetime=3600)
        headers = [f"Authorization: Bearer {http_tok}", f"Origin: {ALLOWED_ORIGIN}"]
        results["http"] = http_scenarios(stack, s, headers, python_load)
        results["failures"] += [e["failure"] for e in results["http"].values() if "failure" in e]
        max_rps = results["http"]["product"]["rps"]
        if not max_rps:
            raise RuntimeError("the product answered no request 2xx: no load to halve")
        results["half"] = half_load(stack, s, headers, max_rps, python_load)
        log(f"half load: {results['half']['rps']:,.0f} req/s, check p99 "
            f"{results['half']['check_p99'][0] * 1e6:.0f} µs")
        results["profile_http"] = profile(stack, s.profile_seconds, lambda: bm.http_load(
            stack.ports["product"], "/api/bench", headers, connections=s.http_connections,
            duration=s.profile_seconds, workdir=workdir, force_python=python_load))
        tokens = workdir / "tokens.json"
        tokens.write_text(json.dumps([token(f"user{i:03d}", lifetime=3600) for i in range(s.users)]))
        # The WebSocket scenarios go on after an HTTP scenario's failure, but each stops at a
        # failure of its own (a leak makes the next figures meaningless).
        http_failures = len(results["failures"])
        results["churn"] = churn(stack, s, tokens)
        c = results["churn"]
        log(f"churn: {c['rate']:,.0f} upgrades/s, handshake p50 {c['handshake_p50_us'] / 1000:.1f} ms "
            f"p99 {c['handshake_p99_us'] / 1000:.1f} ms, allowed {c['allowed']:.0f}, released "
            f"{c['end_released']:.0f}, leases left {c['leases_left']}")
        if c["leases_left"] != 0:
            results["failures"].append(f"churn: {c['leases_left']} leases left after the drain (a leak)")
        if c["allowed"] != c["end_released"] or c["allowed"] != c["upgrades"]:
            results["failures"].append(
                f"churn accounting: {c['upgrades']} upgrades, {c['allowed']:.0f} allowed, "
                f"{c['end_released']:.0f} end entries released")
        if len(results["failures"]) == http_failures:
            results["profile_churn"] = profile(stack, s.profile_seconds, lambda: churn_clients(
                stack, s, tokens, 4, s.profile_seconds, "profiled churn"))
            left, _ = wait_leases(stack.store_url, 0, 30)
            if left:
                results["failures"].append(f"profiled churn: {left} leases left after the drain (a leak)")
        if len(results["failures"]) == http_failures:
            results["held"] = held(stack, s, tokens)
            h = results["held"]
            if h["leases_left"]:
                results["failures"].append(f"held: {h['leases_left']} leases left after closing (a leak)")
            if h["leases_full"] != h["held"]:
                results["failures"].append(
                    f"held: {h['held']} connections open but {h['leases_full']} leases")
    except BaseException as e:
        results["failures"].append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        kill_children()
        if stack is not None:
            stack.close()
    results["runtime_seconds"] = time.perf_counter() - started
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(bench_report.render(results))
    log(f"report written to {output.relative_to(REPO) if output.is_relative_to(REPO) else output}; "
        f"results in {workdir / 'results.json'}; total {results['runtime_seconds']:.0f} s")
    print(bench_report.summary(results), flush=True)
    if results["failures"]:
        for f in results["failures"]:
            log(f"FAILED: {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
