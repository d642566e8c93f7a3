"""Benchmark: can the host feed a GPU? The input pipelines' own rates, and a simulated GPU step.

The issues ask the training loops for at least 0.9 of the bare GPU step (H200, bf16, batch 256:
~5,100 img/s for EfficientNet-B0, ~4,700 for ResNet-50, ~1,600 for UNet++; see
``shared/bench/README.md``) and whole-slide inference for at least 0.8 of bare inference (~4,700
patches/s for UNet++). On a GPU the augmentation runs on the device, so what stays on the host
is gathering batches from the memory-mapped patch caches (and reading slide strips at
inference). This script measures, on whatever machine runs it (no GPU needed):

- ``feed``: batches per second of notebook 04's classification pipeline (4x caches) and of
  notebook 03's segmentation pipeline (1x caches, images and masks), one thread, at the batch
  size asked for, as images per second;
- ``strips``: tissue patches per second of the whole-slide reader of notebook 03
  (strip reading, tiling, per-patch tissue test) on a demo slide, with 1, 2 and all-core
  reader threads;
- ``simulated``: :func:`helpers.learning.train.fit` driving a stand-in model whose step sleeps for
  ``batch / ceiling`` seconds without holding the GIL (as a GPU step leaves the host free), fed
  by the real classification pipeline with and without read-ahead, against the same loop fed
  one resident batch (the bare ceiling, same run): the share of the ceiling the loop keeps
  when the model runs at exactly the GPU's rate. It leaves out what the GPU does besides the
  bare step (the augmentation), so a real GPU ratio will be somewhat lower.

The demo caches are small and sit in the page cache; on PAIP 2019's tens of GB of 1x patches
the disk must also deliver (150 KB per 224 px patch: 5,000 patches/s is ~750 MB/s of reads).

Usage: ``python bench/feed_benchmark.py [--batch 256] [--run demo]`` (after notebook 02)
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_benchmark import cls_source, seg_source  # noqa: E402

from helpers.learning.train import TrainConfig, fit  # noqa: E402

# Bare training step, H200, bf16 + channels_last, batch 256 (shared/bench/README.md, 2026-11-27).
H200_TRAIN = {"efficientnet_b0": 5148, "resnet50": 4706, "unetpp": 1597}
H200_UNETPP_INFERENCE = 4715


def rate(batches, seconds=6.0):
    """Images per second of iterating ``batches(epoch)`` epoch after epoch for ``seconds``."""
    n, t, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        for x, _ in batches(epoch):
            n += len(x)
        epoch += 1
    return n / (time.perf_counter() - t)


def strips_rate(case_id, workers, seconds=6.0):
    """Tissue (and grid) patches per second of the whole-slide reader over a demo slide at 1x."""
    from helpers.demo.synthetic import ensure_demo_dataset
    from helpers.learning.inference import tissue_strips
    from helpers.patching.caches import ExtractionParams, grid_shape
    from helpers.wsi.dataset import list_cases
    from helpers.wsi.slides import Slide

    case = {c.case_id: c for c in list_cases(ensure_demo_dataset(progress=False))}[case_id]
    p = ExtractionParams()
    with Slide(case.slide) as slide:
        rows, cols = grid_shape(slide.dimensions, 1, 224, 224)
    tissue = grid = 0
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        ys, xs = np.arange(rows) * 224, np.arange(cols) * 224
        for _, kept, _ in tissue_strips(case.slide, 1, ys, xs, 224, p, None, workers=workers):
            tissue += len(kept)
            grid += cols
    s = time.perf_counter() - t
    return tissue / s, grid / s


class SleepStep(torch.nn.Module):
    """Stands in for a network on a GPU: each forward takes ``batch / ceiling`` seconds of
    wall time and leaves the host (and the GIL) free meanwhile."""

    def __init__(self, ceiling):
        super().__init__()
        self.ceiling = ceiling
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        time.sleep(len(x) / self.ceiling)
        return torch.zeros(len(x), 2) + self.w


def passthrough(x, y, device, train):
    """On a GPU the copy is asynchronous and the augmentation runs there: nothing for the host."""
    return x, y


def long_epochs(batches, images, batch):
    """``batches`` with each epoch made of as many of its epochs as give ``images`` patches: the
    demo's 4x training split is a few batches of 256, PAIP 2019's hundreds, and a few-batch
    epoch would measure mostly its first batch, which no read-ahead can hide."""

    class _Epoch:
        def __init__(self, epoch):
            self.epoch = epoch
            self.k = max(1, -(-images // (len(batches(0)) * batch)))

        def __len__(self):
            return self.k * len(batches(0))

        def __iter__(self):
            for j in range(self.k):
                yield from batches(self.epoch * self.k + j)

    return _Epoch


def simulated(run, batch, ceiling, read_ahead, images, bare=False):
    """Images/s of ``fit`` with :class:`SleepStep` fed by notebook 04's pipeline; with ``bare``,
    fed one device-resident batch over and over instead (the same loop's ceiling, this run)."""
    train_batches = long_epochs(cls_source(run, batch, 10**9), images, batch)
    if bare:
        x, y = next(iter(train_batches(0)))
        steps = len(train_batches(0))
        train_batches = lambda epoch: [(x, y)] * steps  # noqa: E731
    cfg = TrainConfig(epochs=2, optimizer="sgd", lr=1e-9, device="cpu")
    model, seen = SleepStep(ceiling), []

    def evaluate(m, dev):
        seen.append(m.seen)  # images trained on so far, at the end of each epoch
        return {"val_loss": 0.0}

    with tempfile.TemporaryDirectory() as d:
        h = fit(
            model,
            train_batches,
            evaluate,
            lambda o, y: torch.nn.functional.cross_entropy(o, y.long()),
            cfg,
            d,
            prepare=passthrough,
            progress=False,
            log=lambda *_: None,
            read_ahead=read_ahead,
        )
    # The second epoch (the first warms the page cache). Its seconds include the end-of-epoch
    # work (checkpoint, history), as a real epoch's do.
    return (seen[1] - seen[0]) / h["seconds"].iloc[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="patches per batch (the H200 figures are at 256)")
    ap.add_argument("--run", default="demo", help="run folder whose patch caches are read")
    ap.add_argument("--case", default="demo_03", help="demo slide for the strip reader")
    ap.add_argument("--images", type=int, default=20480, help="patches per simulated epoch")
    ap.add_argument("--seconds", type=float, default=6.0, help="time per feed measurement")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    rows = []
    print("classification feed ...", file=sys.stderr, flush=True)
    cls = rate(cls_source(args.run, args.batch, 10**9), args.seconds)
    rows.append(
        ("feed: notebook 04 batches (4x caches)", cls, H200_TRAIN["efficientnet_b0"], "EfficientNet-B0 train step")
    )
    print("segmentation feed ...", file=sys.stderr, flush=True)
    seg = rate(seg_source(args.run, args.batch, 40 * args.batch), args.seconds)
    rows.append(
        ("feed: notebook 03 batches, images + masks (1x caches)", seg, H200_TRAIN["unetpp"], "UNet++ train step")
    )
    grids = {}
    for w in sorted({1, 2, os.cpu_count() or 1}):
        print(f"slide strips, {w} reader threads ...", file=sys.stderr, flush=True)
        tissue, grids[w] = strips_rate(args.case, w, args.seconds)
        rows.append(
            (
                f"strips: whole-slide reader, {w} thread{'s' if w > 1 else ''}, {args.case} at 1x (tissue patches)",
                tissue,
                H200_UNETPP_INFERENCE,
                "UNet++ inference",
            )
        )
    sims = []
    for name in ("efficientnet_b0", "resnet50"):
        print(
            f"simulated {name} step: bare, then the pipeline without and with read-ahead ...",
            file=sys.stderr,
            flush=True,
        )
        bare = simulated(args.run, args.batch, H200_TRAIN[name], 0, args.images, bare=True)
        for ra in (0, 2):
            got = simulated(args.run, args.batch, H200_TRAIN[name], ra, args.images)
            sims.append((name, ra, got, bare))

    print(
        f"\nHost side of the input pipelines, batch {args.batch}, 224 px patches, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads\n"
    )
    print("| what | img/s here | H200 rate it must feed | of | feed / rate |")
    print("|---|---|---|---|---|")
    for what, r, need, of in rows:
        print(f"| {what} | {r:,.0f} | {need:,} | {of} | {r / need:.2f} |")
    print(
        "\n(strip reader, grid patches/s with glass: "
        + ", ".join(f"{g:,.0f} with {w}" for w, g in grids.items())
        + f"; {os.cpu_count()} cores here)\n"
    )
    print(
        "Simulated GPU step (sleeps batch / ceiling), fed by notebook 04's pipeline through "
        "helpers.learning.train.fit\n"
    )
    print("| model | H200 ceiling img/s | read_ahead | bare loop img/s | real pipeline img/s | pipeline / bare |")
    print("|---|---|---|---|---|---|")
    for name, ra, got, bare in sims:
        print(f"| {name} | {H200_TRAIN[name]:,} | {ra} | {bare:,.0f} | {got:,.0f} | {got / bare:.2f} |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"feed_{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(
            {
                "batch": args.batch,
                "rows": [dict(zip(("what", "img_s", "need", "of"), r)) for r in rows],
                "strips_grid_patches_s": grids,
                "simulated": [dict(zip(("model", "read_ahead", "img_s", "bare_img_s"), s)) for s in sims],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
