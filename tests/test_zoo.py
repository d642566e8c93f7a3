"""The dataset zoo: the whole series on the shapes of data users bring, with the smoke profile.

Each shape runs through ``helpers.run`` as a user would; each notebook either runs to its end or
stops in its first code cells with one message naming the cause and the fix. What the notebooks
print is checked where it says something that used to be wrong (counts, skips with their true
cause, patients kept within one split, unlabelled slides, voting without a classifier, slides
that all hold tumour).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import module_scratch

pytestmark = pytest.mark.slow  # the whole series on eight datasets, in subprocesses: minutes
REPO = Path(__file__).resolve().parent.parent
TIMES = {}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, request):
    from helpers.demo.synthetic import write_zoo_dataset

    with module_scratch(tmp_path_factory, request, "zoo") as root:
        env = {**os.environ, "PAIP_REPRO_RUNS": str(root / "runs"), "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}

        def run(shape, *extra, run_name=None):
            data = root / "data" / shape
            if not data.exists():
                write_zoo_dataset(shape, data)
            t0 = time.monotonic()
            p = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "helpers.run",
                    "--profile",
                    "smoke",
                    "--no-progress",
                    "-p",
                    "data_dir",
                    str(data),
                    "--run-name",
                    run_name or shape,
                    *extra,
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            TIMES[run_name or shape] = time.monotonic() - t0
            return p, root / "runs" / (run_name or shape)

        yield run
        print("\nzoo run times:", {k: round(v) for k, v in TIMES.items()})


def text(run_folder, notebook):
    """All stdout and stderr the executed notebook printed (the failed copy if it failed)."""
    nbdir = run_folder / "notebooks"
    path = next(iter(sorted(nbdir.glob(f"{notebook}_*.failed.ipynb"))), None) or next(
        iter(sorted(nbdir.glob(f"{notebook}_*.ipynb")))
    )
    out = []
    for c in json.loads(path.read_text())["cells"]:
        for o in c.get("outputs", []):
            out.append("".join(o.get("text", "")) + o.get("evalue", ""))
    return "\n".join(out)


def last_line(p):
    return (p.stderr.strip().splitlines() or [""])[-1]


@pytest.fixture(scope="module")
def mixed(zoo):
    return zoo("mixed")


def test_a_messy_folder_runs_to_the_end(mixed):
    """svs + PNG + JPEG slides, slides without masks, a blank slide, slides smaller than a patch,
    several slides per patient, a labels.csv with a patient column that misses some slides."""
    p, run = mixed
    assert p.returncode == 0, p.stderr[-3000:]
    t1 = text(run, "01")
    assert "labels.csv rows without a slide" in t1 and "no mask" in t1
    t2 = text(run, "02")
    assert "patients in more than one split: 0" in t2
    assert "smaller than one 32 px patch at 64x" in t2  # the true cause, not "a smaller stride"
    assert "use a smaller stride" not in t2 + text(run, "04")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["numbers"], "notebook 05 wrote no report"


def test_unannotated_slides_stop_training_with_one_message_then_take_trained_models(zoo, mixed):
    p, run = zoo("unannotated")
    assert p.returncode == 1
    msg = last_line(p)
    assert "03_segmentation_training" in msg and "cell 3" in msg and "models_from" in msg, p.stderr[-2000:]
    t1 = text(run, "01")
    assert "labelled                           0" in t1 and "without mpp" in t1
    assert "labels agree" not in t1  # nothing to compare, nothing claimed
    # Apply the models trained on the messy folder to these slides: masks, patch classes, votes.
    p, run = zoo("unannotated", "--only", "03", "04", "05", "-p", "models_from", "mixed", run_name="unannotated")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "no slide has a mask" in text(run, "03")
    assert "no slide has a true label" in text(run, "05")


def test_two_hundred_small_slides(zoo):
    p, run = zoo("many")
    assert p.returncode == 0, p.stderr[-3000:]
    t1 = text(run, "01")
    assert "slides                             200" in t1
    assert "patients in more than one split: 0" in text(run, "02")


def test_a_delivery_in_subfolders_runs_to_the_end(zoo):
    """Slides in batch_1/, batch_2/ and batch_2/rescans/ with their masks beside them and
    labels.csv at the top: found, labelled, shown by folder, and run through the series."""
    p, run = zoo("nested")
    assert p.returncode == 0, p.stderr[-3000:]
    t1 = text(run, "01")
    assert "slides                             6" in t1 and "labelled                           6" in t1
    assert "{'batch_1': 3, 'batch_2': 2, 'batch_2/rescans': 1}" in t1
    assert "batch_2/rescans/ne_06.svs" in t1


def test_a_two_scanner_cohort_gets_one_magnification_per_scale(zoo):
    """Six tissues scanned at 20x and 40x: without scale_reference the runner and notebook 01 say
    so; with it, every scale has one resolution, so both scans of a tissue give the same patches
    (the same area in microns, as many within 2 % at 4x) through the whole series."""
    p, run = zoo("mixed_mpp", "--only", "01", run_name="mixed_mpp_level0")
    assert p.returncode == 0, p.stderr[-3000:]
    warned = "scanned at different resolutions"
    assert warned in p.stdout and "scale_reference: 0.5" in p.stdout and warned in text(run, "01")
    p, run = zoo("mixed_mpp", "-p", "scale_reference", "0.5")
    assert p.returncode == 0, p.stderr[-3000:]
    assert warned not in p.stdout and "one resolution per scale on every slide" in text(run, "01")
    for scale, step in ((4, 8), (16, 32), (64, 128)):
        kept, um = {"20x": 0, "40x": 0}, set()
        for meta in (run / "patches").glob(f"*/x{scale}_*/meta.json"):
            m = json.loads(meta.read_text())
            if m["key"]["params"]["stride"] != 32:
                continue  # notebook 04's overlapping training grids
            scan = meta.parent.parent.name[-3:]
            kept[scan] += m["n_kept"]
            um.add(32 * m["downsample"] * (0.25 if scan == "40x" else 0.5))
            assert m["downsample"] == (step if scan == "40x" else step // 2)
        # 2 % at 4x (1,179 patches a scan); at 16x and 64x a few border patches of 75 and 6 are 4 %
        tolerance = 0.02 if scale == 4 else 0.05
        assert um == {32 * scale * 0.5} and abs(kept["40x"] - kept["20x"]) <= tolerance * kept["20x"], (scale, kept)


def test_old_labels_layout(zoo):
    p, run = zoo("case_labels", "--only", "01", "02")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "labelled                           5" in text(run, "01")


def test_no_classifier_can_train_and_the_report_says_why(zoo):
    p, run = zoo("no_tumour")
    assert p.returncode == 1 and "03_segmentation_training" in last_line(p) and "tumour" in last_line(p)
    p, run = zoo("no_tumour", "--only", "04", "05", run_name="no_tumour")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "no classifier can be trained" in text(run, "04")
    t5 = text(run, "05")
    assert "nothing to vote on" in t5 and "skipped: notebook 04 gave no prediction to vote on" in t5
    numbers = {r["quantity"]: r for r in json.loads((run / "summary.json").read_text())["numbers"]}
    why = numbers["slides correct, the paper's rule"]["convention"]
    assert why.startswith("not measured: notebook 04 trained no classifier") and "no tumour patch" in why, why
    assert (
        numbers["Dice (segmentation)"]["convention"] == "not measured: notebook 03 left no metrics for this run's split"
    )
    assert (run / "figures" / "05_reproduction_report.md").exists()


def test_slides_that_all_hold_tumour_get_a_report_that_says_the_slide_vote_cannot_fail(zoo):
    """As PAIP 2019: every slide holds tumour. The series runs to its end; the regions are voted
    on and scored; notebook 05 and the report say that calling every slide tumour cannot fail."""
    p, run = zoo("all_tumour")
    assert p.returncode == 0, p.stderr[-3000:]
    cannot_fail = "every test slide's true label is tumour, so calling every slide tumour cannot fail"
    assert f"but {cannot_fail}" in text(run, "05")
    summary = json.loads((run / "summary.json").read_text())
    numbers = {r["quantity"]: r for r in summary["numbers"]}
    assert numbers["Dice (segmentation)"]["ours"] is not None
    assert numbers["regions correct (512 px), the paper's rule"]["ours"] is not None
    assert f"slides correct, the paper's rule: {cannot_fail}" in " ".join(summary["notes"])
    assert cannot_fail in (run / "figures" / "05_reproduction_report.md").read_text()
