"""Bad input: each case gives one clear helpers.core.errors.InputError naming the file or parameter."""

import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import write_tiff_mask

from helpers.core.errors import InputError, check_fraction, check_positive, check_type
from helpers.patching.caches import ExtractionParams, check_scales
from helpers.patching.patches import extract_dataset, extract_slide
from helpers.wsi.dataset import Case, list_cases
from helpers.wsi.slides import Mask, Slide

REPO = Path(__file__).resolve().parent.parent


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg, f"the message should be one line: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# Slides
# ---------------------------------------------------------------------------------------------


def test_missing_slide(tmp_path):
    path = tmp_path / "missing.svs"
    with pytest.raises(InputError) as ei:
        Slide(path)
    msg = _one_line(ei)
    assert str(path) in msg and "no such" in msg


@pytest.mark.parametrize("missing", ["slide", "viable"])
def test_missing_files_in_extraction(small_dataset, tmp_path, missing):
    slide = tmp_path / "missing.svs" if missing == "slide" else small_dataset / "tiny_t1.svs"
    viable = tmp_path / "missing_viable.tif" if missing == "viable" else None
    with pytest.raises(InputError) as ei:
        extract_slide(Case("tiny_t1", slide, None, viable), 1, tmp_path / "cache")
    assert "missing" in _one_line(ei)
    assert not list((tmp_path / "cache").rglob("x1_*"))


def test_folder_named_like_a_slide(tmp_path):
    (tmp_path / "dir.svs").mkdir()
    with pytest.raises(InputError, match="dir.svs.*folder"):
        Slide(tmp_path / "dir.svs")


def test_text_file_named_svs(tmp_path):
    path = tmp_path / "x.svs"
    path.write_text("this is not a slide\n" * 10)
    with pytest.raises(InputError) as ei:
        Slide(path)
    msg = _one_line(ei)
    assert str(path) in msg and "cannot be read" in msg


def test_text_file_with_unknown_suffix(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError) as ei:
        Slide(path)
    assert str(path) in _one_line(ei) and "not a slide" in str(ei.value)


def _truncated_copy(src, dest, fraction):
    data = Path(src).read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def test_truncated_cmu_slide(cmu_slide, tmp_path):
    path = _truncated_copy(cmu_slide, tmp_path / "cmu_trunc.svs", 0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's "Corrupt EXIF data" while probing
        try:
            s = Slide(path)
        except InputError as exc:
            msg = str(exc)
            assert "\n" not in msg
            assert str(path) in msg
            assert "truncated" in msg or "damaged" in msg
            return
        # If opening succeeds, reading must fail clearly.
        with pytest.raises(InputError, match="cmu_trunc.svs.*(truncated|damaged)"):
            s.read_region(0, 0, *s.dimensions)


def test_truncated_svs_not_silently_opened_as_plain_image(cmu_slide, tmp_path):
    path = _truncated_copy(cmu_slide, tmp_path / "cmu_90.svs", 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            s = Slide(path)
        except InputError as exc:
            assert "truncated" in str(exc) or "damaged" in str(exc)
            return
    assert s.vendor == "aperio", f"a damaged .svs opened as vendor {s.vendor!r}"


def test_truncated_synthetic_slide(small_dataset, tmp_path):
    path = _truncated_copy(small_dataset / "tiny_t1.svs", tmp_path / "t1_trunc.svs", 0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError) as ei:
            Slide(path)
    msg = _one_line(ei)
    assert str(path) in msg and ("truncated" in msg or "damaged" in msg)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def _damaged_mask_case(small_dataset, folder):
    """A copy of tiny_t1 whose viable mask has its tile data overwritten with noise."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tiny_t1.svs", "tiny_t1_whole.tif", "tiny_t1_viable.tif"):
        shutil.copy(small_dataset / name, folder / name)
    mpath = folder / "tiny_t1_viable.tif"
    with tifffile.TiffFile(mpath) as t:
        offsets, counts = t.pages[0].dataoffsets, t.pages[0].databytecounts
    data = bytearray(mpath.read_bytes())
    rng = np.random.default_rng(0)
    for o, n in zip(offsets, counts):
        data[o : o + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    mpath.write_bytes(bytes(data))
    return Case("tiny_t1", folder / "tiny_t1.svs", folder / "tiny_t1_whole.tif", mpath)


def test_damaged_mask_tiles(small_dataset, tmp_path):
    case = _damaged_mask_case(small_dataset, tmp_path / "data")

    def read_mask():
        with Mask(case.viable, (3072, 2560)) as m:
            return m.read(0, 0, 512, 512)

    for call in (read_mask, lambda: extract_slide(case, 1, tmp_path / "cache", workers=1)):
        try:
            call()
        except InputError as exc:
            assert "tiny_t1_viable.tif" in str(exc)
        except Exception as exc:  # noqa: BLE001 - the bug: another exception type
            raise AssertionError(f"not an InputError: {type(exc).__name__}: {exc}") from exc
        else:
            raise RuntimeError("a damaged mask was read without any error")
    assert not list((tmp_path / "cache").rglob("x1_*"))


_HANG_SCRIPT = textwrap.dedent("""
    import os, sys, threading, warnings
    threading.Timer(float(sys.argv[3]), lambda: os._exit(3)).start()   # a hang is a failure
    warnings.simplefilter("ignore")
    sys.path.insert(0, "tests")
    from pathlib import Path
    from test_bad_input import _damaged_mask_case
    from helpers.core.errors import InputError
    from helpers.patching.patches import extract_slide
    case = _damaged_mask_case(Path(sys.argv[1]), Path(sys.argv[2]) / "data")
    print("READY", flush=True)
    try:
        extract_slide(case, 1, Path(sys.argv[2]) / "cache", workers=2)
    except InputError as exc:
        print("INPUTERROR", exc, flush=True)
        os._exit(0)
    except Exception as exc:
        print("OTHER", type(exc).__name__, exc, flush=True)
        os._exit(5)
    print("NOERROR", flush=True)
    os._exit(6)
""")


@pytest.mark.slow
def test_damaged_mask_with_workers_does_not_hang(small_dataset, tmp_path):
    try:
        res = subprocess.run(
            [sys.executable, "-c", _HANG_SCRIPT, str(small_dataset), str(tmp_path), "12"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        res = subprocess.CompletedProcess(exc.cmd, -9, out, "")
    if "READY" not in res.stdout:
        raise RuntimeError(f"the set-up failed: {res.stdout} {res.stderr[-2000:]}")
    # rc 3: hung (watchdog).
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr[-1500:])
    assert "tiny_t1_viable.tif" in res.stdout


def test_mask_with_bad_values_stops_extraction(small_dataset, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(small_dataset / "tiny_n0.svs", data / "tiny_n0.svs")
    bad = np.zeros((2048, 2048), np.uint8)
    bad[1000:1100, 1000:1100] = 2
    write_tiff_mask(data / "tiny_n0_viable.tif", bad)
    case = list_cases(data)[0]
    assert case.viable is not None and case.whole is None
    with pytest.raises(InputError) as ei:
        extract_slide(case, 1, tmp_path / "cache", workers=1)
    msg = _one_line(ei)
    assert str(data / "tiny_n0_viable.tif") in msg and "0/1" in msg
    assert not list((tmp_path / "cache").rglob("x1_*"))
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]


def test_mask_of_wrong_size_stops_extraction_before_work(small_dataset, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(small_dataset / "tiny_n0.svs", data / "tiny_n0.svs")
    write_tiff_mask(data / "tiny_n0_whole.tif", np.zeros((1000, 2048), np.uint8))
    case = list_cases(data)[0]
    with pytest.raises(InputError) as ei:
        extract_slide(case, 4, tmp_path / "cache", workers=1)
    msg = _one_line(ei)
    assert str(data / "tiny_n0_whole.tif") in msg and "2048x1000" in msg and "2048x2048" in msg
    assert not list((tmp_path / "cache").rglob("x4_*"))


# ---------------------------------------------------------------------------------------------
# Dataset folders
# ---------------------------------------------------------------------------------------------


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no slides here")
    (tmp_path / "a_whole.tif").write_bytes(b"")  # masks alone are not slides
    with pytest.raises(InputError) as ei:
        list_cases(tmp_path)
    msg = _one_line(ei)
    assert str(tmp_path) in msg and "no slides" in msg


def test_missing_data_dir(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(InputError) as ei:
        list_cases(path)
    msg = _one_line(ei)
    assert str(path) in msg and "data_dir" in msg


def test_data_dir_is_a_file(tmp_path):
    f = tmp_path / "slides.zip"
    f.write_bytes(b"PK")
    with pytest.raises(InputError, match="slides.zip.*not a folder"):
        list_cases(f)


def test_extract_dataset_without_cases(tmp_path):
    with pytest.raises(InputError, match="no cases"):
        extract_dataset([], [4], tmp_path, progress=False)


@pytest.mark.parametrize("workers", [-1, "2", 1.5])
def test_extract_dataset_bad_workers(small_dataset, tmp_path, workers):
    cases = list_cases(small_dataset)[:1]
    with pytest.raises(InputError, match="workers"):
        extract_dataset(cases, [16], tmp_path, workers=workers, progress=False)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"patch_size": "224"}, "patch_size"),
        ({"patch_size": 224.0}, "patch_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": True}, "patch_size"),
        ({"stride": -224}, "stride"),
        ({"tissue_threshold": 2}, "tissue_threshold"),
        ({"tissue_threshold": "0.5"}, "tissue_threshold"),
        ({"glass_level": 300}, "glass_level"),
        ({"glass_level": 210.5}, "glass_level"),
        ({"tissue_subsample": 3}, "tissue_subsample"),
        ({"label_mask": "tumor"}, "label_mask"),
        ({"pos_threshold": 1.5}, "pos_threshold"),
        ({"neg_threshold": 0.5, "pos_threshold": 0.5}, "neg_threshold"),
        ({"neg_threshold": 0.6, "pos_threshold": 0.4}, "neg_threshold"),
        ({"mask_scale": "yes"}, "mask_scale"),
    ],
)
def test_extraction_params_rejected(kwargs, name, tmp_path):
    with pytest.raises(InputError) as ei:
        ExtractionParams(**kwargs).validate()
    msg = _one_line(ei)
    assert repr(name) in msg, msg
    # extract_slide validates before it opens anything or writes a cache.
    with pytest.raises(InputError, match=name):
        extract_slide(Case("x", tmp_path / "x.svs"), 4, tmp_path / "cache", ExtractionParams(**kwargs))
    assert not (tmp_path / "cache").exists()


def test_extraction_params_defaults_valid():
    p = ExtractionParams()
    assert p.validate() is p
    assert (p.patch_size, p.stride, p.label_mask) == (224, 224, "viable")


@pytest.mark.parametrize("scales", [[0], ["4"], [2.5], [], [True], "4", None, [4, -16], 0.5])
def test_check_scales_rejects(scales):
    with pytest.raises(InputError) as ei:
        check_scales(scales)
    assert "scales" in _one_line(ei)


def test_check_scales_accepts():
    assert check_scales([1, 4, 16, 64]) == [1, 4, 16, 64]
    assert check_scales([4.0]) == [4] and isinstance(check_scales([4.0])[0], int)
    assert check_scales(16) == [16]
    assert check_scales((1, 4)) == [1, 4]


def test_extract_slide_bad_scale(small_dataset, tmp_path):
    case = list_cases(small_dataset)[0]
    for bad in (0, 2.5, "4"):
        with pytest.raises(InputError, match="scales"):
            extract_slide(case, bad, tmp_path)


# ---------------------------------------------------------------------------------------------
# helpers.core.errors
# ---------------------------------------------------------------------------------------------


def test_check_helpers():
    assert check_type("n", 3, int) == 3
    with pytest.raises(InputError, match="'n' must be int, got '3' \\(str\\)"):
        check_type("n", "3", int)
    with pytest.raises(InputError, match="'flag'"):
        check_type("flag", True, int)  # a bool is not an int here
    assert check_type("flag", True, bool) is True
    assert check_type("x", 2.5, (int, float)) == 2.5
    with pytest.raises(InputError, match="a positive integer"):
        check_positive("k", 2.0, integer=True)
    with pytest.raises(InputError, match="must be positive"):
        check_positive("k", 0)
    assert check_positive("k", 0.1) == 0.1
    assert check_fraction("f", 1) == 1.0 and isinstance(check_fraction("f", 1), float)
    for bad in (-0.1, 1.01, float("nan"), "0.5", None):
        with pytest.raises(InputError, match="'f'"):
            check_fraction("f", bad)
    assert issubclass(InputError, ValueError)


def test_disk_full_during_extraction_is_one_clear_error_and_a_rerun_resumes(small_dataset, tmp_path, monkeypatch):
    import errno
    from collections import namedtuple

    import helpers.patching.patches as hp

    cases = [c for c in list_cases(small_dataset) if c.case_id in ("tiny_n0", "tiny_t1")]
    cache = tmp_path / "cache"
    real_finish = hp.finish_table

    def full_on_t1(table, case_id, *a, **k):
        if case_id == "tiny_t1":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_finish(table, case_id, *a, **k)

    monkeypatch.setattr(hp, "finish_table", full_on_t1)
    with pytest.raises(InputError) as ei:
        extract_dataset(cases, [4], cache, workers=1, progress=False)
    msg = _one_line(ei)
    assert "is full" in msg and "tiny_t1" in msg and "4x" in msg and "rerun" in msg
    # The slide before is kept whole; no cache of tiny_t1 is left half-written (its mask count
    # maps, finished before, are whole files and are reused).
    assert list((cache / "tiny_n0").glob("x4_*/meta.json"))
    assert not list(cache.glob("tiny_t1/x4_*")) and not list(cache.glob("tiny_t1/.*"))

    monkeypatch.setattr(hp, "finish_table", real_finish)
    summary, _ = extract_dataset(cases, [4], cache, workers=1, progress=False)
    assert summary.set_index("case_id").from_cache.to_dict() == {"tiny_n0": True, "tiny_t1": False}

    # Too little free space for the worst case: said before anything is written.
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(hp.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 1000, 1000))
    with pytest.warns(UserWarning, match=r"may take up to .* GB .* 0\.0 GB free"):
        extract_dataset(cases, [1], tmp_path / "cache2", workers=1, progress=False)
