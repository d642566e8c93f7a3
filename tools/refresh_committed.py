"""Maintainers: re-execute the committed notebooks on the demo data and refresh ``figures/``.

The notebooks in ``notebooks/`` are committed with the outputs of a demo run (nbval compares
the cells marked ``# NBVAL_CHECK_OUTPUT`` against them), figures inline. This executes each
notebook in place with papermill and its own default parameters (the demo profile's values),
with matplotlib's inline backend so every figure lands in the notebook, into the run folder
``runs/demo``; then copies that run's figures into the repository's ``figures/`` (the README's
thumbnails). A plain ``make demo`` never touches either.

Usage: ``make refresh-committed`` (or ``python tools/refresh_committed.py [--only 03 04]``).
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="notebook numbers, e.g. 03 04 (default: all, in order)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import papermill as pm

    from helpers.core.paths import figures_dir
    from helpers.run import notebooks

    os.environ.pop("MPLBACKEND", None)  # the kernel's default: inline figures
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars in committed outputs
    os.environ["PAIP_REPRO_STRICT_FIGURES"] = "1"  # a figure that fails must not be committed as a skip
    for nb in notebooks(args.only):
        t = time.perf_counter()
        print(f"executing {nb.name} ...", flush=True)
        pm.execute_notebook(
            str(nb),
            str(nb),
            kernel_name="python3",
            cwd=str(nb.parent),
            progress_bar=False,
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
        print(f"    {time.perf_counter() - t:.0f} s", flush=True)
    out = REPO / "figures"
    out.mkdir(exist_ok=True)
    made = sorted(figures_dir("demo").glob("*.png")) + sorted(figures_dir("demo").glob("*.md"))
    # A figure of a refreshed notebook that its run no longer draws is removed, not left stale.
    refreshed = {nb.name[:2] for nb in notebooks(args.only)}
    for old in out.glob("*.png"):
        if old.name[:2] in refreshed and not (figures_dir("demo") / old.name).exists():
            old.unlink()
            print(f"removed {old.name}: the demo run no longer draws it")
    for png in made:
        shutil.copy2(png, out / png.name)
    print(f"figures copied from {figures_dir('demo')} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
