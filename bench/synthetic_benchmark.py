"""Benchmark and sanity check of the built-in demo data (:mod:`helpers.demo.synthetic`).

- ``generation``: writes the demo dataset (45 slides, about 1.2 Gpx) into a fresh temporary
  folder and reports wall and CPU seconds (this process and its worker processes together:
  other load on the machine stretches the wall time, not the CPU time), then each zoo shape.
- ``learnability``: cuts 64 px patches at 4x, 16x and 64x from the demo
  (:func:`helpers.patching.patches.extract_dataset`, labels from the viable mask), splits the slides by
  patient (0.6 / 0.2 / 0.2, several split seeds) and fits two logistic regressions on the
  training slides' patches, scored on the held-out slides (validation and test together):
  per-channel colour histograms, the shortcut a stain-blind model would take, and
  stain-normalised texture statistics (nuclear density and size show there). The demo is
  meant to keep the colour baseline well below 100 % (below ~90 % at 4x), the texture model
  above it, and accuracy falling from 4x to 64x.
- ``--cnn``: a small CNN at 4x, with and without stain augmentation, trained 10 epochs on the
  training slides, scored on the test slides at its best epoch on the validation slides (slow
  on a CPU: a few minutes per run on two cores).

Usage::

    .venv/bin/python bench/synthetic_benchmark.py                 # generation + learnability
    .venv/bin/python bench/synthetic_benchmark.py --skip-generation --data data/demo --cnn

Results go to ``bench/results/synthetic_<time>.json`` and ``.md`` (git-ignored); the table is
printed too.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import helpers.demo.synthetic as syn  # noqa: E402
from helpers.patching.caches import ExtractionParams  # noqa: E402
from helpers.patching.patches import extract_dataset  # noqa: E402
from helpers.patching.splits import split_cases  # noqa: E402
from helpers.wsi.dataset import list_cases  # noqa: E402


class Clock:
    """Wall and CPU seconds (this process and its finished children) of a block."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, self._cpu() - self.c

    @staticmethod
    def _cpu():
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def generation(root):
    """Time the demo dataset and every zoo shape, each written into a fresh folder."""
    cases = syn.demo_cases()
    with Clock() as clk:
        syn.ensure_demo_dataset(root / "demo", progress=False)
    rows = [
        {
            "what": "demo (45 slides)",
            "wall_s": clk.wall,
            "cpu_s": clk.cpu,
            "mpx": sum(c.width * c.height for c in cases) / 1e6,
        }
    ]
    for shape in syn.ZOO_SHAPES:
        with Clock() as clk:
            folder = syn.write_zoo_dataset(shape, root / "zoo" / shape)
        rows.append(
            {"what": f"zoo {shape}", "wall_s": clk.wall, "cpu_s": clk.cpu, "files": len(list(folder.iterdir()))}
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Learnability: two logistic regressions per scale
# ---------------------------------------------------------------------------------------------


def colour_histograms(x, bins=16):
    """Per-channel histograms of uint8 RGB patches ``(n, P, P, 3)``, as shares."""
    n = len(x)
    out = []
    for ch in range(3):
        v = x[..., ch].reshape(n, -1) // (256 // bins) + np.arange(n)[:, None] * bins
        out.append(np.bincount(v.ravel(), minlength=n * bins).reshape(n, bins) / v.shape[1])
    return np.concatenate(out, 1)


def texture_features(x):
    """Stain-normalised texture of patches: each patch's gray levels as z-scores, then blob
    (Laplacian of Gaussian) responses at three sizes, edge strength, dark shares and a histogram."""
    g = x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    n = len(g)
    flat = g.reshape(n, -1)
    z = (g - flat.mean(1)[:, None, None]) / (flat.std(1)[:, None, None] + 1e-3)
    f = []
    for sigma in (0.7, 1.5, 3.0):
        lap = ndimage.gaussian_laplace(z, (0, sigma, sigma)).reshape(n, -1)
        f += [np.abs(lap).mean(1), (lap > 1).mean(1), (lap > 2).mean(1)]
    gy, gx = np.gradient(z, axis=(1, 2))
    zf = z.reshape(n, -1)
    f += [np.hypot(gx, gy).reshape(n, -1).mean(1), (zf < -1.5).mean(1), (zf < -2.5).mean(1)]
    idx = np.clip(((zf + 3) * 2).astype(int), 0, 11) + np.arange(n)[:, None] * 12
    hist = np.bincount(idx.ravel(), minlength=n * 12).reshape(n, 12) / zf.shape[1]
    return np.c_[np.stack(f, 1), hist]


def logistic_regression(x_train, y_train, x_test, l2=1e-2, iters=100):
    """Fit L2-regularised logistic regression (Newton steps) on standardised features; predict."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    b = np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
    w = np.zeros(a.shape[1])
    reg = l2 * np.eye(a.shape[1])
    reg[-1, -1] = 0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-a @ w))
        grad = a.T @ (p - y_train) / len(a) + reg @ w
        hess = (a * (p * (1 - p))[:, None]).T @ a / len(a) + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return (b @ w > 0).astype(int)


def labelled_patches(data, cache_root, scales, patch_size):
    """``{scale: (patches, labels, slide ids)}`` of the kept, unambiguous patches, and the cases."""
    cases = list_cases(data)
    params = ExtractionParams(patch_size=patch_size, stride=patch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, sets = extract_dataset(cases, scales, cache_root, params, workers=os.cpu_count() or 1, progress=False)
    out = {}
    for sc in scales:
        xs, ys, ids = [], [], []
        for c in cases:
            ps = sets.get((c.case_id, sc))
            if ps is None or len(ps.patches) == 0:
                continue
            lab = ps.kept["label"].to_numpy()
            ok = lab >= 0
            xs.append(np.asarray(ps.patches)[ok])
            ys.append(lab[ok])
            ids += [c.case_id] * int(ok.sum())
        out[sc] = (np.concatenate(xs), np.concatenate(ys), np.array(ids))
    return out, cases


def splits(cases, ids, seed):
    """The split (``train``, ``val`` or ``test``) of each patch's slide, patient-grouped."""
    sp = split_cases(
        [c.case_id for c in cases],
        [c.label for c in cases],
        (0.6, 0.2, 0.2),
        seed=seed,
        patients=[c.patient_id for c in cases],
    )
    split = dict(zip(sp["case_id"], sp["split"]))
    return np.array([split[i] for i in ids])


def learnability(data, cache_root, seeds, patch_size=64, scales=(4, 16, 64)):
    """Held-out accuracy of the colour and texture regressions per scale, over split seeds."""
    per_scale, cases = labelled_patches(data, cache_root, list(scales), patch_size)
    rows = []
    for sc, (x, y, ids) in per_scale.items():
        feats = {"colour histograms": colour_histograms(x), "texture": texture_features(x)}
        acc = {k: [] for k in feats}
        for seed in seeds:
            test = splits(cases, ids, seed) != "train"
            for k, f in feats.items():
                acc[k].append(float(np.mean(logistic_regression(f[~test], y[~test], f[test]) == y[test])))
        rows.append(
            {
                "scale": sc,
                "patches": len(y),
                "positive": float(y.mean()),
                **{k: (float(np.mean(v)), float(np.std(v))) for k, v in acc.items()},
            }
        )
    return rows, per_scale, cases


# ---------------------------------------------------------------------------------------------
# A small CNN at 4x, with and without stain augmentation
# ---------------------------------------------------------------------------------------------


def cnn_accuracy(x, y, split, seed, augment, epochs=10):
    """Test accuracy of a four-block CNN trained on the training patches, at the epoch with the
    best validation accuracy."""
    import torch
    from torch import nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        block(3, 16),
        block(16, 32),
        block(32, 64),
        block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 2),
    )
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def tensor(which):
        return torch.from_numpy(x[split == which]).permute(0, 3, 1, 2).float() / 255

    def accuracy(which):
        model.eval()
        xe = tensor(which)
        with torch.no_grad():
            pred = torch.cat([model(xe[i : i + 512]).argmax(1) for i in range(0, len(xe), 512)]).numpy()
        return float(np.mean(pred == y[split == which]))

    xt, yt = tensor("train"), torch.from_numpy(y[split == "train"]).long()
    best = (-1.0, None)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(order), 128):
            b = order[i : i + 128]
            xb = xt[b]
            if augment:  # flips, quarter turns, and each dye channel's optical density scaled
                xb = torch.rot90(
                    xb.flip(3) if torch.rand(1, generator=gen) < 0.5 else xb,
                    int(torch.randint(0, 4, (1,), generator=gen)),
                    (2, 3),
                )
                od = -torch.log(xb.clamp(1 / 255, 1))
                k = 0.7 + 0.6 * torch.rand(len(b), 3, 1, 1, generator=gen)
                xb = torch.exp(-(od * k + 0.06 * (torch.rand(len(b), 3, 1, 1, generator=gen) - 0.5)).clamp(0, None))
            loss = nn.functional.cross_entropy(model(xb), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = accuracy("val")
        if val > best[0]:
            best = (val, accuracy("test"))
    return best[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data",
        type=Path,
        help="an existing demo folder for the learnability check (default: the one this run generates)",
    )
    ap.add_argument("--skip-generation", action="store_true", help="do not time the generation")
    ap.add_argument("--seeds", type=int, default=6, help="split seeds to average over (default 6)")
    ap.add_argument("--cnn", action="store_true", help="also train a small CNN at 4x, with and without augmentation")
    ap.add_argument("--cnn-seeds", type=int, default=3, help="split seeds for the CNN (default 3)")
    args = ap.parse_args()
    out = {"machine": os.uname().machine, "cores": os.cpu_count(), "generator_version": syn.GENERATOR_VERSION}
    lines = []
    with tempfile.TemporaryDirectory(prefix="synthetic-bench-") as tmp:
        tmp = Path(tmp)
        if not args.skip_generation:
            out["generation"] = generation(tmp)
            lines += ["| what | wall s | CPU s | note |", "|---|---|---|---|"]
            for r in out["generation"]:
                note = (
                    f"{r['mpx']:,.0f} Mpx, {r['mpx'] / r['cpu_s']:.1f} Mpx per CPU s"
                    if "mpx" in r
                    else f"{r['files']} files"
                )
                lines.append(f"| {r['what']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {note} |")
            lines.append("")
        data = args.data or (tmp / "demo" if not args.skip_generation else syn.ensure_demo_dataset())
        rows, per_scale, cases = learnability(data, tmp / "cache", range(args.seeds))
        out["learnability"] = rows
        lines += [
            f"Held-out accuracy over {args.seeds} patient-grouped splits (mean +- sd):",
            "",
            "| scale | labelled patches | positive | colour histograms | texture |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            c, t = r["colour histograms"], r["texture"]
            lines.append(
                f"| {r['scale']}x | {r['patches']:,} | {r['positive']:.0%} | {c[0]:.1%} +- {c[1]:.1%} "
                f"| {t[0]:.1%} +- {t[1]:.1%} |"
            )
        if args.cnn:
            x, y, ids = per_scale[4]
            res = {
                aug: [cnn_accuracy(x, y, splits(cases, ids, s), s, aug) for s in range(args.cnn_seeds)]
                for aug in (False, True)
            }
            out["cnn_4x"] = {"plain": res[False], "augmented": res[True]}
            lines += [
                "",
                "4x CNN, test accuracy at the best validation epoch:",
                "",
                "| 4x CNN | per split seed | mean |",
                "|---|---|---|",
            ]
            for aug, name in ((False, "no augmentation"), (True, "stain + flip augmentation")):
                lines.append(f"| {name} | {', '.join(f'{a:.1%}' for a in res[aug])} | {np.mean(res[aug]):.1%} |")
    text = "\n".join(lines)
    print(text)
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (res_dir / f"synthetic_{stamp}.json").write_text(json.dumps(out, indent=2) + "\n")
    (res_dir / f"synthetic_{stamp}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
