"""The paper profile's code paths, end to end on a small dataset, in CI (no GPU, no internet).

224 px patches at 1x (segmentation) and 4x/16x, no-overlap strides, EfficientNet-B0 with its
early stages frozen and trained with SGD, ResNet-50 with Adam, the plateau schedule: everything
the paper profile runs, with epochs and steps cut to seconds and training from scratch. The
checks read what ran: the executed notebooks' printouts and the checkpoints' settings.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import module_scratch

pytestmark = pytest.mark.slow  # the paper profile's whole series in a subprocess: minutes
REPO = Path(__file__).resolve().parent.parent

#: Seconds, not days: the paper's recipes with their epochs and steps cut down.
OVERRIDES = {
    "pretrained": "false",
    "scales": "[1, 4, 16]",
    "class_scales": "[4, 16]",
    "class_strides": "[224, 224]",
    "seg_epochs": "1",
    "seg_steps_per_epoch": "2",
    "seg_batch_size": "2",
    "val_max_patches": "4",
    "infer_batch_size": "8",
    "effnet_epochs": "2",
    "resnet_epochs": "2",
    "class_steps_per_epoch": "2",
    "class_batch_size": "4",
    "bn_batches": "1",
    "workers": "2",
    "max_thumbnails": "4",
    "region_size": "3584",
}


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, request):
    with module_scratch(tmp_path_factory, request, "paper") as root:
        yield _run_paper(root)


def _run_paper(root):
    from helpers.demo.synthetic import CaseSpec, ensure_demo_dataset

    cases = [
        CaseSpec(
            f"p{i}",
            3600 + 160 * i,
            3700 - 120 * i,
            i % 2 == 0,
            70 + i,
            patient_id=f"P{i}",
            tissue_share=0.8,
            tumor_share=0.6,
        )
        for i in range(8)
    ]
    data = ensure_demo_dataset(root / "data", cases=cases, workers=2, progress=False)
    env = {**os.environ, "PAIP_REPRO_RUNS": str(root / "runs"), "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
    args = [
        sys.executable,
        "-m",
        "helpers.run",
        "--profile",
        "paper",
        "--no-progress",
        "--run-name",
        "paper",
        "-p",
        "data_dir",
        str(data),
    ]
    for k, v in OVERRIDES.items():
        args += ["-p", k, v]
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "runs" / "paper"


def _printed(run, nb):
    path = next((run / "notebooks").glob(f"{nb}_*.ipynb"))
    return "\n".join(
        "".join(o.get("text", "")) for c in json.loads(path.read_text())["cells"] for o in c.get("outputs", [])
    )


def test_the_paper_profile_runs_every_notebook(paper_run):
    rec = json.loads((paper_run / "params.json").read_text())
    assert rec["profile"] == "paper" and len(rec["finished_notebooks"]) == 5
    p = rec["parameters"]
    assert (
        p["patch_size"] == p["stride"] == p["seg_input_size"] == p["effnet_input_size"] == p["resnet_input_size"] == 224
    )
    assert p["seg_scale"] == 1 and p["effnet_frozen_stages"] == 4 and p["class_strides"] == [224, 224]


def test_segmentation_at_224_px_full_resolution(paper_run):
    text = _printed(paper_run, "03")
    assert "a batch of (2, 3, 224, 224)" in text
    ck = torch.load(paper_run / "segmentation" / "best.pt", map_location="cpu", weights_only=False)
    meta = ck["identity"]["meta"]
    assert meta["input_size"] == 224 and meta["patch_size"] == 224 and meta["scale"] == 1
    assert ck["identity"]["config"]["optimizer"] == "adam"


def test_the_two_recipes_frozen_stages_and_plateau_schedule(paper_run):
    text = _printed(paper_run, "04")
    effnet = next(ln for ln in text.splitlines() if ln.startswith("efficientnet_b0  SGD"))
    trainable = float(effnet.split(": ")[1].split(" M")[0])
    assert trainable < 3.9, "EfficientNet-B0's stem and first 4 stages should be frozen"  # 4.0 M when all train
    assert "resnet50         Adam" in text
    for key, optimizer, patience in (("efficientnet_b0_x4", "sgd", 8), ("resnet50_x4", "adam", 25)):
        ck = torch.load(paper_run / "classification" / key / "last.pt", map_location="cpu", weights_only=False)
        cfg = ck["identity"]["config"]
        assert cfg["optimizer"] == optimizer and cfg["lr_patience"] == patience and cfg["lr_factor"] == 0.1
        assert ck["scheduler"]["patience"] == patience and ck["identity"]["meta"]["stride"] == 224
        assert ck["identity"]["meta"]["input_size"] == 224 and ck["epoch"] == 2


def test_voting_and_the_report(paper_run):
    summary = json.loads((paper_run / "summary.json").read_text())
    slides = {r["quantity"]: r for r in summary["numbers"] if r["quantity"].startswith("slides correct")}
    assert slides["slides correct, the paper's rule"]["ours"] and slides["slides correct, the paper's rule"]["paper"]
    # every measured row stands beside its baseline and interval
    for r in summary["numbers"]:
        if r["ours"] is not None and r["quantity"].startswith(("patch accuracy", "slides correct")):
            assert r["baseline"] != "-" and r["ci"] != "-" and r["reading"] != "-", r
