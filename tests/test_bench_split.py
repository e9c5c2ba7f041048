"""The bench's split of the 4/3 gap: scenario 4c runs extauth's own process with a Check that
answers fixed bytes, and the in-process table times the real handler on a memo hit. These
check that each measures what the report says it does."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from extauth.config import parse_config
from extauth.pipeline import Authorizer
from extauth.runtime import build_runtime
from extauth.server import AuthorizationService

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_report  # noqa: E402
import decision_bench  # noqa: E402
import extauth_serve  # noqa: E402


def test_constant_answer_replaces_check_and_reads_nothing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    answer = b"\x12\x00fixed"
    path = tmp_path / "allow.bin"
    path.write_bytes(answer)
    monkeypatch.setattr(AuthorizationService, "Check", AuthorizationService.Check)  # restored afterwards
    monkeypatch.setenv("EXTAUTH_BENCH_CONSTANT_ANSWER", str(path))
    extauth_serve.install_constant_answer()
    config = parse_config({"policies": [{"name": "any", "match": {"path_prefix": "/"}}]})
    service = AuthorizationService(Authorizer(build_runtime(config), None))

    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the constant Check read request.{name}")

    assert asyncio.run(service.Check(Untouchable(), None)) == answer


def test_without_the_variable_check_is_the_product_s(monkeypatch: pytest.MonkeyPatch) -> None:
    original = AuthorizationService.Check
    monkeypatch.delenv("EXTAUTH_BENCH_CONSTANT_ANSWER", raising=False)
    extauth_serve.install_constant_answer()
    assert AuthorizationService.Check is original


def test_decision_bench_times_a_real_memo_hit(tmp_path: Path) -> None:
    # The script raises when the bench request is not allowed or the handler suspends
    # (a miss would await the pipeline): exit 0 means the row timed memo hits.
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "decision_bench.py"), "--n", "100"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    r = {"inproc": {"decision": proc.stdout}}
    for row in ("JWT cached", "Check handler, plain-HTTP allow-memo hit", "of which the memo key",
                "of which the key's credential digest", "constant handler"):
        assert bench_report._inproc_us(r, row) > 0, row


def test_a_suspending_handler_is_not_timed_as_a_hit() -> None:
    async def suspends() -> None:
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="suspended"):
        decision_bench._run_to_end(suspends())


def test_inproc_rows_are_read_by_name_and_a_missing_one_is_nan() -> None:
    table = ("| Check handler (in-process) | µs median of 5 | µs best |\n|---|---|---|\n"
             "| Check handler, plain-HTTP allow-memo hit (scenario 4) | 8.4 | 8.2 |\n"
             "| constant handler (scenario 4c's Check) | 0.5 | 0.4 |\n")
    r = {"inproc": {"decision": table}}
    assert bench_report._inproc_us(r, "Check handler, plain-HTTP") == 8.4
    assert bench_report._inproc_us(r, "constant handler") == 0.5
    assert math.isnan(bench_report._inproc_us(r, "of which the memo key"))
    assert math.isnan(bench_report._inproc_us({}, "constant handler"))


def test_targets_split_the_floor_ratio_into_process_and_handler() -> None:
    http = {k: {"rps": rps} for k, rps in
            (("noop", 4000.0), ("floor_resp", 3800.0), ("product", 3000.0), ("product_const", 3700.0),
             ("jwt", 9000.0))}
    t = bench_report.targets({"http": http})
    assert t["floor_ratio"] == pytest.approx(0.75)
    assert t["process_ratio"] == pytest.approx(3700 / 3800)
    assert t["handler_ratio"] == pytest.approx(3000 / 3700)
    # the three steps multiply back to 4/3
    assert (http["floor_resp"]["rps"] / http["noop"]["rps"] * t["process_ratio"] * t["handler_ratio"]
            == pytest.approx(t["floor_ratio"]))
    assert "handler_ratio" not in bench_report.targets({"http": {k: v for k, v in http.items()
                                                                  if k != "product_const"}})
