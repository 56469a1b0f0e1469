"""The planner on a public architecture it has no special knowledge of (transformers BERT, random weights)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_bert_tiny_plan_verifies_every_row_and_predicts_its_disk_size(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "planner.cli", "plan", "examples/public_models.py:bert_tiny", "--budget", "1GB",
         "--recipes", "fp32,int8-dynamic,bf16", "--backend", "torch", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((out / "plan.json").read_text())["rows"]
    assert sorted(row["recipe"] for row in rows) == ["bf16", "fp32", "int8-dynamic"]
    for row in rows:
        assert row["status"] == "verified", row
        assert row["verified_disk_bytes"] == pytest.approx(row["analytic_disk_bytes"], rel=0.03), row
