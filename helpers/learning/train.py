"""One training loop for the segmentation (notebook 03) and classification (notebook 04) models.

What it does for every model: picks the device (CUDA, else CPU), uses bf16 autocast and
channels_last on a GPU, seeds everything, shows a progress bar, writes a history file (loss,
metrics and learning rate per epoch), keeps ``best.pt`` and ``last.pt`` checkpoints (written
atomically, with the parameters and library versions inside), resumes from ``last.pt`` when
rerun, reduces the learning rate on a plateau (the paper's schedule for both classifiers) and
stops early when asked to.

The caller supplies the data as functions, so the loop knows nothing of patches or masks:
``train_batches(epoch)`` yields CPU batches ``(x, y)``, ``prepare`` moves one to the device
(and augments it, on the device, for training), ``evaluate(model, device)`` returns the
validation metrics.

Using a trained model: :func:`trained_network` reads a ``best.pt``, refuses one trained with
settings that must agree and do not (the caller names them), and loads its weights into the
network built from the settings it records; :func:`read_trained` only reads and checks. Every
helper that applies a trained model loads it so (one error for a missing or unreadable file,
other settings, or weights that do not fit).

Exact resume: every random state lives in ``last.pt`` (torch, CUDA, numpy and Python, and the
augmentation generators of a ``prepare`` that has ``state_dict()``, such as
:class:`SeededPrepare`), and epoch ``e``'s batches depend only on ``e``, so a run killed at any
moment and rerun ends with the same weights and history, bit for bit, as one never
interrupted (same machine, same thread count).

Several GPUs: when a ``torch.distributed`` process group of more than one process is
initialised (see :mod:`helpers.learning.distributed`; one process per GPU, started by ``torchrun``),
every process runs :func:`fit` with the same arguments and the model is wrapped in
``DistributedDataParallel``:

- each process takes its slice of every batch of ``train_batches`` (a global batch of
  ``batch_size``, which must divide by the number of processes), and DDP averages the
  gradients, so a step is the step of one process on the whole batch (a loss pooled over
  the batch, such as a batch-pooled Dice, is pooled over each slice). The learning rate
  is used as configured, not scaled with the number of processes;
- on GPUs BatchNorm layers become ``SyncBatchNorm`` (statistics over the global batch);
  on CPUs (gloo) torch has no SyncBatchNorm, so each process normalises over its slice
  and rank 0's running statistics are the ones kept;
- rank 0 alone validates, logs and writes the checkpoints and the history; the validation
  metrics reach every process, so the learning-rate schedule and early stopping agree;
- every process loads ``last.pt`` on resume (``out_dir`` must be visible to all of them),
  and the random states of every rank are saved in it.
"""

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.optim.swa_utils import update_bn

from ..core.atomic import atomic_path
from ..core.errors import DiskFullError, InputError, check_positive, check_type, is_disk_full
from ..core.parallel import ReadAhead, pin_batch
from ..core.progress import progress_bar
from ..core.seeding import library_versions, seed_everything
from . import distributed as dd


@dataclass
class TrainConfig:
    """Optimiser, schedule and stopping rule of one training run.

    Attributes:
        epochs: epochs in all (a rerun with more epochs continues from ``last.pt``).
        optimizer: ``sgd`` (the paper's EfficientNet-B0) or ``adam`` (its ResNet-50).
        lr: initial learning rate.
        momentum: SGD momentum (paper: 0.9).
        weight_decay: L2 weight decay (paper, EfficientNet-B0: 1e-4).
        lr_factor: learning rate multiplied by this on a plateau (paper: 0.1).
        lr_patience: epochs without improvement before the rate drops (paper: 8 and 25).
        early_stop_patience: epochs without improvement before stopping; 0 = never.
        monitor: the history column watched for "improvement" (e.g. ``val_loss``).
        mode: ``min`` or ``max`` for ``monitor``.
        seed: seeds Python, numpy and torch.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        amp: bf16 autocast on CUDA.
        channels_last: channels-last memory format on CUDA.
    """

    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_factor: float = 0.1
    lr_patience: int = 8
    early_stop_patience: int = 0
    monitor: str = "val_loss"
    mode: str = "min"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True

    def validate(self):
        """Raise :class:`InputError` naming the first bad field; return self."""
        check_positive("epochs", self.epochs, integer=True)
        if self.optimizer not in ("sgd", "adam"):
            raise InputError(f"parameter 'optimizer' must be 'sgd' or 'adam', got {self.optimizer!r}")
        check_positive("lr", self.lr)
        for name in ("momentum", "weight_decay", "lr_factor"):
            check_type(name, getattr(self, name), (int, float))
        check_type("lr_patience", self.lr_patience, int)
        check_type("early_stop_patience", self.early_stop_patience, int)
        if self.mode not in ("min", "max"):
            raise InputError(f"parameter 'mode' must be 'min' or 'max', got {self.mode!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"parameter 'device' must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        check_type("seed", self.seed, int)
        return self


def select_device(pref="auto"):
    """``torch.device``: CUDA when asked for or available (``auto``), else the CPU."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available; use device='auto'")
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def save_checkpoint(path, payload):
    """``torch.save`` through a temporary file: an interrupted save leaves the old checkpoint.

    A full disk is :class:`helpers.core.errors.DiskFullError`, although torch reports it as its
    own ``RuntimeError`` ("unexpected pos"): :func:`helpers.core.atomic.atomic_path` finds the
    ``ENOSPC`` behind it.
    """
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path):
    """Read a checkpoint written by :func:`fit` (on the CPU), as it is: the low-level reader of
    resuming and of :func:`read_trained`. To use a trained model, see :func:`trained_network`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc}); delete it to train from scratch"
        ) from None


def _load_weights(model, ck, path, what, fix):
    """Load checkpoint ``ck``'s weights (read from ``path``) into ``model``; weights of another
    network are an :class:`InputError` naming the file, ``what`` they do not fit and the ``fix``."""
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise InputError(f"{path}: its weights do not fit {what} ({str(exc)[:200]}); {fix}") from None


def checkpoint_meta(ck):
    """The ``meta`` a checkpoint of :func:`fit` records: the settings it was trained with."""
    return (ck.get("identity") or {}).get("meta", {})


#: What the error of a checkpoint trained with other settings says to do, unless told otherwise.
OTHER_SETTINGS_FIX = "use the matching parameters or another run_name"


def read_trained(checkpoint, meta=None, keys=None, fix=OTHER_SETTINGS_FIX):
    """Read a trained model's checkpoint (``best.pt``/``last.pt`` of :func:`fit`) and check the
    settings it was trained with, without loading its weights into a network (e.g. to plan).

    Args:
        checkpoint: the file.
        meta: settings the checkpoint must have been trained with; ``None``: nothing to check.
        keys: the keys of ``meta`` that must agree, for a model applied elsewhere (a key the
            checkpoint does not record, as in an older one, is not compared); default: every
            key of either, i.e. the same ``meta`` (another architecture, input size or mask
            would give wrong results silently).
        fix: what to do about other settings, said in the error.

    Returns:
        The checkpoint dict (``model`` weights, ``epoch``, ``history``, ``identity`` ...).

    Raises:
        InputError: naming the file and the fix: the file is missing, cannot be read as a
            checkpoint, or was trained with other settings.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise InputError(f"{checkpoint}: no checkpoint; train first (the notebook's training section)")
    ck = load_checkpoint(checkpoint)
    if not isinstance(ck, dict) or "model" not in ck:
        raise InputError(
            f"{checkpoint}: cannot be read as a checkpoint (it holds no model weights: not a file of "
            "helpers.learning.train.fit); delete it and train again, or name another checkpoint"
        )
    if meta is None:
        return ck
    theirs = checkpoint_meta(ck)
    names = set(theirs) | set(meta) if keys is None else [k for k in keys if k in theirs]
    diff = sorted(k for k in names if theirs.get(k) != meta.get(k))
    if diff:
        raise InputError(
            f"{checkpoint} was trained with other settings: "
            + ", ".join(f"{k} {theirs.get(k)!r} (here {meta.get(k)!r})" for k in diff[:5])
            + f"; {fix}"
        )
    return ck


def trained_network(build, checkpoint, meta=None, keys=None, fix=OTHER_SETTINGS_FIX):
    """A trained model, the one way every helper loads one: its checkpoint read and checked
    (:func:`read_trained`), the network built by ``build`` from the settings the checkpoint
    records, the weights loaded into it.

    Args:
        build: ``build(meta)`` -> the untrained network of the architecture that the
            checkpoint's own ``meta`` names (e.g. ``lambda m: build_classifier(m["arch"])``).
        checkpoint, meta, keys, fix: as for :func:`read_trained`.

    Returns:
        ``(network, checkpoint dict)``.

    Raises:
        InputError: as for :func:`read_trained`, or weights that do not fit the network built.
    """
    ck = read_trained(checkpoint, meta, keys, fix)
    network = build(checkpoint_meta(ck))
    fits = "the file holds another network than its settings name: train it again"
    _load_weights(network, ck, checkpoint, "the network built for them", fits)
    return network, ck


def load_trained(model, checkpoint, meta, keys=None, fix=OTHER_SETTINGS_FIX):
    """Load ``checkpoint`` (a ``best.pt``/``last.pt`` of :func:`helpers.learning.train.fit`) into ``model``:
    :func:`trained_network` for a network already built.

    Args:
        model: the network, built with the same settings as the one trained.
        checkpoint: the file.
        meta: the ``meta`` dict this notebook trains with; the checkpoint must hold the same
            (another architecture, input size or mask would give wrong masks silently).
        keys, fix: as for :func:`read_trained`.

    Returns:
        The checkpoint dict (epoch, history, versions ...), weights loaded into ``model``.
    """
    return trained_network(lambda _: model, checkpoint, meta, keys, fix)[1]


def default_prepare(x, y, device, train):
    """Move a batch to the device; uint8 images become floats in [0, 1]."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return x, y.to(device, non_blocking=True)


def _better(a, b, mode):
    return b is None or (a < b if mode == "min" else a > b)


class SeededPrepare:
    """A ``prepare`` callable whose augmentation draws from generators of its own, which
    :func:`fit` saves in ``last.pt`` and restores on resume (so a resumed run is exact).

    One ``torch.Generator`` per device type, created on first use and seeded with ``seed``
    (in distributed training, rank ``r`` > 0 uses :func:`helpers.learning.distributed.rank_seed`, so the
    ranks' slices are augmented differently).

    Args:
        fn: ``fn(x, y, device, train, generator)`` -> the device batch, where
            ``generator(device)`` returns this object's generator for that device.
        seed: the augmentation seed.

    Example:
        ``prepare = SeededPrepare(lambda x, y, dev, train, gen: (augment_batch(x.to(dev),
        generator=gen(dev)), y.to(dev)), seed=0)``
    """

    def __init__(self, fn, seed=0):
        check_type("seed", seed, int)
        self.fn, self.seed = fn, seed
        self._generators, self._pending = {}, {}

    def generator(self, device):
        """This object's generator on ``device`` (created, and seeded or restored, on first use)."""
        device = torch.device(device)
        g = self._generators.get(device.type)
        if g is None:
            g = torch.Generator(device=device)
            state = self._pending.pop(device.type, None)
            if state is None:
                g.manual_seed(dd.rank_seed(self.seed))
            else:
                g.set_state(state)
            self._generators[device.type] = g
        return g

    def __call__(self, x, y, device, train):
        return self.fn(x, y, device, train, self.generator)

    def state_dict(self):
        """``{"seed", "generators": {device type: state}}``: what :meth:`load_state_dict` takes."""
        states = dict(self._pending)
        states.update({k: g.get_state() for k, g in self._generators.items()})
        return {"seed": self.seed, "generators": states}

    def load_state_dict(self, state):
        """Continue each generator from ``state`` (one not yet created continues when it is)."""
        self._pending = {}
        for kind, s in state["generators"].items():
            if kind in self._generators:
                self._generators[kind].set_state(s)
            else:
                self._pending[kind] = s


def recalibrate_batchnorm(model, batches, prepare, device, autocast=contextlib.nullcontext):
    """Recompute every BatchNorm layer's running statistics as a plain average over ``batches``.

    BatchNorm normalises with each batch's own statistics in training but with running averages
    (mostly the last ten or so batches) at evaluation; early in training, with a high learning
    rate, the weights move faster than those averages follow, and a model good in training mode
    can be poor in evaluation mode (on the demo: validation Dice 0.43 with the running averages,
    0.98 recomputed, same weights). Recomputing them with the final weights ("precise BN", Wu and
    Johnson 2021; ``torch.optim.swa_utils.update_bn``) closes that gap for a few forward passes.

    Args:
        model: the network.
        batches: an iterable of CPU batches ``(x, y)``, drawn as at inference (no augmentation
            is applied: ``prepare`` is called with ``train=False``).
        prepare: as for :func:`fit`.
        device: the model's device.
        autocast: a context manager factory for the forward passes (as in training).

    Returns:
        The number of batches used (0 when the model has no BatchNorm layer).
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta, was = [m.momentum for m in bns], model.training
    count = 0

    def inputs():
        nonlocal count
        for x, y in batches:
            count += 1
            yield prepare(x, y, device, False)[0]

    try:
        with autocast():
            update_bn(inputs(), model)
    finally:  # update_bn leaves momentum None (a cumulative average) if a batch fails
        for m, mo in zip(bns, momenta):
            m.momentum = mo
        model.train(was)
    return count


def _training_device(config, distributed):
    """The device of this process: one GPU per process in distributed training."""
    device = select_device(config.device)
    if not distributed:
        return device
    backend = torch.distributed.get_backend()
    if device.type == "cuda":
        device = torch.device("cuda", dd.local_rank())
        torch.cuda.set_device(device)
    elif backend == "nccl":
        raise InputError(
            "the process group uses NCCL, which needs GPUs, but parameter 'device' is 'cpu'; use "
            "device='auto' (or 'cuda'), or initialise the group with backend='gloo'"
        )
    return device


def _rng_state(prepare, device):
    """Every random state of this process: torch (and CUDA), numpy, Python, and ``prepare``'s."""
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    if hasattr(prepare, "state_dict"):
        s["prepare"] = prepare.state_dict()
    return s


def _restore_rng(saved, prepare, device, log):
    """Set this rank's random states from a checkpoint's ``rng`` entry (a list, one per rank)."""
    if isinstance(saved, dict):  # checkpoints written before the states were kept per rank
        saved = [saved]
    world = dd.world_size()
    if not saved or len(saved) != world:
        log(
            f"note: last.pt was written by {len(saved or [])} processes and {world} resume it: the random "
            "streams (augmentation) start again from the seed, so the numbers differ from an uninterrupted run"
        )
        return
    s = saved[dd.rank()]
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    if "python" in s:
        random.setstate(s["python"])
    if "cuda" in s and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)
    if hasattr(prepare, "load_state_dict"):
        if "prepare" in s:
            prepare.load_state_dict(s["prepare"])
        else:
            log(
                "note: last.pt holds no augmentation state (written by an older version): augmentation "
                "continues from its seed, so the numbers differ slightly from an uninterrupted run"
            )


def _slicer(rank, world):
    """``(x, y) -> (x_r, y_r, n)``: rank ``rank``'s slice of a global batch of ``n`` patches.

    Slices are contiguous and differ in size by at most one patch (only a last, smaller batch
    of an epoch can be uneven).
    """

    def take(batch):
        x, y = batch
        n = len(x)
        lo, hi = n * rank // world, n * (rank + 1) // world
        return x[lo:hi], y[lo:hi], n

    return take


#: What only resuming needs: ``last.pt`` holds it, ``best.pt`` (the model to use) does not, which
#: makes it a third of the size with Adam (ResNet-50: 94 MB instead of 283 MB).
RESUME_ONLY = ("optimizer", "scheduler", "rng", "stale")


def _save_epoch(out, payload, history, improved, held):
    """Write ``best.pt`` (if improved; without :data:`RESUME_ONLY`), ``last.pt`` and
    ``history.csv``; a full disk is one :class:`InputError` naming the file. ``held``: the epoch
    ``last.pt`` holds before this."""
    last = out / "last.pt"
    files = ([out / "best.pt"] if improved else []) + [last, out / "history.csv"]
    for path in files:
        try:
            if path == last:
                save_checkpoint(path, payload)
            elif path.suffix == ".pt":
                save_checkpoint(path, {k: v for k, v in payload.items() if k not in RESUME_ONLY})
            else:
                with atomic_path(path) as tmp:
                    pd.DataFrame(history).to_csv(tmp, index=False)
        except OSError as exc:
            # The DiskFullError that helpers.core.atomic made of ENOSPC/EDQUOT (torch's own error for
            # it too): say which checkpoint is intact.
            if not is_disk_full(exc) and not isinstance(exc, DiskFullError):
                raise
            state = (
                f"{last} holds epoch {held} and is intact (files are replaced only by complete new ones): "
                "free some space and rerun; training resumes from it"
                if held
                else "there is no last.pt to resume from yet: free some space and rerun to train from the start"
            )
            raise InputError(
                f"{path}: the disk is full (no space left on the device) while saving epoch {payload['epoch']}; {state}"
            ) from None
        if path == last:
            held = payload["epoch"]


def _quiet(*_):
    pass


@dataclass
class _Loop:
    """What :func:`fit` works with from one epoch to the next.

    Attributes:
        model: the network on its device (BatchNorm made ``SyncBatchNorm`` under DDP on GPUs):
            the one validated, recalibrated and saved.
        opt, sched: the optimiser and the plateau schedule.
        config: the :class:`TrainConfig`.
        device: this process's device.
        out: the folder of the checkpoints and the history.
        identity: what a ``last.pt`` must hold to be resumed (config, meta, model class).
        prepare, progress, log: as for :func:`fit` (no bar and no log on ranks > 0).
        world, rank: processes training together, and this one's rank.
        net: what trains: ``model``, or its ``DistributedDataParallel`` wrapper.
        versions: the library versions recorded in the checkpoints.
        history, best, stale: the epochs' rows, the best monitored score so far and the epochs
            since it last improved (all kept in ``last.pt``).
        start: the first epoch to train (after those ``last.pt`` holds).
        held: the epoch ``last.pt`` holds now.
        announced: whether the distributed set-up has been logged.
    """

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.ReduceLROnPlateau
    config: TrainConfig
    device: torch.device
    out: Path
    identity: dict
    prepare: object
    progress: bool
    log: object
    world: int = 1
    rank: int = 0
    net: torch.nn.Module = None
    versions: dict = None
    history: list = field(default_factory=list)
    best: float = None
    stale: int = 0
    start: int = 0
    held: int = 0
    announced: bool = False

    @property
    def ddp(self):
        """Whether several processes train together (``DistributedDataParallel``)."""
        return self.world > 1

    @property
    def cuda(self):
        return self.device.type == "cuda"

    def autocast(self):
        """The context of every forward pass: bf16 autocast on CUDA (``config.amp``), else none."""
        if self.cuda and self.config.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def stopped_early(self):
        """Whether the monitored metric has not improved for ``early_stop_patience`` epochs."""
        patience = self.config.early_stop_patience
        return bool(patience and self.stale >= patience)


def _check_fit_settings(config, read_ahead, batch_size):
    """``config`` validated; an :class:`InputError` for a bad ``read_ahead`` or ``batch_size``
    (one that does not divide by the number of processes training together)."""
    config = config.validate()
    if read_ahead:
        check_positive("read_ahead", read_ahead, integer=True)
    if batch_size is not None:
        check_positive("batch_size", batch_size, integer=True)
    world = dd.world_size()
    if world > 1 and batch_size is not None and batch_size % world:
        raise InputError(
            f"parameter 'batch_size' ({batch_size}) must divide by the {world} processes training "
            f"together (each takes an equal slice of every batch): use a multiple of {world}"
        )
    return config


def _optimizer(model, config):
    """The configured optimiser (SGD or Adam) over ``model``'s trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _set_up(model, config, meta, out, prepare, progress, log):
    """The :class:`_Loop` of a run before any resume: the device picked and everything seeded,
    the model on its device (channels-last and ``SyncBatchNorm`` where they apply), the
    optimiser and the plateau schedule. Only rank 0 logs, shows a bar and makes ``out``."""
    world, rank = dd.world_size(), dd.rank()
    if rank != 0:
        log, progress = _quiet, False
    else:
        out.mkdir(parents=True, exist_ok=True)
    device = _training_device(config, world > 1)
    seed_everything(dd.rank_seed(config.seed))
    identity = {
        "config": {k: v for k, v in asdict(config).items() if k != "epochs"},
        "meta": dict(meta or {}),
        "model": type(model).__name__,
    }
    model.to(device)
    if device.type == "cuda" and config.channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = _optimizer(model, config)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=config.mode, factor=config.lr_factor, patience=config.lr_patience
    )
    return _Loop(model, opt, sched, config, device, out, identity, prepare, progress, log, world, rank)


def _identity_diff(old, new):
    """The settings (``config.lr``, ``meta.arch``, ``model`` ...) in which two identities differ."""
    diff = [
        f"{sec}.{k}"
        for sec in ("config", "meta")
        for k in set(old.get(sec, {})) | set(new[sec])
        if old.get(sec, {}).get(k) != new[sec].get(k)
    ]
    if old.get("model") != new["model"]:
        diff.append("model")
    return sorted(diff)


def _resume(loop):
    """Continue ``loop`` from ``out/last.pt`` when it is there: weights, optimiser, schedule,
    history and every random state. A ``last.pt`` of a run with other settings is refused."""
    last = loop.out / "last.pt"
    if not last.exists():
        return
    ck = load_checkpoint(last)
    if ck.get("identity") != loop.identity:
        raise InputError(
            f"{last} was written by a run with other settings "
            f"({', '.join(_identity_diff(ck.get('identity') or {}, loop.identity)[:6])}); "
            "use another output folder, or delete it to start again"
        )
    _load_weights(loop.model, ck, last, "this model", "use another output folder")
    loop.opt.load_state_dict(ck["optimizer"])
    loop.sched.load_state_dict(ck["scheduler"])
    loop.history, loop.best, loop.start, loop.stale = ck["history"], ck["best"], ck["epoch"], ck["stale"]
    _restore_rng(ck.get("rng"), loop.prepare, loop.device, loop.log)
    loop.log(f"resumed from {last} after epoch {loop.start}")
    epochs = loop.config.epochs
    if loop.start > epochs:
        loop.log(
            f"note: {last} already holds {loop.start} epochs, more than epochs={epochs}; nothing is "
            "trained and its checkpoints stay those of the longer run (use another output folder to "
            f"train {epochs} epochs)"
        )
    if loop.stopped_early():
        loop.start = epochs  # it had stopped early: nothing more to do


def _distributed(loop):
    """What trains: the model, or under DDP its ``DistributedDataParallel`` wrapper (which
    broadcasts rank 0's weights and buffers, then averages the gradients in every step)."""
    if not loop.ddp:
        return loop.model
    return torch.nn.parallel.DistributedDataParallel(
        loop.model, device_ids=[loop.device.index] if loop.cuda else None, static_graph=True
    )


def _epoch_batches(loop, batches, read_ahead):
    """``(x, y, whole)`` for each batch of ``batches``: this process's slice of it under DDP
    (``whole``: the global batch's size; ``None`` in a single process), gathered ahead in a
    thread when ``read_ahead`` (and pinned for asynchronous copies to a GPU)."""
    take = _slicer(loop.rank, loop.world) if loop.ddp else None
    transform = take
    if read_ahead:
        # The next batches are gathered (sliced, and pinned for asynchronous copies to a GPU)
        # in a thread while the model works on this one; same batches, same order.
        pin = pin_batch if loop.cuda else None
        transform = (lambda b: pin(take(b))) if take and pin else (take or pin)
        batches = ReadAhead(batches, read_ahead, transform)
    for batch in batches:
        if transform is not None and not read_ahead:
            batch = transform(batch)
        yield batch[0], batch[1], (batch[2] if loop.ddp else None)


def _announce(loop, whole, batch_size):
    """Log the distributed set-up once, at the first batch; refuse a first batch of a size that
    does not divide by the number of processes (when ``batch_size`` was not given)."""
    if loop.announced:
        return
    world = loop.world
    if batch_size is None and whole % world:
        raise InputError(
            f"the first training batch holds {whole} patches, which does not divide "
            f"by the {world} processes training together: use a batch_size that is "
            f"a multiple of {world}"
        )
    loop.log(
        f"distributed training: {world} processes ({torch.distributed.get_backend()}), global "
        f"batch {batch_size or whole} = {(batch_size or whole) // world} per process; learning "
        f"rate {loop.config.lr:g} as configured (not scaled with the number of processes); BatchNorm "
        + (
            "synchronised across processes (SyncBatchNorm)"
            if loop.cuda
            else "per process (torch's SyncBatchNorm needs GPUs)"
        )
    )
    loop.announced = True


def _train_step(loop, x, y, whole, loss_fn):
    """One optimiser step on a batch (this process's slice under DDP).

    Returns:
        ``(loss, patches)``: the batch's loss (a tensor on the device) and its number of patches.
    """
    x, y = loop.prepare(x, y, loop.device, True)
    if loop.cuda and loop.config.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with loop.autocast():
        outp = loop.net(x)
        loss = loss_fn(outp, y)
    loop.opt.zero_grad(set_to_none=True)
    # DDP averages the processes' gradients; a slice of another size than the others
    # (an uneven last batch) is weighted so that the step is the whole batch's mean.
    weight = len(x) * loop.world / whole if loop.ddp else 1.0
    (loss * weight if weight != 1.0 else loss).backward()
    loop.opt.step()
    return loss, len(x)


def _mean_loss(loop, total, n):
    """The epoch's mean training loss from this process's sum ``total`` over ``n`` patches
    (summed over every process under DDP); an empty epoch is an :class:`InputError`."""
    if loop.ddp:
        sums = torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=loop.device)])
        torch.distributed.all_reduce(sums)
        total, n = sums[0], int(sums[1])
    if n == 0:
        raise InputError("train_batches yielded no batch: the training split is empty")
    return float(total) / n


def _train_epoch(loop, epoch, train_batches, loss_fn, read_ahead, batch_size):
    """Train one epoch over ``train_batches(epoch)``; return its mean training loss."""
    loop.net.train()
    total, n = torch.zeros((), dtype=torch.float64, device=loop.device), 0
    batches = train_batches(epoch)
    bar = progress_bar(
        len(batches) if hasattr(batches, "__len__") else None,
        f"epoch {epoch + 1}/{loop.config.epochs}",
        "batch",
        loop.progress,
    )
    for x, y, whole in _epoch_batches(loop, batches, read_ahead):
        if loop.ddp:
            _announce(loop, whole, batch_size)
            if whole < loop.world:  # a last batch too small to give every process a patch
                bar.update()
                continue
        loss, k = _train_step(loop, x, y, whole, loss_fn)
        # Summed on the device: reading the loss each step would make the host wait for the
        # GPU, and the next batch would not be gathered while the GPU computes.
        total = total + loss.detach().double() * k
        n += k
        bar.update()
    bar.close()
    return _mean_loss(loop, total, n)


def _recalibrate(loop, batches):
    """Recompute the BatchNorm statistics over ``batches`` (see :func:`recalibrate_batchnorm`);
    under DDP each process over its slices, and on CPUs rank 0's statistics are kept."""
    if loop.ddp:
        take = _slicer(loop.rank, loop.world)
        batches = ((xb, yb) for xb, yb, whole in map(take, batches) if whole >= loop.world)
    recalibrate_batchnorm(loop.model, batches, loop.prepare, loop.device, loop.autocast)
    if loop.ddp and not loop.cuda:  # without SyncBatchNorm the ranks' statistics differ: keep rank 0's
        for buf in loop.model.buffers():
            torch.distributed.broadcast(buf, 0)


def _validate(loop, evaluate, epoch, train_loss, t0):
    """The epoch's history row: its training loss, the validation metrics, the learning rate and
    the seconds since ``t0``. Rank 0 validates; every rank gets the same row."""
    lr, monitor = loop.opt.param_groups[0]["lr"], loop.config.monitor

    def validate():
        loop.model.eval()
        with torch.no_grad(), loop.autocast():
            val = dict(evaluate(loop.model, loop.device))
        if monitor not in val:
            raise InputError(f"evaluate() returned {sorted(val)}, which lacks the monitored {monitor!r}")
        return {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            **{k: float(v) for k, v in val.items()},
            "lr": lr,
            "seconds": round(time.perf_counter() - t0, 2),
        }

    return dd.run_on_main(validate)


def _checkpoint(loop, epoch, improved):
    """Write the checkpoints of ``epoch`` (0-based) and the history (rank 0; every rank's random
    state is gathered into ``last.pt``): ``best.pt`` too when the score ``improved``."""
    rng = dd.all_gather_object(_rng_state(loop.prepare, loop.device))  # every rank's random state
    payload = {
        "model": loop.model.state_dict(),
        "optimizer": loop.opt.state_dict(),
        "scheduler": loop.sched.state_dict(),
        "epoch": epoch + 1,
        "history": loop.history,
        "best": loop.best,
        "stale": loop.stale,
        "identity": loop.identity,
        "versions": loop.versions,
        "rng": rng,
        "world_size": loop.world,
    }
    held = loop.held
    dd.run_on_main(lambda: _save_epoch(loop.out, payload, loop.history, improved, held))
    loop.held = epoch + 1


def _end_epoch(loop, epoch, row):
    """Record the epoch's ``row``: the plateau schedule and the best score follow the monitored
    metric, the checkpoints are written and the epoch's line is logged."""
    loop.history.append(row)
    score = row[loop.config.monitor]
    loop.sched.step(score)
    improved = _better(score, loop.best, loop.config.mode)
    if improved:
        loop.best, loop.stale = score, 0
    else:
        loop.stale += 1
    _checkpoint(loop, epoch, improved)
    loop.log(
        f"epoch {epoch + 1}/{loop.config.epochs}: train_loss {row['train_loss']:.4f}, "
        + ", ".join(f"{k} {row[k]:.4f}" for k in row if k not in ("epoch", "train_loss", "lr", "seconds"))
        + f", lr {row['lr']:.2g}"
        + (" (best)" if improved else "")
    )


def fit(
    model,
    train_batches,
    evaluate,
    loss_fn,
    config,
    out_dir,
    meta=None,
    prepare=default_prepare,
    progress=True,
    log=print,
    bn_batches=None,
    read_ahead=2,
    batch_size=None,
):
    """Train ``model``, resuming from ``out_dir/last.pt`` when it is there.

    In distributed training (a ``torch.distributed`` process group of more than one process)
    every process runs this function with the same arguments: see the module's docstring.

    Args:
        model: a ``torch.nn.Module``.
        train_batches: ``train_batches(epoch)`` -> iterable of CPU batches ``(x, y)``; the
            same batches for a given ``epoch`` whenever it is called (a resumed run redoes the
            epoch that was interrupted).
        evaluate: ``evaluate(model, device)`` -> dict of validation metrics (run under
            ``torch.no_grad`` with the model in eval mode); must hold ``config.monitor``.
        loss_fn: ``loss_fn(output, y)`` -> scalar tensor (the batch's mean).
        config: :class:`TrainConfig`.
        out_dir: folder for ``last.pt``, ``best.pt`` and ``history.csv``.
        meta: a dict of everything else that defines the run (architecture, data parameters):
            stored in the checkpoints; a rerun with different ``meta`` or config is refused.
        prepare: ``prepare(x, y, device, train)`` -> device batch (augment there for training).
            When it has ``state_dict()``/``load_state_dict()`` (e.g. :class:`SeededPrepare`),
            its random state is checkpointed too.
        progress: progress bar over the batches of each epoch (stderr).
        log: where the one-line epoch summaries go.
        bn_batches: optional ``bn_batches(epoch)`` -> iterable of CPU batches; when given, the
            BatchNorm statistics are recomputed over them after each epoch's training, before
            validation and the checkpoint (see :func:`recalibrate_batchnorm`).
        read_ahead: training batches gathered ahead in a background thread (see
            :mod:`helpers.core.parallel`); 0 gathers each batch only when it is needed. The batches
            and their order are the same either way.
        batch_size: the global batch size ``train_batches`` yields, checked against the number
            of processes in distributed training (default: the first batch's size).

    Returns:
        The history as a DataFrame (one row per epoch), the same in every process.

    Raises:
        InputError: bad settings, a ``last.pt`` of another run, a batch size that does not
            divide by the number of processes, or a full disk while saving.
    """
    config = _check_fit_settings(config, read_ahead, batch_size)
    loop = _set_up(model, config, meta, Path(out_dir), prepare, progress, log)
    _resume(loop)
    loop.held = loop.start
    loop.net = _distributed(loop)
    loop.versions = library_versions()
    for epoch in range(loop.start, config.epochs):
        t0 = time.perf_counter()
        train_loss = _train_epoch(loop, epoch, train_batches, loss_fn, read_ahead, batch_size)
        if bn_batches is not None:
            _recalibrate(loop, bn_batches(epoch))
        _end_epoch(loop, epoch, _validate(loop, evaluate, epoch, train_loss, t0))
        if loop.stopped_early():
            loop.log(f"stopped early: {config.monitor} did not improve for {loop.stale} epochs")
            break
    return pd.DataFrame(loop.history)
