"""The issue-14 GPU check script runs end to end (on the CPU, at tiny sizes).

No GPU reaches CI, so the numbers of ``--quick`` mean nothing; what this checks is that every
check of the script (three training loops, whole-slide inference, DDP with two gloo processes)
runs and produces a row with a ratio, so that the one GPU run a session may get is not spent on
a crash.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # every check of bench/gpu_check.py --quick in a subprocess


def test_gpu_check_quick_runs_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PAIP_REPRO_RUNS=str(tmp_path / "runs"), TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--quick", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["check"], r["what"]): r for r in result["rows"]}
    assert set(rows) == {
        ("train", "efficientnet_b0"),
        ("train", "resnet50"),
        ("train", "unetpp_paper"),
        ("inference", "predict_slide"),
        ("ddp", "efficientnet_b0"),
    }
    for key, r in rows.items():
        assert "FAILED" not in r["note"], (key, r["note"])
        assert r["real"] is not None and r["real"] > 0, key
        assert r["ratio"] is not None and r["ratio"] > 0, key
    assert "| check | what |" in proc.stdout
