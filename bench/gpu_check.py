"""GPU check: the project's loops against the bare model on the same GPU, in one run.

Measures, on one machine, and prints one table with the ratios and their targets:

- training (target >= 0.9 of bare): ``helpers.learning.train.fit`` fed by notebook 04's pipeline
  (EfficientNet-B0 and ResNet-50 on balanced 4x batches) and notebook 03's (the paper's UNet++
  on 1x patches with masks, half from tumour patches), memory-mapped caches, augmentation on
  the device, bf16 autocast and channels_last, against the bare training step of the same
  network (``bench/train_benchmark.py``'s, as ``shared/bench/gpu_model_ceiling.py`` measures
  it). The loop's rate is its training phase (first batch gathered to last step done) of the
  second epoch; checkpoint writing is reported apart. The bare step is measured twice: with
  the cuDNN settings ``fit`` uses (``deterministic``, no autotuning: ``seed_everything``) and
  with ``cudnn.benchmark`` (the shared ceiling's);
- whole-slide inference (target >= 0.8 of bare): ``helpers.learning.inference.predict_slide`` with one
  reader thread per core against bare UNet++ inference on device-resident batches
  (``bench/inference_benchmark.py``), both bf16 + channels_last;
- DDP scaling: the EfficientNet-B0 loop under ``torchrun`` with 1 process and with one per
  visible GPU (each process a batch of 256), images per second and the efficiency
  ``rate(N) / (N x rate(1))``.

The data is made here (synthetic PAIP-like demo slides, their 1x and 4x patch caches under
``runs/gpu_check``), so the script runs on a bare machine. Estimated at 3-4 minutes on one
H200 (about 40 s of it making the data); it must stay under 8. Not yet run on a GPU: written
from the CPU ``--quick`` run and by reading.

Usage::

    python bench/gpu_check.py                 # on a GPU machine: batch 256, 224 px
    python bench/gpu_check.py --json out.json # also write the numbers
    python bench/gpu_check.py --quick         # CPU smoke test: tiny sizes, well under a minute;
                                              # its numbers mean nothing
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from feed_benchmark import long_epochs  # noqa: E402
from inference_benchmark import measure as measure_inference  # noqa: E402
from train_benchmark import bare, cls_source, make, seg_source  # noqa: E402

from helpers.learning import distributed as dd  # noqa: E402
from helpers.learning.train import TrainConfig, fit, select_device  # noqa: E402

TRAIN_TARGET, INFER_TARGET = 0.9, 0.8
MODELS = ("efficientnet_b0", "resnet50", "unetpp_paper")


def settings(quick):
    """Sizes of one run: the real check, or the CPU smoke test."""
    if quick:
        # ddp_size 64: a last batch of 2 split over 2 processes is 1 patch each, which BatchNorm
        # refuses when EfficientNet-B0's last feature map is 1 x 1 (32 px input).
        return dict(
            batch=4,
            size=32,
            images=16,
            seg_images=8,
            bare_steps=2,
            warmup=1,
            infer_size=64,
            infer_batch=8,
            infer_seconds=0.5,
            ddp_images=16,
            ddp_size=64,
            run="gpu_check_quick",
            stride=112,
        )
    return dict(
        batch=256,
        size=224,
        images=256 * 24,
        seg_images=256 * 12,
        bare_steps=20,
        warmup=5,
        infer_size=224,
        infer_batch=256,
        infer_seconds=4.0,
        ddp_images=256 * 24,
        ddp_size=224,
        run="gpu_check",
        stride=224,
    )


def make_data(quick, run, stride):
    """Synthetic slides, their 1x (with masks) and 4x patch caches, and the run's record and split.

    Returns:
        The slide to segment for the inference check.
    """
    from helpers.core.paths import run_dir
    from helpers.demo.synthetic import CaseSpec, demo_cases, ensure_demo_dataset
    from helpers.patching.caches import ExtractionParams
    from helpers.patching.patches import extract_dataset
    from helpers.wsi.dataset import list_cases

    if quick:  # the tests' tiny cases: two with tumour, one without
        specs = [
            CaseSpec("tiny_t1", 3072, 2560, True, 11),
            CaseSpec("tiny_n0", 2048, 2048, False, 12),
            CaseSpec("tiny_t2", 2560, 3584, True, 13),
        ]
        slide_id = "tiny_t2"
    else:  # a 16k slide with tumour (~2,600 tissue patches at 1x: the inference slide) and three 8k ones
        specs = [c for c in demo_cases() if c.case_id in ("demo_01", "demo_03", "demo_04", "demo_06")]
        slide_id = "demo_01"
    data = ensure_demo_dataset(folder=REPO / "bench" / "cache" / run, cases=specs, workers=len(specs), progress=False)
    cases = list_cases(data)
    params = ExtractionParams(stride=stride)
    folder = run_dir(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # slides too small at 4x in the quick set
        extract_dataset(cases, [1, 4], folder / "patches", params, progress=False)
    from helpers.patching.caches import save_extraction_record

    save_extraction_record(folder, data, [1, 4], params, cases)
    pd.DataFrame({"case_id": [c.case_id for c in cases], "split": "train"}).to_csv(folder / "split.csv", index=False)
    return next(c.slide for c in cases if c.case_id == slide_id)


class Timed:
    """Wraps ``train_batches`` and ``evaluate`` of ``fit``: the seconds of each epoch's training
    phase (from asking for its batches to the end of its last step) and the images in it."""

    def __init__(self, train_batches, device):
        self.src, self.device = train_batches, device
        self.phases, self.epochs, self.t0, self.n = [], [], None, 0

    def batches(self, epoch):
        self.t0, self.n = time.perf_counter(), 0
        timed, inner = self, self.src(epoch)

        class _Counted:  # the same batches, their images counted
            def __len__(self):
                return len(inner)

            def __iter__(self):
                for x, y in inner:
                    timed.n += len(x)
                    yield x, y

        return _Counted()

    def evaluate(self, model, device):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.phases.append((self.n, time.perf_counter() - self.t0))
        return {"val_loss": 0.0}

    def log(self, msg):
        """``fit``'s log: an epoch's line comes once its checkpoint and history are written."""
        if msg.startswith("epoch "):
            self.epochs.append(time.perf_counter() - self.t0)

    def outside(self):
        """Seconds of the last epoch spent after training (validation, checkpoint, history)."""
        return self.epochs[-1] - self.phases[-1][1]

    def rate(self):
        """Images/s of the last epoch's training phase."""
        n, s = self.phases[-1]
        return n / s


def loop_rate(name, s, device):
    """Images/s of ``fit``'s training phase through the notebooks' pipeline (second epoch), and
    the seconds per epoch spent outside it (validation stub, checkpoints, history)."""
    from helpers.learning.unetpp import deep_supervision_dice_loss
    from helpers.paper.classification_data import class_prepare
    from helpers.paper.segmentation_data import segmentation_prepare

    model, seg = make(name)
    if seg:
        src = seg_source(s["run"], s["batch"], s["seg_images"])
        prepare = segmentation_prepare(s["size"], augment=True, color=0.06, seed=0)
        lossf = deep_supervision_dice_loss
    else:
        src = long_epochs(cls_source(s["run"], s["batch"], s["images"]), s["images"], s["batch"])
        prepare = class_prepare(s["size"], augment=True, color=0.06, seed=0)
        lossf = torch.nn.functional.cross_entropy
    timed = Timed(src, device)
    cfg = TrainConfig(epochs=2, optimizer="adam", lr=1e-4, device=device.type)
    with tempfile.TemporaryDirectory() as d:
        fit(
            model,
            timed.batches,
            timed.evaluate,
            lossf,
            cfg,
            d,
            prepare=prepare,
            progress=False,
            log=timed.log,
            batch_size=s["batch"],
        )
    return timed.rate(), timed.outside()


def bare_rates(name, s, device):
    """The bare step with fit's cuDNN settings (deterministic, no autotuning), then with autotuning."""
    if device.type != "cuda":  # no cuDNN: one measurement serves both
        r = bare(name, s["batch"], s["bare_steps"], device, s["size"], warmup=s["warmup"])
        return r, r
    out = []
    for deterministic in (True, False):
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic
        out.append(bare(name, s["batch"], s["bare_steps"], device, s["size"], warmup=s["warmup"]))
    return out


def ddp_worker(args):
    """One torchrun process of the scaling check: EfficientNet-B0 through notebook 04's pipeline,
    a global batch of ``batch`` patches per process; rank 0 writes the rate of epoch 2."""
    from helpers.paper.classification_data import class_prepare

    dd.init_from_env()
    world = dd.world_size()
    s = settings(args.quick)
    device = select_device("auto")
    if device.type == "cuda":
        device = torch.device("cuda", dd.local_rank())
    glob = s["batch"] * world
    model, _ = make("efficientnet_b0")
    n = s["ddp_images"] * world
    timed = Timed(long_epochs(cls_source(s["run"], glob, n), n, glob), device)
    cfg = TrainConfig(epochs=2, optimizer="sgd", lr=1e-3, device="auto")
    fit(
        model,
        timed.batches,
        timed.evaluate,
        torch.nn.functional.cross_entropy,
        cfg,
        args.ddp_worker_out,
        prepare=class_prepare(s["ddp_size"], augment=True, color=0.06, seed=0),
        progress=False,
        batch_size=glob,
    )
    if dd.is_main():
        (Path(args.ddp_worker_out) / "rate.json").write_text(json.dumps({"world": world, "img_s": timed.rate()}))
    dd.cleanup()


def ddp_rate(nproc, quick):
    """Images/s of the scaling check's loop with ``nproc`` processes under torchrun."""
    with tempfile.TemporaryDirectory() as d:
        cmd = dd.torchrun_command(
            [Path(__file__), "--ddp-worker-out", d] + (["--quick"] if quick else []), nproc, module=False
        )
        threads = 1 if quick else max(1, (os.cpu_count() or 2) // nproc)
        env = {"OMP_NUM_THREADS": threads, "TQDM_DISABLE": 1}
        res = subprocess.run(cmd, cwd=REPO, env=dd.child_environment(env), capture_output=True, text=True, timeout=240)
        if res.returncode != 0:
            raise RuntimeError(f"the {nproc}-process run failed:\n" + (res.stdout + res.stderr)[-3000:])
        return json.loads((Path(d) / "rate.json").read_text())["img_s"]


def _fmt(v, spec):
    """A table cell: ``-`` for nothing; small rates (the CPU smoke test's) with 3 digits."""
    if v is None:
        return "-"
    return f"{v:.3g}" if spec == ",.0f" and v < 100 else format(v, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke test at tiny sizes (numbers mean nothing)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--ddp-worker-out", help=argparse.SUPPRESS)  # internal: one torchrun process
    args = ap.parse_args(argv)
    if args.ddp_worker_out:
        ddp_worker(args)
        dd.exit_process(0)  # see its docstring: DDP's process group and interpreter shutdown
    t_start = time.perf_counter()
    s = settings(args.quick)
    if args.quick:  # one thread: a smoke test, steady on a busy machine (threads spin when cores are short)
        torch.set_num_threads(1)
    device = select_device("auto")
    if device.type != "cuda" and not args.quick:
        print("note: no GPU here; the numbers are the CPU's (use --quick for a smoke test)", file=sys.stderr)
    say = lambda m: print(f"[{time.perf_counter() - t_start:5.0f} s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    say("synthetic slides and patch caches ...")
    slide = make_data(args.quick, s["run"], s["stride"])
    rows = []

    def check(kind, what, fn):
        """One row; a failure (out of memory, a hung process ...) becomes a row, not the end."""
        try:
            rows.append({"check": kind, "what": what, **fn()})
        except Exception as exc:  # report it and go on with the other checks
            traceback.print_exc()
            rows.append(
                {
                    "check": kind,
                    "what": what,
                    "bare": None,
                    "real": None,
                    "ratio": None,
                    "target": None,
                    "note": f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:150]}",
                }
            )

    def train_row(name):
        say(f"{name}: bare step (fit's cuDNN settings, then autotuned) ...")
        b_det, b_tuned = bare_rates(name, s, device)
        say(f"{name}: training loop ...")
        lp, outside = loop_rate(name, s, device)
        return {
            "bare": b_det,
            "real": lp,
            "ratio": lp / b_det,
            "target": TRAIN_TARGET,
            "note": f"vs autotuned bare {b_tuned:,.0f}: {lp / b_tuned:.2f}; "
            f"{outside:.2f} s per epoch after training (checkpoints)",
        }

    for name in args.models:
        check("train", name, lambda: train_row(name))
    workers = os.cpu_count() or 1

    def inference_row():
        say(f"whole-slide inference ({workers} reader threads) ...")
        r = measure_inference(
            slide,
            s["infer_size"],
            s["infer_batch"],
            read_workers=workers,
            seconds=s["infer_seconds"],
            amp=True,
            device=device,
        )
        return {
            "bare": r["bare"],
            "real": r["slide"],
            "ratio": r["slide"] / r["bare"],
            "target": INFER_TARGET,
            "note": f"{Path(slide).stem}, {r['n_patches']} tissue patches in {r['seconds']:.2f} s, "
            f"{workers} reader threads",
        }

    check("inference", "predict_slide", inference_row)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    n = gpus if gpus else 2  # on the CPU: 2 gloo processes (smoke test)

    def ddp_row():
        say("DDP: 1 process ...")
        one = ddp_rate(1, args.quick)
        if n < 2:
            return {
                "bare": None,
                "real": one,
                "ratio": None,
                "target": None,
                "note": "1 process (1 GPU visible: scaling needs 2 or more)",
            }
        say(f"DDP: {n} processes ...")
        many = ddp_rate(n, args.quick)
        return {
            "bare": n * one,
            "real": many,
            "ratio": many / (n * one),
            "target": None,
            "note": f"{n} vs 1 processes; 1 process {one:,.0f} img/s; batch {s['batch']} per process",
        }

    check("ddp", "efficientnet_b0", ddp_row)

    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\nGPU check on {dev} ({gpus} GPUs), torch {torch.__version__}, batch {s['batch']}, {s['size']} px, "
        f"bf16 + channels_last on GPUs, {time.perf_counter() - t_start:.0f} s\n"
    )
    print("| check | what | bare img/s | real img/s | real / bare | target | met | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        met = "-" if r["target"] is None else ("yes" if r["ratio"] >= r["target"] else "NO")
        print(
            f"| {r['check']} | {r['what']} | {_fmt(r['bare'], ',.0f')} | {_fmt(r['real'], ',.0f')} | "
            f"{_fmt(r['ratio'], '.2f')} | {_fmt(r['target'], '.1f')} | {met} | {r['note']} |"
        )
    print("\n(ddp: 'bare' is N x the 1-process rate, so real / bare is the scaling efficiency)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"device": dev, "gpus": gpus, "settings": s, "rows": rows, "seconds": time.perf_counter() - t_start},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
