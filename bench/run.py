"""``make bench``: every scenario side by side in ONE run, through one Envoy at one worker thread,
then the results table in docs/benchmarks.md rewritten from the figures measured.

1. ceiling: Envoy direct_response, no auth
2. native anchor: Envoy jwt_authn, same RS256 key, inline local JWKS
3. framework floor: ext_authz to a no-op servicer on the product's grpc.aio stack
4. product, plain HTTP: origin + JWT (token cache and allow memo warm)
½. server-side check latency at half of the product's max load
5. WebSocket churn on Redis (connect, one echo, close), with the same churn through the floor and
   with no auth; afterwards every upgrade must be allowed once, released once, no lease left
6. held connections: as many WebSockets as the file-descriptor limit allows (up to 10,000),
   extauth RSS and Redis memory per lease

plus the in-process decision and store benchmarks (bench/decision_bench.py, bench/store_bench.py).

    .venv/bin/python bench/run.py            # full run (about 4 min), rewrites docs/benchmarks.md
    .venv/bin/python bench/run.py --quick    # ~1 min smoke run, writes bench/out/benchmarks-quick.md

Every process started here is stopped in ``finally``; every port is ephemeral; every wait is bounded.
A leak or an accounting mismatch fails the run (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import selectors
import signal
import subprocess
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import bench_measure as bm  # noqa: E402
import bench_report  # noqa: E402
from bench_stack import ALLOWED_ORIGIN, HTTP_USER, BenchStack, envoy_binary, token, wait_until  # noqa: E402

HTTP_TITLES = {
    "ceiling": "1. Ceiling: Envoy direct_response, no auth",
    "jwt": "2. Native anchor: Envoy jwt_authn (RS256, local JWKS)",
    "noop": "3. Framework floor: ext_authz to a no-op grpc.aio servicer",
    "product": "4. Product: extauth, origin + JWT (token cache and allow memo warm)",
}
# The scenarios whose ratios matter run in interleaved slices, 2 3 4 4 3 2 per round, each the
# sum of its slices: this machine drifts 10-20% within a minute, and the mirrored order cancels
# a steady drift while the rounds average the rest.
PAIRED = ("jwt", "noop", "product")
ROUNDS = 4
SLICE_SECONDS = 2.0
HTTP_CONNECTIONS = 64
CHURN_LANES = 16  # upgrades in flight; beyond ~16 queueing alone nears store_timeout_ms here


class Settings:
    def __init__(self, quick: bool, held: int | None) -> None:
        self.quick = quick
        self.rounds = 1 if quick else ROUNDS
        self.http_seconds = 3.0 if quick else 8.0
        self.half_seconds = 3.0 if quick else 8.0
        self.churn_seconds = 4.0 if quick else 10.0
        self.churn_warmup = 1.0 if quick else 2.0
        self.churn_reference_seconds = 2.0 if quick else 4.0
        self.held_target = held if held is not None else (1000 if quick else 10_000)
        self.users = 200
        self.decision_n = 5000 if quick else 20000
        self.store_ops = 500 if quick else 3000
        self.wschurn = Path()


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- child processes (load clients) -----------------------------------------------------------------

_CHILDREN: list[subprocess.Popen[str]] = []


def spawn(args: list[str], *, stdin: bool = False) -> subprocess.Popen[str]:
    proc = subprocess.Popen(args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
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


def sum_counts(outs: list[dict[str, Any]], field: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for o in outs:
        for k, v in o[field].items():
            total[k] = total.get(k, 0) + v
    return total


# -- store ------------------------------------------------------------------------------------------


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


def redis_used_memory(stack: BenchStack) -> int:
    assert stack.redis is not None
    client = stack.redis.client()
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


# -- HTTP -------------------------------------------------------------------------------------------


def http_run(stack: BenchStack, key: str, headers: list[str], seconds: float,
             python_load: bool) -> bm.HttpResult:
    meter = bm.CpuMeter(stack.pids()).start()
    r = bm.http_load(stack.ports[key], "/api/bench", headers, connections=HTTP_CONNECTIONS,
                     duration=seconds, workdir=stack.dir, force_python=python_load)
    r.cores = meter.stop()
    return r


def rate(runs: list[bm.HttpResult]) -> float:
    """2xx answers per second over several runs taken as one."""
    elapsed = sum(r.elapsed for r in runs)
    return sum(r.ok for r in runs) / elapsed if elapsed else 0.0


def http_entry(key: str, runs: list[bm.HttpResult]) -> dict[str, Any]:
    requests = sum(r.requests for r in runs)
    non2xx = sum(r.non2xx for r in runs)
    elapsed = sum(r.elapsed for r in runs)
    cores = {k: sum(r.cores.get(k, 0.0) * r.elapsed for r in runs) / elapsed for k in runs[0].cores}
    entry: dict[str, Any] = {
        "title": HTTP_TITLES[key], "rps": rate(runs), "requests": requests, "non2xx": non2xx,
        "p50_us": sum(r.p50_us for r in runs) / len(runs), "p99_us": max(r.p99_us for r in runs),
        "cores": cores}
    log(f"{key}: {entry['rps']:,.0f} req/s, p99 {entry['p99_us'] / 1000:.2f} ms, non-2xx {non2xx}")
    if requests == 0 or non2xx > 0.01 * requests:
        # Recorded and the run goes on: an authz service stalled past Envoy's ext_authz timeout
        # is answered 503, and such fast refusals are not throughput.
        what = f"{non2xx:,} of {requests:,} responses not 2xx, more than 1%" if requests else "no response"
        entry["failure"] = f"{key}: {what} (host steal {cores.get('steal', 0.0):.2f} cores meanwhile)"
    return entry


def http_scenarios(stack: BenchStack, s: Settings, headers: list[str], python_load: bool) -> dict[str, Any]:
    runs: dict[str, list[bm.HttpResult]] = {key: [] for key in HTTP_TITLES}
    for key in HTTP_TITLES:  # warm-up: connections, token cache, allow memo, jwt_authn
        bm.http_load(stack.ports[key], "/api/bench", headers, connections=HTTP_CONNECTIONS, duration=1.0,
                     workdir=stack.dir, force_python=python_load)
    runs["ceiling"].append(http_run(stack, "ceiling", headers, s.http_seconds, python_load))
    for _ in range(s.rounds):
        for key in (*PAIRED, *reversed(PAIRED)):
            runs[key].append(http_run(stack, key, headers, SLICE_SECONDS, python_load))
    out = {key: http_entry(key, r) for key, r in runs.items()}
    # Each round's own ratio (two mirrored slices each): the spread behind the run's ratio.
    product = runs["product"]
    out["product"]["round_ratios"] = {
        other: [rate(product[i:i + 2]) / rate(runs[other][i:i + 2]) for i in range(0, len(product), 2)
                if rate(runs[other][i:i + 2])]
        for other in PAIRED if other != "product"}
    return out


def half_load(stack: BenchStack, s: Settings, headers: list[str], max_rps: float,
              python_load: bool) -> dict[str, Any]:
    """Paced load at half the product's max; check latency from extauth's own histogram."""
    target = max_rps / 2
    port = stack.ports["product"]
    conns = max(2, round(target / 100))  # ~10 ms between requests per connection
    rate_arg = target
    if not python_load:
        # wrk's delay() comes on top of each response time: measure it once at this load and
        # shorten the delay by it, so the achieved rate lands on the target.
        cal = bm.http_load(port, "/api/bench", headers, connections=conns, duration=2, rate=target,
                           workdir=stack.dir)
        if cal.rps > 0:
            rate_arg = conns / max(0.001, conns / target - max(0.0, conns / cal.rps - conns / target))
    before = bm.scrape(stack.metrics_port)
    r = bm.http_load(port, "/api/bench", headers, connections=conns, duration=s.half_seconds,
                     rate=rate_arg, workdir=stack.dir, force_python=python_load)
    check = bm.histogram_delta(before, bm.scrape(stack.metrics_port), "extauth_check_duration_seconds")
    return {"rps": r.ok_rps, "non2xx": r.non2xx, "checks": check.count,
            "check_p50": check.quantile(0.5), "check_p99": check.quantile(0.99)}


# -- WebSockets -------------------------------------------------------------------------------------


def churn_clients(stack: BenchStack, s: Settings, tokens: Path, lanes: int, seconds: float,
                  listener: str = "product") -> dict[str, Any]:
    proc = spawn([str(s.wschurn), "--host", "127.0.0.1", "--port", str(stack.ports[listener]),
                  "--path", "/ws", "--origin", ALLOWED_ORIGIN, "--tokens", str(tokens),
                  "--concurrency", str(lanes), "--duration", str(seconds)])
    return finish(proc, seconds + 60, f"churn client on {listener}")


def churn_slice(stack: BenchStack, s: Settings, tokens: Path, seconds: float,
                listener: str) -> dict[str, Any]:
    meter = bm.CpuMeter(stack.pids()).start()
    out = churn_clients(stack, s, tokens, CHURN_LANES, seconds, listener)
    cores = meter.stop()
    r = out["upgrades"] / out["elapsed"] if out["elapsed"] else 0.0
    return {**out, "rate": r, "cores": cores,
            "cpu_ms_per_upgrade": {k: v / r * 1e3 for k, v in cores.items() if r}}


def churn(stack: BenchStack, s: Settings, tokens: Path) -> dict[str, Any]:
    url = stack.store_url
    # Warm-up: gently first (every user's token verified once), then at full concurrency.
    churn_clients(stack, s, tokens, 2, s.churn_warmup)
    churn_clients(stack, s, tokens, CHURN_LANES, s.churn_warmup)
    left, _ = wait_leases(url, 0, 20)
    if left:
        raise RuntimeError(f"{left} leases left after the churn warm-up")
    # The references run just before the product (and after it in a full run), so a change in
    # the machine's speed falls on both sides alike.
    refs: dict[str, list[dict[str, Any]]] = {"noop": [], "ceiling": []}
    for name in refs:
        refs[name].append(churn_slice(stack, s, tokens, s.churn_reference_seconds, name))
    before = bm.scrape(stack.metrics_port)
    c = churn_slice(stack, s, tokens, s.churn_seconds, "product")
    left, drain = wait_leases(url, 0, 30)
    allowed_now = bm.delta(before, bm.scrape(stack.metrics_port), "extauth_decisions_total",
                           policy="chat", result="allow")
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: bm.delta(before, bm.scrape(stack.metrics_port), "extauth_accesslog_entries_total",
                                    type="end", outcome="release") >= allowed_now, 15, "end entries")
    after = bm.scrape(stack.metrics_port)
    if not s.quick:
        for name in refs:
            refs[name].append(churn_slice(stack, s, tokens, s.churn_reference_seconds, name))
    lat = sorted(c["latencies_us"])
    return {
        "rate": c["rate"], "upgrades": c["upgrades"], "statuses": c["statuses"], "errors": c["errors"],
        "handshake_p50_us": bm.percentile(lat, 50), "handshake_p99_us": bm.percentile(lat, 99),
        "cpu_ms_per_upgrade": c["cpu_ms_per_upgrade"],
        "allowed": bm.delta(before, after, "extauth_decisions_total", policy="chat", result="allow"),
        "released": bm.delta(before, after, "extauth_accesslog_entries_total", type="end", outcome="release"),
        "leases_left": left, "drain_seconds": drain,
        "references": {name: sum(r["upgrades"] for r in runs) / sum(r["elapsed"] for r in runs)
                       for name, runs in refs.items()},
    }


def fd_cap() -> int:
    """Held-connection cap: Envoy holds 2 fds per proxied WebSocket."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 10_000 if hard == resource.RLIM_INFINITY else max(100, (hard - 400) // 2 // 100 * 100)


def held(stack: BenchStack, s: Settings, tokens: Path) -> dict[str, Any]:
    ext_pid = stack.pid("extauth")
    target = min(s.held_target, fd_cap(), 10_000)
    url = stack.store_url
    if count_leases(url):
        raise RuntimeError("leases left before the held-connection scenario")
    base_mem, base_rss = redis_used_memory(stack), bm.rss_bytes(ext_pid)
    procs: list[subprocess.Popen[str]] = []
    held_total, offset = 0, 0
    for wave in (target // 2, target - target // 2):
        wave_procs = []
        for count in (wave // 2, wave - wave // 2):
            wave_procs.append(spawn([
                sys.executable, str(BENCH / "ws_hold.py"), "--url", f"ws://127.0.0.1:{stack.ports['product']}/ws",
                "--origin", ALLOWED_ORIGIN, "--tokens", str(tokens), "--concurrency", "8",
                "--count", str(count), "--offset", str(offset), "--max-hold", "240"], stdin=True))
            offset += count
        for i, p in enumerate(wave_procs):
            held_total += int(read_json_line(p, 150, f"hold client {i} to open its connections")["held"])
        procs += wave_procs
        time.sleep(0.5)
        log(f"held {held_total:,}: extauth RSS {bm.rss_bytes(ext_pid) / 2**20:.1f} MiB")
    full_rss, full_mem, leases = bm.rss_bytes(ext_pid), redis_used_memory(stack), count_leases(url)
    t_close = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            p.stdin.write("close\n")
            p.stdin.flush()
    for i, p in enumerate(procs):
        finish(p, 120, f"hold client {i} to close")
    left, _ = wait_leases(url, 0, 60)
    return {
        "target": target, "held": held_total, "leases_full": leases, "leases_left": left,
        "rss_before": base_rss, "rss_full": full_rss,
        "rss_per_conn": (full_rss - base_rss) / max(1, held_total),
        "redis_per_lease": (full_mem - base_mem) / max(1, leases),
        "close_seconds": time.perf_counter() - t_close,
    }


# -- in-process and machine -------------------------------------------------------------------------


def inproc(s: Settings) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, cmd in (("decision", ["decision_bench.py", "--n", str(s.decision_n)]),
                      ("store", ["store_bench.py", "--ops", str(s.store_ops)])):
        proc = subprocess.run([sys.executable, str(BENCH / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                              timeout=180, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} bench failed:\n{proc.stderr[-3000:]}")
        out[name] = proc.stdout.strip()
        log(f"in-process {name} bench done")
    return out


def machine(python_load: bool) -> dict[str, Any]:
    cpu, mem = "unknown", 0
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as f:
        mem = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:")), 0)
    envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_bytes": mem, "python": platform.python_version(),
            "envoy": m.group(1) if m else envoy.strip(), "grpcio": version("grpcio"),
            "uvloop": version("uvloop") if sys.platform != "win32" else None,
            "http_load": "Python (bench/httpload.py; wrk not on PATH)" if python_load else "wrk"}


def _sigterm(_sig: int, _frame: Any) -> None:
    raise SystemExit(143)


def scenarios(s: Settings, results: dict[str, Any], workdir: Path, upstream: Path, python_load: bool) -> None:
    stack = BenchStack(workdir, upstream).start()
    try:
        log(f"stack up: envoy listeners {stack.ports}")
        headers = [f"Authorization: Bearer {token(HTTP_USER)}", f"Origin: {ALLOWED_ORIGIN}"]
        results["http"] = http_scenarios(stack, s, headers, python_load)
        results["failures"] += [e["failure"] for e in results["http"].values() if "failure" in e]
        max_rps = results["http"]["product"]["rps"]
        if not max_rps:
            raise RuntimeError("the product answered no request 2xx: no load to halve")
        results["half"] = half_load(stack, s, headers, max_rps, python_load)
        tokens = workdir / "tokens.json"
        tokens.write_text(json.dumps([token(f"user{i:03d}") for i in range(s.users)]))
        c = results["churn"] = churn(stack, s, tokens)
        log(f"churn: {c['rate']:,.0f} upgrades/s, allowed {c['allowed']:.0f}, released {c['released']:.0f}, "
            f"leases left {c['leases_left']}")
        if c["leases_left"] or not c["upgrades"] == c["allowed"] == c["released"]:
            results["failures"].append(
                f"churn accounting: {c['upgrades']} upgrades, {c['allowed']:.0f} allowed, "
                f"{c['released']:.0f} released, {c['leases_left']} leases left")
            return  # a leak makes the next figures meaningless
        h = results["held"] = held(stack, s, tokens)
        if h["leases_left"] or h["leases_full"] != h["held"]:
            results["failures"].append(f"held: {h['held']} open, {h['leases_full']} leases, "
                                       f"{h['leases_left']} left after closing")
    finally:
        kill_children()
        stack.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    ap.add_argument("--output", type=Path, help="the report (default: docs/benchmarks.md; "
                                                "bench/out/benchmarks-quick.md with --quick)")
    ap.add_argument("--held", type=int, help="held-connection target (default 10,000; 1,000 with --quick)")
    args = ap.parse_args()
    s = Settings(args.quick, args.held)
    signal.signal(signal.SIGTERM, _sigterm)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.perf_counter()
    out_dir = BENCH / "out"
    workdir = out_dir / time.strftime("run-%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    output = args.output or (out_dir / "benchmarks-quick.md" if args.quick
                             else REPO / "docs" / "benchmarks.md")
    python_load = bm.wrk_path() is None
    results: dict[str, Any] = {"quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M %Z"),
                               "failures": []}
    try:
        s.wschurn = bm.build_c_tool("wschurn", out_dir)
        upstream = bm.build_c_tool("wsecho", out_dir)
        results["machine"] = machine(python_load)
        results["inproc"] = inproc(s)
        scenarios(s, results, workdir, upstream, python_load)
    except BaseException as e:
        results["failures"].append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        kill_children()
    results["runtime_seconds"] = time.perf_counter() - started
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    bench_report.write(output, results)
    log(f"report written to {output}; results in {workdir / 'results.json'}; "
        f"total {results['runtime_seconds']:.0f} s")
    print(bench_report.summary(results), flush=True)
    for f in results["failures"]:
        log(f"FAILED: {f}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
