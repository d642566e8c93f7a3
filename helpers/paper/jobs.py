"""Training jobs as JSON specs: rebuilt from the spec alone, in this process or in others.

A job spec holds everything notebook 03 or 04 uses to train one model: where the patch caches
are and how they were made, the split, the input pipeline's settings, the model, the
:class:`helpers.learning.train.TrainConfig` and the output folder. :func:`run_job` rebuilds the data,
the model and the pipeline from it with the notebooks' own helpers and calls
:func:`helpers.learning.train.fit`. Since a spec is plain JSON, a job can run

- in this process (:func:`run_job`);
- in a fresh process: ``python -m helpers.paper.jobs SPEC.json [SPEC2.json ...]``;
- on several GPUs at once with DDP: ``python -m torch.distributed.run --standalone
  --nproc-per-node N -m helpers.paper.jobs SPEC.json`` (or :func:`run_distributed` from a notebook;
  several machines: see :mod:`helpers.learning.distributed`);
- several jobs side by side, one per GPU (:func:`run_jobs`), e.g. notebook 04's six
  classifiers on a machine with several GPUs.

Kinds:

- ``classifier`` (notebook 04): ``arch``, ``scale``, the patch caches (``params``: the
  :class:`helpers.patching.caches.ExtractionParams` of the caches as a dict, ``cache_root``,
  ``data_dir``), ``train_cases``/``val_cases`` (case ids), ``input_size``, ``batch_size``,
  ``steps`` (batches per epoch; 0: one pass over the balanced patches), ``balance``,
  ``augment`` (off: no augmentation at all), ``color_jitter``, ``bn_batches``,
  ``val_max_patches`` (the validation sample), ``pretrained``/``weights_path``/
  ``frozen_stages``;
- ``segmentation`` (notebook 03): ``variant``, the caches and cases as above,
  ``input_size``, ``batch_size``, ``steps`` (0: one pass over the training patches),
  ``tumour_share``, ``augment``, ``color_jitter``, ``dice_per_image``, ``val_max_patches``,
  ``bn_batches``, ``pretrained``/``weights_path``;

and for both ``config`` (the ``TrainConfig`` fields; its ``seed`` also seeds the model's
initial weights, the batches and the augmentation, as in the notebooks), ``out_dir`` and
``meta`` (handed to ``fit`` unchanged: it identifies the run in its checkpoints).
"""

import json
import os
import subprocess
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ..core.atomic import write_json
from ..core.errors import InputError, check_type
from ..core.parallel import cap_torch_threads
from ..learning import distributed as dd

KINDS = ("classifier", "segmentation")


@dataclass
class ClassifierJob:
    """One patch classifier of notebook 04 (see the module docstring for the fields)."""

    arch: str
    scale: int
    params: dict
    cache_root: str
    data_dir: str
    train_cases: list
    val_cases: list
    out_dir: str
    input_size: int = 64
    batch_size: int = 32
    steps: int = 0
    balance: bool = True
    augment: bool = True
    color_jitter: float = 0.0
    bn_batches: int = 0
    val_max_patches: int = 512
    pretrained: bool = False
    weights_path: str = None
    frozen_stages: int = 0
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    progress: bool = False
    kind: str = "classifier"


@dataclass
class SegmentationJob:
    """The UNet++ of notebook 03 (see the module docstring for the fields)."""

    params: dict
    cache_root: str
    data_dir: str
    train_cases: list
    val_cases: list
    out_dir: str
    variant: str = "paper"
    input_size: int = 64
    batch_size: int = 16
    steps: int = 0
    tumour_share: float = 0.5
    augment: bool = True
    color_jitter: float = 0.0
    dice_per_image: bool = False
    val_max_patches: int = 384
    bn_batches: int = 0
    pretrained: bool = False
    weights_path: str = None
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    progress: bool = False
    kind: str = "segmentation"


def as_job(spec):
    """A :class:`ClassifierJob` or :class:`SegmentationJob` from a job, a dict or a JSON file.

    Args:
        spec: a job object, its dict (with ``kind``), or the path of its JSON file.

    Returns:
        The job object.

    Raises:
        InputError: an unknown ``kind``, an unknown or missing field (named), or a file that
            is not a JSON job spec.
    """
    if isinstance(spec, (ClassifierJob, SegmentationJob)):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        try:
            spec = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no such job spec") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not a JSON job spec ({exc})") from None
    check_type("spec", spec, dict, "a job spec (dict, ClassifierJob/SegmentationJob or JSON file)")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise InputError(f"job spec field 'kind' must be one of {KINDS}, got {kind!r}")
    cls = ClassifierJob if kind == "classifier" else SegmentationJob
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise InputError(f"{kind} job spec: unknown field(s) {unknown}; the fields are {sorted(names)}")
    missing = sorted(
        f.name for f in fields(cls) if f.name not in spec and f.default is MISSING and f.default_factory is MISSING
    )
    if missing:
        raise InputError(f"{kind} job spec: missing field(s) {missing}")
    return cls(**spec)


def spec_dict(job):
    """The JSON-able dict of a job (paths as strings), as :func:`write_spec` stores it.

    Args:
        job: anything :func:`as_job` takes.

    Returns:
        A dict.
    """
    d = asdict(as_job(job))
    for k in ("cache_root", "data_dir", "out_dir", "weights_path"):
        if d.get(k) is not None:
            d[k] = str(d[k])
    return d


def write_spec(job, path=None):
    """Write a job's spec as JSON, atomically.

    Args:
        job: anything :func:`as_job` takes.
        path: the file (default ``<out_dir>/job.json``: the spec stays beside what it trained).

    Returns:
        The path written.
    """
    d = spec_dict(job)
    path = Path(path) if path is not None else Path(d["out_dir"]) / "job.json"
    write_json(path, d)
    return path


def _cases(job):
    from ..wsi.dataset import list_cases

    by_id = {c.case_id: c for c in list_cases(job.data_dir)}
    out = {}
    for split in ("train_cases", "val_cases"):
        ids = getattr(job, split)
        check_type(split, ids, list, "a list of case ids")
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise InputError(f"job spec field {split!r}: no case {missing[:5]} in data_dir {job.data_dir}")
        if not ids:
            raise InputError(f"job spec field {split!r} is empty: name the cases of that split")
        out[split] = [by_id[i] for i in ids]
    return out["train_cases"], out["val_cases"]


def _job_settings(job):
    """``(config, params)``: the job's :class:`helpers.learning.train.TrainConfig` and
    :class:`helpers.patching.caches.ExtractionParams`, validated (an unknown field is named)."""
    from ..learning.train import TrainConfig
    from ..patching.caches import ExtractionParams

    try:
        config = TrainConfig(**job.config).validate()
    except TypeError as exc:
        raise InputError(
            f"job spec field 'config': {exc} (the fields are those of helpers.learning.train.TrainConfig)"
        ) from None
    try:
        params = ExtractionParams(**job.params).validate()
    except TypeError as exc:
        raise InputError(f"job spec field 'params': {exc} (the fields are those of ExtractionParams)") from None
    return config, params


def _classifier_args(job, params, train_cases, val_cases, seed):
    """:func:`build_job`'s model, batches, evaluator, loss, BatchNorm batches and ``prepare``
    for a classifier job, as notebook 04 builds them."""
    import torch

    from ..learning.models import build_classifier
    from .classification_data import (
        class_batches,
        class_prepare,
        load_class_patches,
        make_class_evaluator,
        require_both_classes,
    )

    tr = load_class_patches(train_cases, job.cache_root, params, job.scale, "training")
    va = load_class_patches(val_cases, job.cache_root, params, job.scale, "validation")
    require_both_classes(tr, "training")
    batches = class_batches(tr, job.batch_size, balance=job.balance, seed=seed, max_batches=job.steps or None)
    evaluate = make_class_evaluator(va, job.input_size, max_patches=job.val_max_patches, seed=seed)
    torch.manual_seed(seed)
    model = build_classifier(
        job.arch, pretrained=job.pretrained, weights_path=job.weights_path or None, frozen_stages=job.frozen_stages
    )
    bn = None
    if job.bn_batches:

        def bn(epoch):
            return class_batches(tr, job.batch_size, balance=False, seed=seed + 1, max_batches=job.bn_batches)(epoch)

    return {
        "model": model,
        "train_batches": batches,
        "evaluate": evaluate,
        "loss_fn": torch.nn.functional.cross_entropy,
        "bn_batches": bn,
        "prepare": class_prepare(job.input_size, augment=job.augment, color=job.color_jitter, seed=seed),
    }


def _segmentation_args(job, params, train_cases, val_cases, seed):
    """:func:`build_job`'s model, batches, evaluator, loss, BatchNorm batches and ``prepare``
    for a segmentation job, as notebook 03 builds them."""
    import torch

    from ..learning.unetpp import build_segmenter, deep_supervision_dice_loss
    from .segmentation_data import load_segmentation_patches, make_evaluator, segmentation_batches, segmentation_prepare

    train = load_segmentation_patches(train_cases, job.cache_root, params, "training")
    val = load_segmentation_patches(val_cases, job.cache_root, params, "validation")
    check_type("steps", job.steps, int)
    steps = job.steps or -(-len(train) // job.batch_size)
    batches = segmentation_batches(train, job.batch_size, steps, tumour_share=job.tumour_share, seed=seed)
    evaluate = make_evaluator(
        val, job.input_size, max_patches=job.val_max_patches, per_image=job.dice_per_image, seed=seed
    )
    torch.manual_seed(seed)
    model = build_segmenter(job.variant, pretrained=job.pretrained, weights_path=job.weights_path or None)
    bn = (
        segmentation_batches(train, job.batch_size, job.bn_batches, tumour_share=0.0, seed=seed + 1)
        if job.bn_batches
        else None
    )
    per_image = job.dice_per_image

    def loss_fn(out, m):
        return deep_supervision_dice_loss(out, m, per_image=per_image)

    return {
        "model": model,
        "train_batches": batches,
        "evaluate": evaluate,
        "loss_fn": loss_fn,
        "bn_batches": bn,
        "prepare": segmentation_prepare(job.input_size, augment=job.augment, color=job.color_jitter, seed=seed),
    }


def build_job(spec):
    """The arguments of :func:`helpers.learning.train.fit` for a job, built as notebook 03 or 04 builds them.

    Args:
        spec: a job, a spec dict or a JSON file (see :func:`as_job`).

    Returns:
        A dict: ``model``, ``train_batches``, ``evaluate``, ``loss_fn``, ``bn_batches``,
        ``prepare``, ``config``, ``out_dir``, ``meta``, ``progress``, ``batch_size``.
    """
    job = as_job(spec)
    config, params = _job_settings(job)
    train_cases, val_cases = _cases(job)
    build = _classifier_args if job.kind == "classifier" else _segmentation_args
    return {
        **build(job, params, train_cases, val_cases, config.seed),
        "config": config,
        "out_dir": job.out_dir,
        "meta": dict(job.meta),
        "progress": job.progress,
        "batch_size": job.batch_size,
    }


def run_job(spec, log=print):
    """Train one job: :func:`build_job` then :func:`helpers.learning.train.fit` (resuming from ``last.pt``).

    Under torchrun (the process group initialised, see :func:`helpers.learning.distributed.init_from_env`)
    every process calls this with the same spec and ``fit`` trains with DDP.

    Args:
        spec: anything :func:`as_job` takes.
        log: where ``fit``'s epoch lines go.

    Returns:
        The history DataFrame.
    """
    from ..learning.train import fit

    return fit(**build_job(spec), log=log)


def _history(job):
    import pandas as pd

    path = Path(as_job(job).out_dir) / "history.csv"
    if not path.exists():
        raise InputError(f"{path}: the job ended without a history; see its output above")
    return pd.read_csv(path)


def run_distributed(specs, nproc_per_node, nnodes=1, rdzv_endpoint=None, rdzv_id="paip-repro", env=None, log=print):
    """Train jobs one after another, each with DDP over ``nproc_per_node`` processes per machine.

    Writes each spec to ``<out_dir>/job.json`` and runs them with
    :func:`helpers.learning.distributed.launch` (a torchrun subprocess: safe from a notebook cell).

    Args:
        specs: a job or a list of jobs (see :func:`as_job`).
        nproc_per_node: processes on this machine, one per GPU.
        nnodes, rdzv_endpoint, rdzv_id, env: see :func:`helpers.learning.distributed.launch`.
        log: where the output goes.

    Returns:
        The history DataFrames, in the order of ``specs``.
    """
    jobs = [as_job(s) for s in (specs if isinstance(specs, (list, tuple)) else [specs])]
    files = [write_spec(j) for j in jobs]
    dd.launch(files, nproc_per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, env=env, log=log)
    return [_history(j) for j in jobs]


def _device_env(device, threads):
    """Environment for a job process bound to ``device`` (a CUDA index, or ``"cpu"``)."""
    env = {"CUDA_VISIBLE_DEVICES": "" if device == "cpu" else str(device)}
    if threads:
        env["OMP_NUM_THREADS"] = int(threads)
    for v in dd.TORCHRUN_VARIABLES:  # a job process is a plain single process
        env[v] = None
    return env


def run_jobs(specs, devices=None, threads=None, log=print):
    """Train several jobs: side by side, one per device, or one after another in this process.

    With two or more ``devices`` each job runs in a process of its own (``python -m
    helpers.paper.jobs``) that sees one device (``CUDA_VISIBLE_DEVICES``); as a job ends, the next
    starts on its device. Jobs are independent and seeded by their specs, so the outputs are
    those of running them one after another. With fewer than two devices they run one after
    another in this process.

    Args:
        specs: jobs (see :func:`as_job`); their ``out_dir`` must differ.
        devices: CUDA device indices, or ``"cpu"`` entries (processes on the CPU; e.g. on a
            machine with many cores). Default: every visible GPU.
        threads: torch threads per job process (``OMP_NUM_THREADS``); default torch's.
        log: where the jobs' output goes (prefixed with each job's folder name when side by side).

    Returns:
        The history DataFrames, in the order of ``specs``.

    Raises:
        InputError: two jobs share an ``out_dir``, or a device is neither an index nor ``"cpu"``.
        RuntimeError: a job failed (after the others have finished); names it, with the end
            of its output.
    """
    import torch

    jobs = [as_job(s) for s in specs]
    outs = [str(Path(j.out_dir).resolve()) for j in jobs]
    if len(set(outs)) != len(outs):
        raise InputError("run_jobs: two jobs have the same out_dir; give each job a folder of its own")
    if devices is None:
        devices = list(range(torch.cuda.device_count()))
    for d in devices:
        if d != "cpu" and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
            raise InputError(f"parameter 'devices': {d!r} is neither a CUDA device index nor 'cpu'")
    if len(devices) < 2:
        results = []
        for j in jobs:
            if devices and devices[0] != "cpu":
                with torch.cuda.device(devices[0]):
                    results.append(run_job(j, log=log))
            else:
                results.append(run_job(j, log=log))
        return results
    files = [write_spec(j) for j in jobs]
    names = [Path(j.out_dir).name for j in jobs]
    names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]  # unique output prefixes
    waiting, free, running, failures = list(range(len(jobs))), list(devices), {}, []
    streams = dd.OutputStreams(log)
    try:
        while waiting or running:
            while waiting and free:
                i, d = waiting.pop(0), free.pop(0)
                log(f"[{names[i]}] starting on {'the CPU' if d == 'cpu' else f'GPU {d}'}")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "helpers.paper.jobs", str(files[i])],
                    cwd=dd.REPO_ROOT,
                    env=dd.child_environment(_device_env(d, threads)),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                running[names[i]] = (i, d, proc)
                streams.add(names[i], proc)
            # Show the jobs' output until one ends, then give its device to the next job.
            for name, (rc, tail) in streams.wait(first=True).items():
                i, d, _ = running.pop(name)
                free.append(d)
                if rc != 0:
                    failures.append(f"{name} (exit code {rc}):\n" + "\n".join(tail[-8:]))
    except BaseException:  # e.g. the notebook's kernel is interrupted: stop the jobs too
        for _, _, proc in running.values():
            proc.terminate()
            proc.wait()
        raise
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(jobs)} jobs failed:\n" + "\n".join(failures))
    return [_history(j) for j in jobs]


def main(argv=None):
    """``python -m helpers.paper.jobs SPEC.json [...]``: train the jobs one after another.

    Under torchrun every process runs this and joins the process group first (DDP training).
    An input error is printed as one line (exit code 2).
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: python -m helpers.paper.jobs SPEC.json [SPEC2.json ...]")
        return 0 if argv else 2
    if "OMP_NUM_THREADS" not in os.environ:  # run_jobs and torchrun set it; a bare job runs under a CPU quota too
        cap_torch_threads()
    try:
        dd.init_from_env()
        for path in argv:
            run_job(path)
    except InputError as exc:
        print(f"error (rank {dd.rank()}): {exc}", file=sys.stderr)
        return 2
    finally:
        dd.cleanup()
    return 0


if __name__ == "__main__":
    status = main()
    if "RANK" in os.environ:  # a torchrun worker: leave without interpreter shutdown
        dd.exit_process(status)
    sys.exit(status)
