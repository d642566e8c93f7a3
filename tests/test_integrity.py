"""Run integrity: dead workers end a run with one line (no hang), killed runs leave no workers."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import helpers.patching.patches as hp
from helpers.core.parallel import WorkerDied
from helpers.patching.patches import extract_slide
from helpers.wsi.dataset import list_cases

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def t1(small_dataset):
    return [c for c in list_cases(small_dataset) if c.case_id == "tiny_t1"][0]


_REAL_JOB = hp._extract_rows_job


def _oom_on_row_3(args):
    if args[2] == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
    return _REAL_JOB(args)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_workers_die_with_their_parent(small_dataset, tmp_path):
    """A kernel killed mid-extraction (OOM, kill -9) must not leave its workers running on."""
    script = textwrap.dedent(f"""
        import time, helpers.patching.patches as hp
        from helpers.wsi.dataset import list_cases
        from helpers.patching.patches import extract_slide
        real = hp._extract_rows_job
        def slow(args):
            time.sleep(60)
            return real(args)
        hp._extract_rows_job = slow
        hp.ROWS_PER_TASK_MAX = 1
        case = [c for c in list_cases({str(small_dataset)!r}) if c.case_id == "tiny_t1"][0]
        extract_slide(case, 1, {str(tmp_path / "cache")!r}, workers=2)
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


def test_a_checkpoint_trained_on_other_patches_is_never_resumed(tmp_path):
    """Notebook 02 rerun with another tissue_threshold rewrites the caches: the training meta
    (which holds every cache's key) changes, and fit refuses last.pt instead of resuming it."""
    import torch

    from helpers.core.errors import InputError
    from helpers.learning.train import TrainConfig, fit

    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        return [(torch.rand(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(2)]

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))

    def evaluate(model, device):
        return {"val_loss": 1.0}

    meta = {"input_size": 8, "data": {"split": "S1", "caches": {"train": {"a": "key-at-0.5"}}}}
    cfg = TrainConfig(epochs=1, seed=0)
    fit(
        make(),
        batches,
        evaluate,
        torch.nn.functional.cross_entropy,
        cfg,
        tmp_path,
        meta=meta,
        progress=False,
        log=lambda m: None,
    )
    changed = {**meta, "data": {"split": "S1", "caches": {"train": {"a": "key-at-0.3"}}}}
    with pytest.raises(InputError, match="other settings.*meta.data"):
        fit(
            make(),
            batches,
            evaluate,
            torch.nn.functional.cross_entropy,
            TrainConfig(epochs=2, seed=0),
            tmp_path,
            meta=changed,
            progress=False,
            log=lambda m: None,
        )


def test_parameters_that_cannot_work_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from helpers import run as runner

    monkeypatch.setenv("PAIP_REPRO_RUNS", str(tmp_path / "runs"))
    for args, what in (
        (["-p", "split_fractions", "[0.5, 0.5]"], "split_fractions"),
        (["-p", "patch_size", "100000"], "patch_size"),
        (["-p", "seg_scale", "2"], "seg_scale"),
        (["-p", "class_strides", "[64, 16]"], "class_strides"),
    ):
        assert runner.main(["--no-progress", "--run-name", "x", *args]) == 2, args
        err = capsys.readouterr().err
        assert what in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs" / "x" / "params.json").exists(), "a refused run must not write params.json"


def test_caches_survive_a_moved_dataset(small_dataset, tmp_path):
    """Keys hold the content of the files, not their paths: the same slides elsewhere reuse them."""
    import shutil

    from helpers.patching.patches import extract_dataset

    cases = list_cases(small_dataset)
    summary, _ = extract_dataset(cases, [4], tmp_path / "cache", workers=1, progress=False)
    assert not summary.from_cache.any()
    moved = tmp_path / "moved"
    shutil.copytree(small_dataset, moved)
    again, _ = extract_dataset(list_cases(moved), [4], tmp_path / "cache", workers=1, progress=False)
    assert again.from_cache.all()
    # A changed slide is a different input: not reused.
    for suffix in (".svs", "_whole.tif", "_viable.tif"):
        (moved / f"tiny_t1{suffix}").write_bytes((small_dataset / f"tiny_t2{suffix}").read_bytes())
    third, _ = extract_dataset(list_cases(moved), [4], tmp_path / "cache", workers=1, progress=False)
    assert not third.set_index("case_id").from_cache["tiny_t1"]


def test_a_full_disk_in_an_extraction_worker_is_the_one_disk_full_error(monkeypatch, tmp_path):
    """A worker that hits ENOSPC used to come back as "InputError: OSError: [Errno 28] ...": the
    parent could not tell it from bad input. It is the DiskFullError, and survives pickling."""
    import errno
    import pickle

    import helpers.patching.patches as hp
    from helpers.core.errors import DiskFullError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hp, "extract_rows", full)
    args = (str(tmp_path / "s1.svs"), 4, 0, 2, {}, None, None, str(tmp_path), None)
    with pytest.raises(DiskFullError) as info:
        hp._extract_rows_job(args)
    back = pickle.loads(pickle.dumps(info.value))  # how it reaches the parent from a process
    assert isinstance(back, DiskFullError) and "is full" in str(back) and "4x patches of s1" in str(back)


def test_file_sha256_hashes_the_whole_file_and_names_a_missing_one(tmp_path):
    """The one file hash of the project (checkpoint weights, the CMU test slide)."""
    import hashlib

    from helpers.core.errors import InputError
    from helpers.core.provenance import file_sha256

    p = tmp_path / "f.bin"
    p.write_bytes(b"abc" * 1000)
    assert file_sha256(p, chunk=7) == hashlib.sha256(b"abc" * 1000).hexdigest()
    with pytest.raises(InputError, match="missing.bin"):
        file_sha256(tmp_path / "missing.bin")
