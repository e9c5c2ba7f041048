"""The bench's HTTP figures: what `make bench` reports as throughput is 2xx answers, and a
scenario whose answers are mostly refusals is a failure of the run, not a fast result."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_measure  # noqa: E402
import run as bench_run  # noqa: E402

# wrk 4.1's output for a run where Envoy answered some requests 503 (its ext_authz timeout).
WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:50395/api/bench
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    35.12ms   80.51ms 944.14ms   95.12%
    Req/Sec     2.01k   312.00     2.40k    80.00%
  Latency Distribution
     50%   25.99ms
     75%   31.02ms
     90%   40.11ms
     99%  944.14ms
  4000 requests in 2.00s, 1.10MB read
  Non-2xx or 3xx responses: 200
Requests/sec:   2000.00
Transfer/sec:    550.00KB
"""


def _result(requests: int, non2xx: int, elapsed: float = 2.0) -> bench_measure.HttpResult:
    return bench_measure.HttpResult(tool="wrk", requests=requests, elapsed=elapsed, rps=requests / elapsed,
                                    non2xx=non2xx, errors=0, p50_us=1000.0, p99_us=2000.0, connections=64,
                                    cores={"envoy": 0.9, "noop": 0.9, "steal": 0.4})


def _entry(key: str, runs: list[bench_measure.HttpResult]) -> dict[str, Any]:
    # The stack and metrics are read for the product's entry only.
    return bench_run._http_entry(None, key, "title", runs, {})  # type: ignore[arg-type]


def test_parse_wrk_counts_only_2xx_as_throughput() -> None:
    r = bench_measure.parse_wrk(WRK_OUTPUT, 64)
    assert (r.requests, r.non2xx, r.elapsed) == (4000, 200, 2.0)
    assert r.rps == pytest.approx(2000.0)  # wrk's own figure counts the 503s too
    assert r.ok == 3800
    assert r.ok_rps == pytest.approx(1900.0)
    assert r.p50_us == pytest.approx(25_990.0)
    assert r.p99_us == pytest.approx(944_140.0)


def test_scenario_rate_and_slices_count_2xx_only() -> None:
    entry = _entry("noop", [_result(4000, 10), _result(2000, 0)])
    assert entry["rps"] == pytest.approx((3990 + 2000) / 4.0)
    assert entry["runs_rps"] == [pytest.approx(1995.0), pytest.approx(1000.0)]
    assert "failure" not in entry  # 10 of 6,000: under 1%


def test_scenario_with_many_refusals_is_a_recorded_failure_not_an_abort() -> None:
    entry = _entry("floor_resp", [_result(4000, 54), _result(655, 0)])
    assert entry["failure"] == ("floor_resp: 54 of 4,655 responses not 2xx, more than 1% "
                                "(host steal 0.40 cores meanwhile)")
    assert entry["rps"] == pytest.approx((4000 - 54 + 655) / 4.0)


def test_scenario_with_no_answer_fails() -> None:
    entry = _entry("noop", [_result(0, 0)])
    assert entry["failure"] == "noop: no response (host steal 0.40 cores meanwhile)"
