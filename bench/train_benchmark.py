"""Benchmark: the real training loop against the bare training step of the same model.

For each of the paper's networks (EfficientNet-B0 and ResNet-50 classifiers, the paper's UNet++)
it measures, in one run on one device:

- ``bare``: forward, loss, backward and optimizer step on one batch already on the device, the
  ceiling a loop can reach (the same measurement as ``shared/bench/gpu_model_ceiling.py``);
- ``loop``: ``helpers.learning.train.fit`` for one epoch over real patches from the demo run's caches
  (memory-mapped uint8), moved to the device and augmented there, with checkpoints and history
  written: for the classifiers notebook 04's own pipeline (``helpers.paper.classification``: balanced epochs
  of 4x patches), for UNet++ notebook 03's (``helpers.paper.segmentation``: half of each batch from
  tumour patches, masks augmented alike).

and prints images per second of both and their ratio (the issues' target: at least 0.9 on a
GPU). Needs the demo patch caches: run notebook 02 first (``python -m helpers.run --only 02``).

Usage: ``python bench/train_benchmark.py [--batch 4] [--images 48] [--size 224] [--models ...]``
"""

import argparse
import glob
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from helpers.learning.models import build_classifier  # noqa: E402
from helpers.learning.train import TrainConfig, fit, select_device  # noqa: E402
from helpers.learning.unetpp import build_segmenter, deep_supervision_dice_loss  # noqa: E402
from helpers.patching.caches import load_patch_set  # noqa: E402

MODELS = ("efficientnet_b0", "resnet50", "unetpp_paper")


def load_patches(run, n):
    """The first ``n`` kept 1x patches (and masks) of the demo run's training slides."""
    from helpers.core.paths import run_dir

    folders = sorted(glob.glob(str(run_dir(run) / "patches" / "*" / "x1_*")))
    if not folders:
        sys.exit(f"no patch caches under {run_dir(run)}/patches: run notebook 02 first (helpers.run --only 02)")
    xs, ms = [], []
    for f in folders:
        ps = load_patch_set(f)
        if ps.masks is None or not len(ps.patches):
            continue
        xs.append(ps.patches)
        ms.append(ps.masks)
        if sum(len(x) for x in xs) >= n:
            break
    x = np.concatenate([np.asarray(a) for a in xs])[:n]
    m = np.concatenate([np.asarray(a) for a in ms])[:n]
    return x, m


def make(name):
    torch.manual_seed(0)
    if name == "unetpp_paper":
        return build_segmenter("paper"), True
    return build_classifier(name), False


def bare(name, batch, steps, device, size=224, channels_last=None, warmup=1):
    """Images/s of the bare training step after ``warmup`` untimed steps.

    On a GPU: bf16 autocast, and channels_last by default (as ``fit`` and
    ``shared/bench/gpu_model_ceiling.py`` use them).
    """
    model, seg = make(name)
    model.to(device).train()
    cl = device.type == "cuda" if channels_last is None else channels_last
    x = torch.rand(batch, 3, size, size, device=device)
    if cl:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = (
        (torch.rand(batch, size, size, device=device) > 0.5).float()
        if seg
        else torch.randint(0, 2, (batch,), device=device)
    )
    lossf = deep_supervision_dice_loss if seg else torch.nn.functional.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    cuda = device.type == "cuda"
    amp = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if cuda
        else (lambda: torch.autocast("cpu", enabled=False))
    )

    def step():
        with amp():
            loss = lossf(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def seg_source(run, batch, n):
    """The segmentation input pipeline of notebook 03 over the run's training slides."""
    import pandas as pd

    from helpers.core.paths import run_dir
    from helpers.paper.segmentation_data import load_segmentation_patches, segmentation_batches
    from helpers.patching.caches import load_extraction_record
    from helpers.wsi.dataset import list_cases

    folder = run_dir(run)
    rec = load_extraction_record(folder)
    data_dir, params = rec["data_dir"], rec["params"]
    split = pd.read_csv(folder / "split.csv")
    cases = [c for c in list_cases(data_dir) if c.case_id in set(split.case_id[split.split == "train"])]
    data = load_segmentation_patches(cases, folder / "patches", params)
    return segmentation_batches(data, batch, max(1, n // batch), tumour_share=0.5, seed=0)


def cls_source(run, batch, n, scale=4):
    """The classification input pipeline of notebook 04 over the run's training slides."""
    import pandas as pd

    from helpers.core.paths import run_dir
    from helpers.paper.classification_data import class_batches, load_class_patches
    from helpers.patching.caches import load_extraction_record
    from helpers.wsi.dataset import list_cases

    folder = run_dir(run)
    rec = load_extraction_record(folder)
    data_dir, params = rec["data_dir"], rec["params"]
    split = pd.read_csv(folder / "split.csv")
    cases = [c for c in list_cases(data_dir) if c.case_id in set(split.case_id[split.split == "train"])]
    data = load_class_patches(cases, folder / "patches", params, scale)
    return class_batches(data, batch, balance=True, seed=0, max_batches=max(1, n // batch))


def loop(name, batch, x, m, device, size=224, run="demo"):
    model, seg = make(name)

    if seg:
        # Notebook 03's own pipeline: batches from the memory-mapped caches (half from tumour
        # patches), resized and augmented on the device.
        from helpers.paper.segmentation_data import segmentation_prepare

        train_batches = seg_source(run, batch, len(x))
        prepare = segmentation_prepare(size, augment=True, color=0.06, seed=0)
    else:
        # Notebook 04's own pipeline: balanced epochs from the memory-mapped 4x caches,
        # resized and augmented on the device.
        from helpers.paper.classification_data import class_prepare

        train_batches = cls_source(run, batch, len(x))
        prepare = class_prepare(size, augment=True, color=0.06, seed=0)

    lossf = deep_supervision_dice_loss if seg else (lambda o, y: torch.nn.functional.cross_entropy(o, y.long()))
    cfg = TrainConfig(epochs=2, optimizer="adam", lr=1e-4, device=device.type)
    with tempfile.TemporaryDirectory() as d:
        h = fit(
            model,
            train_batches,
            lambda mdl, dev: {"val_loss": 0.0},
            lossf,
            cfg,
            d,
            prepare=prepare,
            progress=False,
            log=lambda *_: None,
        )
    # The first epoch warms up (allocator, kernels); the second is the measurement.
    n = len(train_batches(0)) * batch
    return n / h["seconds"].iloc[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="batch size (default 4 on CPU; try 256 on a GPU)")
    ap.add_argument("--images", type=int, default=48, help="training patches per epoch of the loop")
    ap.add_argument("--steps", type=int, default=6, help="timed bare steps")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--run", default="demo", help="run folder whose patch caches feed the loop")
    ap.add_argument("--size", type=int, default=224, help="network input side (the demo's UNet++ uses 64)")
    args = ap.parse_args(argv)
    device = select_device("auto")
    torch.set_num_threads(torch.get_num_threads())
    x, m = load_patches(args.run, args.images)
    rows = []
    for name in args.models:
        print(f"{name}: bare step ...", file=sys.stderr, flush=True)
        b = bare(name, args.batch, args.steps, device, args.size)
        print(f"{name}: training loop ...", file=sys.stderr, flush=True)
        lp = loop(name, args.batch, x, m, device, args.size, args.run)
        rows.append(
            {
                "model": name,
                "batch": args.batch,
                "bare_img_s": round(b, 2),
                "loop_img_s": round(lp, 2),
                "ratio": round(lp / b, 2),
            }
        )
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\nTraining throughput on {dev}, {len(x)} patches of 224 px per epoch resized to {args.size} px, "
        f"torch {torch.__version__}\n"
    )
    print("| model | batch | bare step img/s | real loop img/s | loop / bare |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['bare_img_s']} | {r['loop_img_s']} | {r['ratio']} |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"device": dev, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
