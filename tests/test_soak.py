"""The short soak (bench/soak.py) in CI: 500 transfers with faults; no corruption, hang or leak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


@pytest.mark.timeout(300)
def test_short_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--transfers", "500", "--epoch", "250", "--fault-rate", "0.08", "--seed", "1",
         "--max-minutes", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=280,
    )
    assert out.exists(), f"soak wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rep = json.loads(out.read_text())
    summary = {k: rep[k] for k in ("transfers", "succeeded", "failures_reported", "faults_injected",
                                   "corrupted_bytes", "canary_bytes_damaged", "hangs", "duration_s")}
    print(summary)
    assert rep["transfers"] >= 500
    assert rep["corrupted_bytes"] == 0 and rep["canary_bytes_damaged"] == 0, rep["problems"]
    assert rep["hangs"] == 0 and rep["late_failures"] == 0, rep["problems"]
    assert not rep["leaks"].get("leaked"), rep["leaks"]
    assert rep["faults_injected"] > 0 and rep["succeeded"] > 0
    # failures in a batch without a fault: the systematic follow-on of injected garbage is gone
    # (the soak retires tainted links; 0 in the last full 10,000-transfer soak), but one transfer
    # timed out once in CI on a loaded 2-core machine; bounded, reported, still failing if common
    assert rep["unexpected_failures"] <= max(2, rep["transfers"] // 100), rep["problems"]
    assert proc.returncode == 0, proc.stderr[-3000:]
