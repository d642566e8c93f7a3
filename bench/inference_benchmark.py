"""Benchmark: whole-slide segmentation (slide file to stitched mask) against bare inference.

In one run on one device it measures

- ``bare``: the paper's UNet++ on batches already on the device (no reading, no tiling);
- ``slide``: ``helpers.learning.inference.predict_slide`` on a demo slide: strips read by a read-ahead
  thread, glass skipped, tissue patches batched through the same network, probabilities
  stitched at 1/16,

and prints tissue patches per second of both and their ratio (issue 3's target: at least 0.8,
i.e. reading and tiling hidden behind the model). The network is untrained: speed only.

Usage: ``python bench/inference_benchmark.py [--case demo_03] [--input-size 128] [--batch 16]``
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from helpers.demo.synthetic import ensure_demo_dataset  # noqa: E402
from helpers.learning.inference import default_read_workers, predict_slide  # noqa: E402
from helpers.learning.train import select_device  # noqa: E402
from helpers.learning.unetpp import build_segmenter, probabilities  # noqa: E402
from helpers.wsi.dataset import list_cases  # noqa: E402


def measure(slide, input_size=128, batch=16, read_workers=None, seconds=8.0, amp=False, device=None):
    """Bare inference and ``predict_slide`` of the paper's UNet++ (untrained) on one slide.

    Args:
        slide: the slide file.
        input_size: network input side (patches are area-resized to it).
        batch: patches per forward pass.
        read_workers: reader threads of ``predict_slide`` (default: its own default).
        seconds: length of each bare measurement (one before the slide run, one after; the
            faster counts: warm-up and machine noise).
        amp: bf16 autocast and channels_last on a GPU, for both measurements.
        device: default: CUDA if available.

    Returns:
        A dict: ``bare`` and ``slide`` (patches/s), ``n_patches``, ``seconds`` (of the slide).
    """
    device = device or select_device("auto")
    amp = amp and device.type == "cuda"
    torch.manual_seed(0)
    net = build_segmenter("paper").to(device).eval()
    x = torch.rand(batch, 3, input_size, input_size, device=device)
    if amp:
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    # Bare inference: the same network on device-resident batches of the same size.
    def bare_rate():
        with torch.no_grad(), ctx():
            for _ in range(3):
                probabilities(net(x))
            t = time.perf_counter()
            n = 0
            while time.perf_counter() - t < seconds:
                probabilities(net(x))
                n += batch
            if device.type == "cuda":
                torch.cuda.synchronize()
            return n / (time.perf_counter() - t)

    bare_before = bare_rate()
    with ctx():
        res = predict_slide(
            net,
            slide,
            probabilities,
            out_downsample=16,
            batch_size=batch,
            input_size=input_size,
            progress=False,
            read_workers=read_workers,
            device=device,
        )
    return {
        "bare": max(bare_before, bare_rate()),
        "slide": res["n_patches"] / res["seconds"],
        "n_patches": res["n_patches"],
        "seconds": res["seconds"],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="demo_03", help="demo case to segment (default demo_03, 8192 x 6144)")
    ap.add_argument("--input-size", type=int, default=128, help="network input side (224 = the paper's; 128 for CPU)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--read-workers",
        type=int,
        default=None,
        help="reader threads (default: helpers.learning.inference.default_read_workers(), half the cores)",
    )
    args = ap.parse_args(argv)
    device = select_device("auto")
    case = {c.case_id: c for c in list_cases(ensure_demo_dataset(progress=False))}.get(args.case)
    if case is None:
        sys.exit(f"no case {args.case!r} in the demo data")
    r = measure(case.slide, args.input_size, args.batch, args.read_workers, device=device)
    bare, slide_rate = r["bare"], r["slide"]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\nWhole-slide inference on {dev}: {case.case_id}, {r['n_patches']} tissue patches of 224 px, "
        f"network input {args.input_size} px, batch {args.batch}, "
        f"{args.read_workers or default_read_workers()} reader threads\n"
    )
    print("| what | patches/s | seconds |")
    print("|---|---|---|")
    print(f"| bare UNet++ inference (device-resident batches) | {bare:.1f} | - |")
    print(f"| predict_slide: slide file to stitched 1/16 mask | {slide_rate:.1f} | {r['seconds']:.1f} |")
    print(f"\nratio slide / bare: {slide_rate / bare:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
