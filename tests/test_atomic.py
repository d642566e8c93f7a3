"""helpers.core.atomic, and atomic patch caches: an interrupted run leaves nothing half-written."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import helpers.patching.patches as hp
from helpers.core.atomic import atomic_dir, atomic_path, remove_stale_temporaries, write_json
from helpers.patching.caches import ExtractionParams, load_patch_set
from helpers.patching.patches import extract_slide
from helpers.wsi.dataset import list_cases


def _tmp_leftovers(root):
    return sorted(str(p) for p in Path(root).rglob("*") if ".tmp" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------------------------------------
# helpers.core.atomic
# ---------------------------------------------------------------------------------------------


def test_atomic_path_success_and_failure(tmp_path):
    dest = tmp_path / "sub" / "out.txt"
    with atomic_path(dest, suffix=".txt") as tmp:
        assert tmp.parent == dest.parent and tmp.name.endswith(".tmp.txt") and tmp.name.startswith(".out.txt.")
        tmp.write_text("new")
        assert not dest.exists()  # nothing visible before the end
    assert dest.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert dest.read_text() == "new"  # the old content survives
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.txt"]


def test_atomic_path_keyboard_interrupt(tmp_path):
    dest = tmp_path / "x.bin"
    with pytest.raises(KeyboardInterrupt), atomic_path(dest) as tmp:
        tmp.write_bytes(b"123")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_whole_folder(tmp_path):
    dest = tmp_path / "cache"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    assert sorted(p.name for p in dest.iterdir()) == ["a", "b"]
    with atomic_dir(dest) as tmp:
        (tmp / "c").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["c"]  # not a merge
    with pytest.raises(ValueError), atomic_dir(dest) as tmp:
        (tmp / "d").write_text("3")
        raise ValueError("boom")
    assert sorted(p.name for p in dest.iterdir()) == ["c"]
    assert _tmp_leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_write_json(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": Path("/x")})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": "/x", "b": 1}
    assert (tmp_path / "m.json").read_text().startswith('{\n  "a"')


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".x1_abc.123.tmp").mkdir()
    (tmp_path / ".x1_abc.123.tmp" / "patches.u8").write_bytes(b"0")
    (tmp_path / ".labels.csv.xyz.tmp.csv").write_text("half")
    (tmp_path / "keep.tmp").write_text("not hidden: kept")
    (tmp_path / "x1_done").mkdir()
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "x1_done"]
    assert remove_stale_temporaries(tmp_path / "missing") == 0


# ---------------------------------------------------------------------------------------------
# Interrupted patch extraction
# ---------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


@pytest.fixture
def t1(small_dataset):
    return [c for c in list_cases(small_dataset) if c.case_id == "tiny_t1"][0]


@pytest.mark.parametrize("exc", [Interrupted, KeyboardInterrupt])
def test_interrupted_extraction_leaves_no_cache(t1, tmp_path, monkeypatch, exc):
    root = tmp_path / "cache"
    real = hp._extract_rows_job
    calls = []

    def flaky(args):
        calls.append(args[2])
        if len(calls) == 2:  # after the first row has been written
            raise exc("simulated interruption")
        return real(args)

    monkeypatch.setattr(hp, "_extract_rows_job", flaky)
    monkeypatch.setattr(hp, "ROWS_PER_TASK_MAX", 1)  # one grid row per task
    with pytest.raises(exc):
        extract_slide(t1, 1, root, workers=1)
    assert calls == [0, 1]
    assert not list(root.rglob("x1_*")) and not list(root.rglob("meta.json"))
    assert _tmp_leftovers(root) == []
    # A rerun succeeds and is complete; a third call loads it.
    monkeypatch.setattr(hp, "_extract_rows_job", real)
    ps, cached = extract_slide(t1, 1, root, workers=1)
    assert not cached and len(ps.table) == 11 * 13
    assert ps.meta["n_kept"] == ps.patches.shape[0] > 0
    assert ps.table["row"].max() == 10
    ps2, cached2 = extract_slide(t1, 1, root, workers=1)
    assert cached2 and ps2.folder == ps.folder
    assert _tmp_leftovers(root) == []


def test_interruption_while_finishing_the_table(t1, tmp_path, monkeypatch):
    """All rows written, then a failure before meta.json: still no cache folder."""
    root = tmp_path / "cache"

    def broken(*a, **k):
        raise Interrupted("disk full")

    monkeypatch.setattr(hp, "finish_table", broken)
    with pytest.raises(Interrupted):
        extract_slide(t1, 4, root, workers=1)
    assert not list(root.rglob("x4_*"))
    assert not list(root.rglob("meta.json"))
    assert _tmp_leftovers(root) == []


def test_stale_temporaries_of_a_killed_run_are_removed(t1, tmp_path):
    """A run killed hard (no clean-up) leaves .x*.tmp folders; the next run removes them."""
    root = tmp_path / "cache"
    stale = root / "tiny_t1" / ".x4_0123456789ab.k1ll3d.tmp"
    stale.mkdir(parents=True)
    (stale / "patches.u8").write_bytes(b"\0" * 100)
    ps, cached = extract_slide(t1, 4, root, ExtractionParams(), workers=1)
    assert not cached and not stale.exists()
    assert _tmp_leftovers(root) == []
    # A folder without meta.json is not a cache.
    from helpers.core.errors import InputError

    with pytest.raises(InputError, match="meta.json"):
        load_patch_set(stale.parent)


def test_a_cache_folder_without_meta_is_rebuilt(t1, tmp_path):
    root = tmp_path / "cache"
    ps, _ = extract_slide(t1, 4, root, workers=1)
    patches = np.asarray(ps.patches).copy()
    (ps.folder / "meta.json").unlink()  # e.g. removed by hand
    ps2, cached = extract_slide(t1, 4, root, workers=1)
    assert not cached and ps2.folder == ps.folder
    assert np.array_equal(np.asarray(ps2.patches), patches)
    assert _tmp_leftovers(root) == []
