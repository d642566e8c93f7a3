"""Exact resume: a training run killed with SIGKILL, mid-epoch or at an epoch boundary, and rerun
ends bit for bit where an uninterrupted run ends (weights, optimizer, history, random states).

The runs use notebook 03's and 04's own pipelines (patch caches of the tiny dataset, the
``helpers.paper.segmentation`` / ``helpers.paper.classification`` batches, augmentation on the device, BatchNorm
recalibration, the paper's UNet++ and EfficientNet-B0), built from a job spec by
``helpers.paper.jobs.build_job``, at tiny sizes. Each run is a subprocess of this file (one torch
thread, so that the numbers are comparable); the subprocess stops at a chosen moment (a training
step, or the end of an epoch: after its checkpoint) and waits there until the test kills it
with SIGKILL.
"""

import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
EPOCHS = 3


# -- the child process ----------------------------------------------------------------------


def child(spec, hook):
    """Train ``spec`` with ``fit``; ``hook``: ``none``, ``step:K`` (stop before the K-th training
    step of this process), ``epoch:E`` (stop once epoch E is saved and logged) or ``keep``
    (copy ``last.pt`` to ``epoch<E>.pt`` after every epoch). Stopping = write ``<spec>.stopped``
    and sleep until killed."""
    torch.set_num_threads(1)
    from helpers.learning.train import fit
    from helpers.paper.jobs import build_job

    args = build_job(spec)
    out = Path(args["out_dir"])
    kind, _, arg = hook.partition(":")

    def stop():
        Path(spec).with_suffix(".stopped").write_text(str(os.getpid()))
        time.sleep(300)

    if kind == "step":
        loss, calls = args["loss_fn"], [0]

        def loss_fn(o, y):
            calls[0] += 1
            if calls[0] == int(arg):
                stop()
            return loss(o, y)

        args["loss_fn"] = loss_fn

    def log(msg):
        print(msg, flush=True)
        if kind == "epoch" and msg.startswith(f"epoch {arg}/"):
            stop()
        if kind == "keep" and msg.startswith("epoch "):
            e = msg.split("/")[0].split()[1]
            (out / f"epoch{e}.pt").write_bytes((out / "last.pt").read_bytes())

    fit(**args, log=log)


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
    sys.exit(0)


# -- the tests ------------------------------------------------------------------------------

from helpers.learning.train import SeededPrepare  # noqa: E402
from helpers.paper.jobs import ClassifierJob, SegmentationJob, write_spec  # noqa: E402
from helpers.patching.caches import ExtractionParams  # noqa: E402
from helpers.patching.patches import extract_dataset  # noqa: E402
from helpers.wsi.dataset import list_cases  # noqa: E402


@pytest.fixture(scope="module")
def caches(small_dataset, tmp_path_factory):
    """1x caches with masks (segmentation) and overlapping 4x caches (classification)."""
    root = tmp_path_factory.mktemp("resume_caches")
    seg, cls = ExtractionParams(), ExtractionParams(stride=112)
    cases = list_cases(small_dataset)
    extract_dataset(cases, [1], root, seg, workers=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some tiny slides are too small at 4x: not the point here
        extract_dataset(cases, [4], root, cls, workers=1, progress=False)
    return {
        "data_dir": str(small_dataset),
        "cache_root": str(root),
        "seg": asdict(seg),
        "cls": asdict(cls),
        "ids": [c.case_id for c in cases],
    }


def make_job(kind, caches, out_dir):
    config = {"epochs": EPOCHS, "seed": 7, "device": "cpu", "lr_patience": 1}
    common = {
        "cache_root": caches["cache_root"],
        "data_dir": caches["data_dir"],
        "train_cases": caches["ids"],
        "out_dir": str(out_dir),
        "input_size": 32,
        "batch_size": 4,
        "color_jitter": 0.06,
        "bn_batches": 2,
        "meta": {"test": "resume", "kind": kind},
    }
    if kind == "segmentation":
        return SegmentationJob(
            params=caches["seg"],
            val_cases=["tiny_t2"],
            steps=3,
            val_max_patches=8,
            config={**config, "optimizer": "adam", "lr": 2e-3},
            **common,
        )
    return ClassifierJob(
        arch="efficientnet_b0",
        scale=4,
        params=caches["cls"],
        val_cases=["tiny_t1"],
        config={**config, "optimizer": "sgd", "lr": 0.01},
        **common,
    )


def start(spec, hook):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    out = open(Path(spec).with_suffix(f".{hook.replace(':', '_')}.log"), "w")
    return subprocess.Popen(
        [sys.executable, str(HERE), str(spec), hook], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
    )


def log_of(spec, hook):
    return Path(spec).with_suffix(f".{hook.replace(':', '_')}.log").read_text()


def kill_when_stopped(proc, spec, hook, timeout=120):
    """Wait until the child stops at its hook, then SIGKILL it."""
    flag = Path(spec).with_suffix(".stopped")
    t = time.monotonic()
    while not flag.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"the run ({hook}) ended (code {proc.returncode}) before its stop:\n" + log_of(spec, hook)[-2000:]
            )
        if time.monotonic() - t > timeout:
            proc.kill()
            pytest.fail(f"the run ({hook}) did not reach its stop in {timeout} s")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    flag.unlink()


def finish(proc, spec, hook):
    assert proc.wait(timeout=180) == 0, log_of(spec, hook)[-3000:]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_identical(a, b, where="checkpoint"):
    """Nested dicts/lists/tensors/arrays equal exactly (``seconds`` of history rows left out)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        keys = set(a) - {"seconds"}
        assert keys == set(b) - {"seconds"}, where
        for k in keys:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_identical(u, v, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here


def assert_same_run(a, b):
    ca, cb = load(a), load(b)
    for key in ("epoch", "model", "optimizer", "scheduler", "history", "best", "stale", "rng"):
        assert_identical(ca[key], cb[key], key)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["segmentation", "classifier"])
def test_killed_runs_resume_exactly(kind, caches, tmp_path):
    ref_spec = write_spec(make_job(kind, caches, tmp_path / "uninterrupted"), tmp_path / "ref.json")
    spec = write_spec(make_job(kind, caches, tmp_path / "killed"), tmp_path / "run.json")
    out = tmp_path / "killed"
    ref = start(ref_spec, "keep")  # the uninterrupted run, alongside (one thread each)
    from helpers.paper.jobs import build_job

    steps = len(build_job(spec)["train_batches"](0))

    # 1. Killed in the middle of epoch 2 (before its second step): last.pt holds epoch 1.
    hook = f"step:{steps + 2}"
    proc = start(spec, hook)
    kill_when_stopped(proc, spec, hook)
    assert load(out / "last.pt")["epoch"] == 1

    # 2. Rerun: resumes after epoch 1; killed at the boundary, once epoch 2 is saved.
    proc = start(spec, "epoch:2")
    kill_when_stopped(proc, spec, "epoch:2")
    assert "resumed from" in log_of(spec, "epoch:2") and "after epoch 1" in log_of(spec, "epoch:2")
    finish(ref, ref_spec, "keep")
    assert_same_run(tmp_path / "uninterrupted" / "epoch2.pt", out / "last.pt")  # the mid-epoch kill

    # 3. Rerun: resumes after epoch 2 and finishes.
    proc = start(spec, "none")
    finish(proc, spec, "none")
    assert "after epoch 2" in log_of(spec, "none")
    assert_same_run(tmp_path / "uninterrupted" / "last.pt", out / "last.pt")  # the boundary kill

    # The comparison is not trivial: the weights moved, and augmentation drew random numbers.
    final, first = load(out / "last.pt"), load(tmp_path / "uninterrupted" / "epoch1.pt")
    assert final["epoch"] == EPOCHS and len(final["history"]) == EPOCHS
    assert any(not torch.equal(final["model"][k], first["model"][k]) for k in final["model"])
    fresh = torch.Generator().manual_seed(7).get_state()
    assert not torch.equal(final["rng"][0]["prepare"]["generators"]["cpu"], fresh)


def test_seeded_prepare_state_round_trip():
    def fn(x, y, device, train, generator):
        return x + torch.rand(x.shape, generator=generator(device)), y

    a = SeededPrepare(fn, seed=3)
    x = torch.zeros(2, 3)
    first, _ = a(x, None, "cpu", True)
    state = a.state_dict()
    nxt, _ = a(x, None, "cpu", True)
    b = SeededPrepare(fn, seed=3)
    b.load_state_dict(state)  # before its generator exists: taken on first use
    assert torch.equal(b(x, None, "cpu", True)[0], nxt) and not torch.equal(nxt, first)
    c = SeededPrepare(fn, seed=3)
    c(x, None, "cpu", True)
    c(x, None, "cpu", True)
    c.load_state_dict(state)  # after: its generator is rewound
    assert torch.equal(c(x, None, "cpu", True)[0], nxt)
    assert torch.equal(SeededPrepare(fn, seed=3)(x, None, "cpu", True)[0], first)
