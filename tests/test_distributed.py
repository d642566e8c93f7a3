"""Training on several processes with DDP (gloo on the CPU: no GPU needed), the torchrun
launcher, jobs rebuilt from JSON specs, and several jobs side by side.

- two processes train a small BatchNorm-free network to the weights of one process training on
  the same global batches (no augmentation: each process augments its own slice with its own
  random stream, which one process cannot reproduce);
- a distributed run of notebook 04's pipeline killed with SIGKILL resumes from ``last.pt`` and
  ends exactly where an uninterrupted distributed run ends;
- two jobs run side by side (two processes) give exactly what they give one after another.
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
import pandas as pd
import pytest
import torch

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
# Process groups and killed runs in subprocesses (about a minute); the spec checks share the caches fixture.
pytestmark = pytest.mark.slow
N_TRAIN, BATCH = 61, 8  # 7 full batches of 8, then one of 5: uneven slices (3 + 2)


# -- the small network and its data, shared by the worker processes and the test ------------


def small_setup():
    from conftest import batches_from_arrays

    from helpers.learning.train import TrainConfig

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, N_TRAIN + 20)
    x = rng.integers(0, 60, (N_TRAIN + 20, 8, 8, 3)).astype(np.uint8)
    x[y == 1, :, :, 0] += 120
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 6, 2)
    )
    config = TrainConfig(epochs=3, optimizer="sgd", lr=0.05, momentum=0.9, device="cpu", seed=0)

    def train_batches(epoch, batch=BATCH):
        return batches_from_arrays(x[:N_TRAIN], y[:N_TRAIN], batch, shuffle=True, seed=epoch)

    def evaluate(m, device):
        xb = torch.from_numpy(x[N_TRAIN:]).permute(0, 3, 1, 2).float() / 255
        out = m(xb)
        return {
            "val_loss": float(torch.nn.functional.cross_entropy(out, torch.from_numpy(y[N_TRAIN:]))),
            "val_acc": float((out.argmax(1).numpy() == y[N_TRAIN:]).mean()),
        }

    def loss(out, yb):
        return torch.nn.functional.cross_entropy(out, yb.long())

    return model, train_batches, evaluate, loss, config


def worker(out_dir):
    """One process of a torchrun'd group: the refusals first, then the training."""
    from helpers.core.errors import InputError
    from helpers.learning import distributed as dd
    from helpers.learning.train import fit

    torch.set_num_threads(1)
    assert dd.init_from_env() and dd.world_size() == 2
    out = Path(out_dir)
    model, tb, ev, loss, cfg = small_setup()
    quiet = dict(progress=False, log=lambda *_: None)
    errors = []
    for kwargs in ({"batch_size": 7}, {"train_batches": lambda e: tb(e, 7)}):
        try:
            fit(
                model,
                **{"train_batches": tb, **kwargs},
                evaluate=ev,
                loss_fn=loss,
                config=cfg,
                out_dir=out / "refused",
                **quiet,
            )
        except InputError as exc:
            errors.append(str(exc))
    (out / f"errors{dd.rank()}.txt").write_text("\n".join(errors))
    fit(model, tb, ev, loss, cfg, out / "ddp", batch_size=BATCH, progress=False)
    torch.save(model.state_dict(), out / f"rank{dd.rank()}.pt")
    dd.cleanup()


if __name__ == "__main__":
    from helpers.learning.distributed import exit_process

    worker(sys.argv[1])
    exit_process(0)  # see its docstring: DDP's process group and interpreter shutdown


# -- the tests ------------------------------------------------------------------------------

from helpers.core.errors import InputError  # noqa: E402
from helpers.learning import distributed as dd  # noqa: E402
from helpers.learning.train import fit  # noqa: E402
from helpers.paper.jobs import ClassifierJob, SegmentationJob, run_distributed, run_jobs, write_spec  # noqa: E402
from helpers.patching.caches import ExtractionParams  # noqa: E402
from helpers.patching.patches import extract_dataset  # noqa: E402
from helpers.wsi.dataset import list_cases  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def test_two_gloo_processes_train_as_one_process_on_the_global_batch(tmp_path):
    cmd = dd.torchrun_command([HERE, tmp_path], nproc_per_node=2, module=False)
    res = subprocess.run(cmd, cwd=REPO, env=dd.child_environment(ENV), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    # Rank 0 said how it trains, once.
    assert res.stdout.count("distributed training: 2 processes (gloo), global batch 8 = 4 per process") == 1
    assert "not scaled with the number of processes" in res.stdout and "BatchNorm per process" in res.stdout
    # A batch that does not split evenly is refused on every rank, naming the parameter.
    for r in (0, 1):
        given, first = (tmp_path / f"errors{r}.txt").read_text().split("\n")
        assert given.startswith("parameter 'batch_size' (7) must divide by the 2 processes")
        assert first.startswith("the first training batch holds 7 patches")
    # DDP keeps the two replicas identical.
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)

    model, tb, ev, loss, cfg = small_setup()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = fit(model, tb, ev, loss, cfg, tmp_path / "single", progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    for k, v in model.state_dict().items():
        assert (v - init[k]).abs().max() > 1e-2  # the weights moved
        torch.testing.assert_close(w0[k], v, rtol=1e-5, atol=1e-6)  # and to the same place
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2 and ddp["epoch"] == 3
    for a, b in zip(ddp["history"], single.to_dict("records")):
        for col in ("train_loss", "val_loss", "val_acc", "lr"):
            assert a[col] == pytest.approx(b[col], rel=1e-5, abs=1e-7), col


@pytest.fixture(scope="module")
def caches(small_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_caches")
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


def classifier_job(caches, out_dir, epochs=4):
    # 26 balanced patches per epoch: batches of 10, 10 and 6 (5 + 5 and 3 + 3 per process).
    return ClassifierJob(
        arch="efficientnet_b0",
        scale=4,
        params=caches["cls"],
        cache_root=caches["cache_root"],
        data_dir=caches["data_dir"],
        train_cases=caches["ids"],
        val_cases=["tiny_t1"],
        out_dir=str(out_dir),
        input_size=32,
        batch_size=10,
        color_jitter=0.06,
        bn_batches=2,
        config={"epochs": epochs, "optimizer": "sgd", "lr": 0.003, "seed": 5, "device": "cpu"},
        meta={"test": "ddp"},
    )


def segmentation_job(caches, out_dir):
    return SegmentationJob(
        params=caches["seg"],
        cache_root=caches["cache_root"],
        data_dir=caches["data_dir"],
        train_cases=caches["ids"],
        val_cases=["tiny_t2"],
        out_dir=str(out_dir),
        input_size=32,
        batch_size=4,
        steps=3,
        val_max_patches=8,
        bn_batches=2,
        color_jitter=0.06,
        config={"epochs": 2, "optimizer": "adam", "lr": 2e-3, "seed": 5, "device": "cpu"},
        meta={"test": "jobs"},
    )


def descendants(pid):
    """Every process below ``pid`` (from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def checkpoints_identical(a, b):
    ca, cb = (torch.load(p, weights_only=False) for p in (a, b))
    assert ca["epoch"] == cb["epoch"]
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = [pd.DataFrame(c["history"]).drop(columns="seconds") for c in (ca, cb)]
    pd.testing.assert_frame_equal(*strip, check_exact=True)
    for ra, rb in zip(ca["rng"], cb["rng"]):
        for dev, state in ra["prepare"]["generators"].items():
            assert torch.equal(state, rb["prepare"]["generators"][dev])


def test_a_killed_distributed_run_resumes_from_last_pt(caches, tmp_path):
    job = classifier_job(caches, tmp_path / "killed")
    spec = write_spec(job)
    out = Path(job.out_dir)
    cmd = dd.torchrun_command(["helpers.paper.jobs", spec], nproc_per_node=2)
    agent = subprocess.Popen(
        cmd, cwd=REPO, env=dd.child_environment(ENV), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    t = time.monotonic()
    while not (out / "history.csv").exists():  # epoch 1 saved: kill the run in epoch 2
        assert agent.poll() is None and time.monotonic() - t < 120, "the run ended or hung before epoch 1"
        time.sleep(0.01)
    for pid in descendants(agent.pid) + [agent.pid]:  # the workers and torchrun itself
        os.kill(pid, signal.SIGKILL)
    agent.wait()
    killed_at = torch.load(out / "last.pt", weights_only=False)["epoch"]
    assert 1 <= killed_at < 4  # killed before the end

    logs = []
    dd.launch([spec], nproc_per_node=2, env=ENV, log=logs.append)  # the same command again
    assert any(f"resumed from {out / 'last.pt'} after epoch {killed_at}" in m for m in logs)
    assert sum("distributed training: 2 processes (gloo), global batch 10 = 5 per process" in m for m in logs) == 1

    (full,) = run_distributed(
        classifier_job(caches, tmp_path / "uninterrupted"), nproc_per_node=2, env=ENV, log=lambda *_: None
    )
    assert list(full.epoch) == [1, 2, 3, 4]
    checkpoints_identical(out / "last.pt", tmp_path / "uninterrupted" / "last.pt")


def test_jobs_side_by_side_give_what_they_give_one_after_another(caches, tmp_path):
    jobs = [
        classifier_job(caches, tmp_path / "seq" / "cls", epochs=2),
        segmentation_job(caches, tmp_path / "seq" / "seg"),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = run_jobs(jobs, devices=[], log=lambda *_: None)  # in this process, in turn
    finally:
        torch.set_num_threads(threads)
    par_jobs = [
        classifier_job(caches, tmp_path / "par" / "cls", epochs=2),
        segmentation_job(caches, tmp_path / "par" / "seg"),
    ]
    logs = []
    par = run_jobs(par_jobs, devices=["cpu", "cpu"], threads=1, log=logs.append)  # two processes at once
    assert sum("starting on the CPU" in m for m in logs) == 2
    assert any(m.startswith("[cls] epoch 2/2") for m in logs) and any(m.startswith("[seg] epoch 2/2") for m in logs)
    for s, p, name in zip(seq, par, ("cls", "seg")):
        assert len(s) == len(p) == 2
        checkpoints_identical(tmp_path / "seq" / name / "last.pt", tmp_path / "par" / name / "last.pt")
        assert (tmp_path / "par" / name / "job.json").exists()  # the spec it ran, kept


def test_bad_job_specs_and_launcher_arguments_are_named(caches, tmp_path):
    from helpers.paper.jobs import as_job, build_job

    with pytest.raises(InputError, match="'kind' must be one of"):
        as_job({"kind": "detector"})
    with pytest.raises(InputError, match=r"unknown field\(s\) \['epochs'\]"):
        as_job({**write_and_read(classifier_job(caches, tmp_path / "a"), tmp_path), "epochs": 3})
    with pytest.raises(InputError, match=r"missing field\(s\) \['arch'"):
        as_job({"kind": "classifier"})
    bad = classifier_job(caches, tmp_path / "b")
    bad.val_cases = ["no_such_case"]
    with pytest.raises(InputError, match=r"'val_cases': no case \['no_such_case'\]"):
        build_job(bad)
    bad = classifier_job(caches, tmp_path / "c")
    bad.config = {"epoch": 3}
    with pytest.raises(InputError, match="job spec field 'config'"):
        build_job(bad)
    with pytest.raises(InputError, match="same out_dir"):
        run_jobs([classifier_job(caches, tmp_path / "d")] * 2, devices=[])
    with pytest.raises(InputError, match="rdzv_endpoint"):
        dd.torchrun_command(["helpers.paper.jobs", "x.json"], 8, nnodes=2)
    cmd = dd.torchrun_command(["helpers.paper.jobs", "x.json"], 8, nnodes=2, rdzv_endpoint="node1:29400")
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "8",
        "--nnodes",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "node1:29400",
        "--rdzv-id",
        "paip-repro",
        "-m",
        "helpers.paper.jobs",
        "x.json",
    ]
    with pytest.raises(InputError, match="no such job spec"):
        dd.launch([tmp_path / "missing.json"], 2)


def write_and_read(job, tmp_path):
    import json

    return json.loads(write_spec(job, tmp_path / "spec.json").read_text())
