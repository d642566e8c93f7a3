"""Benchmark: whole-slide segmentation (slide file to stitched mask) against bare inference.

In one run on one device it measures

- ``bare``: the paper's UNet++ on batches already on the device (no reading, no tiling);
- ``slide``: ``helpers.inference.predict_slide`` on a demo slide: strips read by a read-ahead
  thread, glass skipped, tissue patches batched through the same network, probabilities
  stitched at 1/16,

and prints tissue patches per second of both and their ratio (issue 3's target: at least 0.8,
i.e. reading and tiling hidden behind the model). The network is untrained: speed only.

Usage: ``python bench/inference_benchmark.py [--case demo_03] [--input-size 128] [--batch 16]``
"""

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from helpers.inference import default_read_workers, predict_slide  # noqa: E402
from helpers.slides import list_cases  # noqa: E402
from helpers.synthetic import ensure_demo_dataset  # noqa: E402
from helpers.train import select_device  # noqa: E402
from helpers.unetpp import build_segmenter, probabilities  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="demo_03", help="demo case to segment (default demo_03, 8192 x 6144)")
    ap.add_argument("--input-size", type=int, default=128, help="network input side (224 = the paper's; 128 for CPU)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--read-workers", type=int, default=None,
                    help="reader threads (default: helpers.inference.default_read_workers(), half the cores)")
    args = ap.parse_args(argv)
    device = select_device("auto")
    torch.manual_seed(0)
    net = build_segmenter("paper").to(device).eval()
    case = {c.case_id: c for c in list_cases(ensure_demo_dataset(progress=False))}.get(args.case)
    if case is None:
        sys.exit(f"no case {args.case!r} in the demo data")

    # Bare inference: the same network on device-resident batches of the same size, measured
    # before and after the slide run (the faster of the two: warm-up and machine noise).
    x = torch.rand(args.batch, 3, args.input_size, args.input_size, device=device)

    def bare_rate(seconds=8):
        with torch.no_grad():
            for _ in range(3):
                probabilities(net(x))
            t = time.perf_counter()
            n = 0
            while time.perf_counter() - t < seconds:
                probabilities(net(x))
                n += args.batch
            if device.type == "cuda":
                torch.cuda.synchronize()
            return n / (time.perf_counter() - t)

    bare_before = bare_rate()
    res = predict_slide(net, case.slide, probabilities, out_downsample=16, batch_size=args.batch,
                        input_size=args.input_size, progress=False, read_workers=args.read_workers)
    slide_rate = res["n_patches"] / res["seconds"]
    bare = max(bare_before, bare_rate())
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nWhole-slide inference on {dev}: {case.case_id}, {res['n_patches']} tissue patches of 224 px, "
          f"network input {args.input_size} px, batch {args.batch}, "
          f"{args.read_workers or default_read_workers()} reader threads\n")
    print("| what | patches/s | seconds |")
    print("|---|---|---|")
    print(f"| bare UNet++ inference (device-resident batches) | {bare:.1f} | - |")
    print(f"| predict_slide: slide file to stitched 1/16 mask | {slide_rate:.1f} | {res['seconds']:.1f} |")
    print(f"\nratio slide / bare: {slide_rate / bare:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
