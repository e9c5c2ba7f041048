"""Measuring helpers for bench/run.py: per-process CPU and RSS from /proc, Prometheus scrapes
and histogram quantiles from bucket deltas, the HTTP load generators (wrk, or the Python
fallback) and their parsing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

BENCH = Path(__file__).resolve().parent
_TICK = os.sysconf("SC_CLK_TCK")

# -- processes ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all threads)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def children_cpu() -> float:
    """CPU of waited-for children (the load generators once they have exited)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


class CpuMeter:
    """CPU used by each named process (and by exited children: the load generator)
    between start() and stop(), as cores (CPU seconds per wall second)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}
        self._children0 = 0.0
        self._machine0 = (0, 0, 0)
        self.cores: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self._t0 = time.perf_counter()
        self._cpu0 = {n: cpu_seconds(p) for n, p in self.pids.items()}
        self._children0 = children_cpu()
        self._machine0 = machine_ticks()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t0
        cores = {n: (cpu_seconds(p) - self._cpu0[n]) / wall for n, p in self.pids.items()}
        cores["load generator"] = (children_cpu() - self._children0) / wall
        busy, steal, _ = machine_ticks()
        machine_busy = (busy - self._machine0[0]) / _TICK / wall
        # Whatever else ran on the machine meanwhile (other users' jobs, the kernel, this
        # script): a run disturbed by others shows it here.
        cores["others"] = max(0.0, machine_busy - sum(cores.values()))
        cores["steal"] = (steal - self._machine0[1]) / _TICK / wall
        self.cores = cores
        return cores


# -- Prometheus -----------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


@dataclass
class HistogramDelta:
    count: float
    buckets: list[tuple[float, float]]  # (upper bound, cumulative count), ascending

    def quantile(self, q: float) -> tuple[float, float]:
        """(linear estimate within the bucket, the bucket's upper bound) in seconds."""
        if self.count <= 0:
            return (math.nan, math.nan)
        rank = q * self.count
        prev_le, prev_c = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank:
                if math.isinf(le):
                    return (prev_le, math.inf)
                frac = (rank - prev_c) / (c - prev_c) if c > prev_c else 1.0
                return (prev_le + (le - prev_le) * frac, le)
            prev_le, prev_c = le, c
        return (prev_le, math.inf)


def histogram_delta(before: Samples, after: Samples, name: str, **labels: str) -> HistogramDelta:
    """Bucket counts gained between two scrapes (summed over label sets matching ``labels``)."""
    want = set(labels.items())
    buckets: dict[float, float] = {}
    for (n, ls), v in after.items():
        if n == f"{name}_bucket" and want <= ls:
            le = float(dict(ls)["le"])
            buckets[le] = buckets.get(le, 0.0) + v - before.get((n, ls), 0.0)
    return HistogramDelta(delta(before, after, f"{name}_count", **labels), sorted(buckets.items()))


# -- HTTP load ------------------------------------------------------------------------------------


@dataclass
class HttpResult:
    tool: str
    requests: int
    elapsed: float
    rps: float
    non2xx: int
    errors: int
    p50_us: float
    p99_us: float
    connections: int
    cores: dict[str, float] = field(default_factory=dict)
    raw: str = ""

    @property
    def ok(self) -> int:
        """Answers that were 2xx: an overloaded authz service times out at Envoy (503), and
        such fast refusals must not count as throughput."""
        return max(0, self.requests - self.non2xx)

    @property
    def ok_rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def build_c_tool(name: str, out_dir: Path) -> Path:
    """``bench/<name>.c`` (the churn client ``wschurn``, the echo upstream ``wsecho``) built with the
    system C compiler, once per version of its source and the shared header."""
    source = BENCH / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError(f"no C compiler on PATH to build bench/{name}.c (set CC)")
    digest = hashlib.sha256(source.read_bytes() + (BENCH / "rfc6455.h").read_bytes()).hexdigest()[:12]
    binary = out_dir / f"{name}-{digest}"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    proc = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(source)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{cc} failed to build bench/{name}.c: {proc.stderr.strip()[-500:]}")
    tmp.rename(binary)
    return binary


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _wrk_latency(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else math.nan


def parse_wrk(text: str, connections: int) -> HttpResult:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{text}")
    requests = int(m.group(1))
    elapsed = float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    rps_m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx_m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errs_m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return HttpResult(
        tool="wrk", requests=requests, elapsed=elapsed,
        rps=float(rps_m.group(1)) if rps_m else requests / elapsed,
        non2xx=int(non2xx_m.group(1)) if non2xx_m else 0,
        errors=sum(int(x) for x in errs_m.groups()) if errs_m else 0,
        p50_us=_wrk_latency(text, "50"), p99_us=_wrk_latency(text, "99"),
        connections=connections, raw=text,
    )


def http_load(port: int, path: str, headers: Iterable[str], *, connections: int, duration: float,
              rate: float = 0.0, workdir: Path, force_python: bool = False) -> HttpResult:
    """Saturation (rate 0) or paced load. wrk when available (paced with a Lua ``delay()``:
    each connection waits ``1000*connections/rate`` ms minus nothing between requests, so
    the achieved rate is a little under ``rate``: it is measured, not assumed)."""
    headers = list(headers)
    wrk = None if force_python else wrk_path()
    if wrk:
        cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
               "--timeout", "5s"]
        env = dict(os.environ)
        if rate:
            script = workdir / "paced.lua"
            script.write_text('local d = tonumber(os.getenv("BENCH_DELAY_MS"))\n'
                              "function delay() return d end\n")
            env["BENCH_DELAY_MS"] = str(max(1, round(1000 * connections / rate)))
            cmd += ["-s", str(script)]
        for h in headers:
            cmd += ["-H", h]
        cmd.append(f"http://127.0.0.1:{port}{path}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}\n{proc.stdout}")
        return parse_wrk(proc.stdout, connections)
    cmd = [sys.executable, str(BENCH / "httpload.py"), "--port", str(port), "--path", path,
           "--connections", str(connections), "--duration", str(duration), "--rate", str(rate)]
    for h in headers:
        cmd += ["--header", h]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"httpload failed ({proc.returncode}): {proc.stderr}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return HttpResult(tool="python", requests=int(data["requests"]), elapsed=data["elapsed"],
                      rps=data["rps"], non2xx=int(data["non2xx"]), errors=int(data["errors"]),
                      p50_us=data["p50_us"], p99_us=data["p99_us"], connections=connections,
                      raw=proc.stdout)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]
