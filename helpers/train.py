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
"""

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .atomic import atomic_path
from .errors import InputError, check_positive, check_type
from .prefetch import ReadAhead, pin_batch
from .progress import progress_bar
from .setup import library_versions, seed_everything


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
    """``torch.save`` through a temporary file: an interrupted save leaves the old checkpoint."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path):
    """Load a checkpoint written by :func:`fit` (on the CPU)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc}); "
                         "delete it to train from scratch") from None


def load_trained(model, checkpoint, meta):
    """Load ``checkpoint`` (a ``best.pt``/``last.pt`` of :func:`helpers.train.fit`) into ``model``.

    Args:
        model: the network, built with the same settings as the one trained.
        checkpoint: the file.
        meta: the ``meta`` dict this notebook trains with; the checkpoint must hold the same
            (another architecture, input size or mask would give wrong masks silently).

    Returns:
        The checkpoint dict (epoch, history, versions ...), weights loaded into ``model``.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise InputError(f"{checkpoint}: no checkpoint; train first (the notebook's training section)")
    ck = load_checkpoint(checkpoint)
    theirs = (ck.get("identity") or {}).get("meta", {})
    diff = sorted(k for k in set(theirs) | set(meta) if theirs.get(k) != meta.get(k))
    if diff:
        raise InputError(f"{checkpoint} was trained with other settings: "
                         + ", ".join(f"{k} {theirs.get(k)!r} (here {meta.get(k)!r})" for k in diff[:5])
                         + "; use the matching parameters or another run_name")
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise InputError(f"{checkpoint}: its weights do not fit this network ({str(exc)[:160]})") from None
    return ck


def default_prepare(x, y, device, train):
    """Move a batch to the device; uint8 images become floats in [0, 1]."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return x, y.to(device, non_blocking=True)


def _better(a, b, mode):
    return b is None or (a < b if mode == "min" else a > b)


def recalibrate_batchnorm(model, batches, prepare, device, autocast=contextlib.nullcontext):
    """Recompute every BatchNorm layer's running statistics as a plain average over ``batches``.

    BatchNorm normalises with the batch's own statistics while training but with running
    averages (momentum 0.1: mostly the last ten or so batches) at evaluation. Early in training,
    with a high learning rate, the weights move faster than those averages follow, so a model
    that is good in training mode can be poor in evaluation mode (measured on the demo: a
    validation Dice of 0.43 with the running averages against 0.98 recomputed, same weights).
    Recomputing the statistics with the final weights (Wu and Johnson, 2021, "precise BN")
    removes that gap at the cost of a few forward passes.

    Args:
        model: the network.
        batches: an iterable of CPU batches ``(x, y)``, drawn as at inference (no augmentation
            is applied: ``prepare`` is called with ``train=False``).
        prepare: as for :func:`fit`.
        device: the model's device.

    Returns:
        The number of batches used (0 when the model has no BatchNorm layer).
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over the batches below
    was = model.training
    model.train()
    n = 0
    try:
        with torch.no_grad(), autocast():
            for x, y in batches:
                x, _ = prepare(x, y, device, False)
                model(x)
                n += 1
    finally:
        for m, mo in zip(bns, saved):
            m.momentum = mo
        model.train(was)
    return n


def fit(model, train_batches, evaluate, loss_fn, config, out_dir, meta=None, prepare=default_prepare,
        progress=True, log=print, bn_batches=None, read_ahead=2):
    """Train ``model``, resuming from ``out_dir/last.pt`` when it is there.

    Args:
        model: a ``torch.nn.Module``.
        train_batches: ``train_batches(epoch)`` -> iterable of CPU batches ``(x, y)``.
        evaluate: ``evaluate(model, device)`` -> dict of validation metrics (run under
            ``torch.no_grad`` with the model in eval mode); must hold ``config.monitor``.
        loss_fn: ``loss_fn(output, y)`` -> scalar tensor.
        config: :class:`TrainConfig`.
        out_dir: folder for ``last.pt``, ``best.pt`` and ``history.csv``.
        meta: a dict of everything else that defines the run (architecture, data parameters):
            stored in the checkpoints; a rerun with different ``meta`` or config is refused.
        prepare: ``prepare(x, y, device, train)`` -> device batch (augment there for training).
        progress: progress bar over the batches of each epoch (stderr).
        log: where the one-line epoch summaries go.
        bn_batches: optional ``bn_batches(epoch)`` -> iterable of CPU batches; when given, the
            BatchNorm statistics are recomputed over them after each epoch's training, before
            validation and the checkpoint (see :func:`recalibrate_batchnorm`).
        read_ahead: training batches gathered ahead in a background thread (see
            :mod:`helpers.prefetch`); 0 gathers each batch only when it is needed. The batches
            and their order are the same either way.

    Returns:
        The history as a DataFrame (one row per epoch).
    """
    config = config.validate()
    if read_ahead:
        check_positive("read_ahead", read_ahead, integer=True)
    meta = dict(meta or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = select_device(config.device)
    seed_everything(config.seed)
    cuda = device.type == "cuda"
    model.to(device)
    if cuda and config.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=config.mode, factor=config.lr_factor,
                                                       patience=config.lr_patience)
    history, best, start, stale = [], None, 0, 0
    identity = {"config": {k: v for k, v in asdict(config).items() if k != "epochs"}, "meta": meta,
                "model": type(model).__name__}
    last = out / "last.pt"
    if last.exists():
        ck = load_checkpoint(last)
        if ck.get("identity") != identity:
            old = ck.get("identity") or {}
            diff = [f"{sec}.{k}" for sec in ("config", "meta") for k in
                    set(old.get(sec, {})) | set(identity[sec]) if old.get(sec, {}).get(k) != identity[sec].get(k)]
            if old.get("model") != identity["model"]:
                diff.append("model")
            raise InputError(f"{last} was written by a run with other settings ({', '.join(sorted(diff)[:6])}); "
                             "use another output folder, or delete it to start again")
        try:
            model.load_state_dict(ck["model"])
        except RuntimeError as exc:
            raise InputError(f"{last}: its weights do not fit this model ({str(exc)[:200]}); use another "
                             "output folder") from None
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        history, best, start, stale = ck["history"], ck["best"], ck["epoch"], ck["stale"]
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        log(f"resumed from {last} after epoch {start}")
        if start > config.epochs:
            log(f"note: {last} already holds {start} epochs, more than epochs={config.epochs}; nothing is "
                "trained and its checkpoints stay those of the longer run (use another output folder to "
                f"train {config.epochs} epochs)")
        if config.early_stop_patience and stale >= config.early_stop_patience:
            start = config.epochs  # it had stopped early: nothing more to do
    versions = library_versions()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and config.amp else contextlib.nullcontext
    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        model.train()
        total, n = 0.0, 0
        batches = train_batches(epoch)
        bar = progress_bar(len(batches) if hasattr(batches, "__len__") else None, f"epoch {epoch + 1}/{config.epochs}",
                           "batch", progress)
        if read_ahead:
            # The next batches are gathered (and pinned, for asynchronous copies to a GPU) in a
            # thread while the model works on this one; same batches, same order.
            batches = ReadAhead(batches, read_ahead, pin_batch if cuda else None)
        for x, y in batches:
            x, y = prepare(x, y, device, True)
            if cuda and config.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                outp = model(x)
                loss = loss_fn(outp, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # Summed on the device: reading the loss each step would make the host wait for the
            # GPU, and the next batch would not be gathered while the GPU computes.
            total = total + loss.detach().double() * len(x)
            n += len(x)
            bar.update()
        bar.close()
        if n == 0:
            raise InputError("train_batches yielded no batch: the training split is empty")
        if bn_batches is not None:
            recalibrate_batchnorm(model, bn_batches(epoch), prepare, device, autocast)
        model.eval()
        with torch.no_grad(), autocast():
            val = dict(evaluate(model, device))
        if config.monitor not in val:
            raise InputError(f"evaluate() returned {sorted(val)}, which lacks the monitored {config.monitor!r}")
        row = {"epoch": epoch + 1, "train_loss": float(total) / n, **{k: float(v) for k, v in val.items()},
               "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        score = row[config.monitor]
        sched.step(score)
        improved = _better(score, best, config.mode)
        if improved:
            best, stale = score, 0
        else:
            stale += 1
        payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                   "epoch": epoch + 1, "history": history, "best": best, "stale": stale, "identity": identity,
                   "versions": versions, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}}
        if improved:
            save_checkpoint(out / "best.pt", payload)
        save_checkpoint(last, payload)
        with atomic_path(out / "history.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
        log(f"epoch {epoch + 1}/{config.epochs}: train_loss {row['train_loss']:.4f}, "
            + ", ".join(f"{k} {float(v):.4f}" for k, v in val.items()) + f", lr {row['lr']:.2g}"
            + (" (best)" if improved else ""))
        if config.early_stop_patience and stale >= config.early_stop_patience:
            log(f"stopped early: {config.monitor} did not improve for {stale} epochs")
            break
    return pd.DataFrame(history)


def batches_from_arrays(images, labels, batch_size, indices=None, shuffle=False, seed=0):
    """Batches of ``(x, y)`` CPU tensors from (memory-mapped) arrays, channels first.

    Indices within a batch are read in sorted order (memory-map friendly). With ``shuffle``,
    the order is drawn from ``seed`` (pass ``seed + epoch`` for a new order each epoch).

    Args:
        images: ``(n, h, w, c)`` uint8 array (e.g. ``PatchSet.patches``).
        labels: ``(n, ...)`` array (class labels, or masks ``(n, h, w)``).
        batch_size: patches per batch.
        indices: which rows to use (default: all), repeats allowed (class balance).
    """
    check_positive("batch_size", batch_size, integer=True)
    idx = np.arange(len(images)) if indices is None else np.asarray(indices)
    if shuffle:
        idx = np.random.default_rng(seed).permutation(idx)

    class _Batches:
        def __len__(self):
            return -(-len(idx) // batch_size)

        def __iter__(self):
            for i in range(0, len(idx), batch_size):
                b = np.sort(idx[i:i + batch_size])
                x = torch.from_numpy(np.ascontiguousarray(images[b])).permute(0, 3, 1, 2)
                y = torch.from_numpy(np.ascontiguousarray(labels[b]))
                yield x, y

    return _Batches()
