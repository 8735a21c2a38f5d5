"""The benchmark harness runs end to end (a smoke run: one round of one second, two contenders); the
figures themselves are read from `uv run bench/run.py`, never asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_python

pytestmark = pytest.mark.store_of_its_own


def test_a_quick_run_prints_the_table_and_its_ratios(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    done = run_python("bench/run.py", "--quick", "--eras", "legacy,2026-07-28", "--only", "A raw,ours auth off",
                      "--json", str(results), timeout_s=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(results.read_text())
    assert [(row["contender"], row["era"]) for row in rows] == [
        ("A raw Starlette", "legacy"), ("ours auth off", "legacy"),
        ("A raw Starlette", "2026-07-28"), ("ours auth off", "2026-07-28")]
    assert all(row["requests_per_s"] > 0 and row["failures"] == 0 and row["cpu_us_per_request"] > 0 for row in rows)
    assert rows[0]["ratio_a"] == 1.0
    assert "era 2026-07-28: stateless JSON" in done.stdout and "xA" in done.stdout
