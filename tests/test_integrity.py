"""Run integrity: dead workers end a run with one line (no hang), killed runs leave no workers."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import helpers.patches as hp
from helpers.dataset import list_cases
from helpers.patches import extract_slide
from helpers.prefetch import WorkerDied

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def t1(small_dataset):
    return [c for c in list_cases(small_dataset) if c.case_id == "tiny_t1"][0]


_REAL_JOB = hp._extract_rows_job


def _oom_on_row_3(args):
    if args[2] == 3:
        os.kill(os.getpid(), signal.SIGKILL)      # what the out-of-memory killer does
    return _REAL_JOB(args)


def test_a_killed_worker_ends_extraction_with_one_line_not_a_hang(t1, tmp_path, monkeypatch):
    real = _REAL_JOB
    monkeypatch.setattr(hp, "_extract_rows_job", _oom_on_row_3)
    monkeypatch.setattr(hp, "ROWS_PER_TASK_MAX", 1)
    t0 = time.monotonic()
    with pytest.raises(WorkerDied) as ei:
        extract_slide(t1, 1, tmp_path / "cache", workers=2)
    assert time.monotonic() - t0 < 30
    msg = str(ei.value)
    assert "\n" not in msg
    assert "SIGKILL" in msg and "out-of-memory" in msg and "1x patches of tiny_t1" in msg and "rerun" in msg
    assert not list((tmp_path / "cache").rglob("meta.json"))
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(hp, "_extract_rows_job", real)
    ps, cached = extract_slide(t1, 1, tmp_path / "cache", workers=2)
    assert not cached and ps.meta["n_kept"] > 0


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(v) for v in out.split()]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_workers_die_with_their_parent(small_dataset, tmp_path):
    """A kernel killed mid-extraction (OOM, kill -9) must not leave its workers running on."""
    script = textwrap.dedent(f"""
        import time, helpers.patches as hp
        from helpers.dataset import list_cases
        from helpers.patches import extract_slide
        real = hp._extract_rows_job
        def slow(args):
            time.sleep(60)
            return real(args)
        hp._extract_rows_job = slow
        hp.ROWS_PER_TASK_MAX = 1
        case = [c for c in list_cases({str(small_dataset)!r}) if c.case_id == "tiny_t1"][0]
        extract_slide(case, 1, {str(tmp_path / 'cache')!r}, workers=2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2, "the extraction did not start its workers"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived their killed parent"
    finally:
        proc.kill()
        for w in _children(proc.pid):
            os.kill(w, signal.SIGKILL)
