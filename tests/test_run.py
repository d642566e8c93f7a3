"""The papermill runner: parameter checks, run-folder safety, and a failing notebook named."""

import json
import os
import textwrap

import nbformat
import pytest

from helpers import run as runner
from helpers.core.errors import InputError


def test_notebooks_are_numbered_in_order():
    names = [p.name for p in runner.notebooks()]
    assert names[:2] == ["01_slide_exploration.ipynb", "02_patch_extraction.ipynb"]
    assert names == sorted(names)


def test_every_notebook_has_a_parseable_parameters_cell():
    for p in runner.notebooks():
        params = runner.notebook_parameters(p)
        assert "run_name" in params and "seed" in params, p.name
        assert None not in params.values(), f"{p.name}: a parameter default did not parse: {params}"


def test_profiles_only_name_declared_parameters():
    nbs = runner.notebooks()
    for prof in ("demo", "paper"):
        p = runner.load_profile(prof)
        if prof == "paper":
            with pytest.raises(InputError, match="data_dir"):
                runner.resolve_parameters(p, {}, nbs)
            merged, per = runner.resolve_parameters(p, {"data_dir": "/somewhere"}, nbs, check_files=False)
            with pytest.raises(InputError, match="'data_dir': /somewhere is no such folder"):
                runner.resolve_parameters(p, {"data_dir": "/somewhere"}, nbs)
        else:
            merged, per = runner.resolve_parameters(p, {}, nbs)
        assert merged["patch_size"] == {"demo": 24, "paper": 224}[prof]


def test_unknown_parameter_and_wrong_type_are_refused():
    nbs = runner.notebooks()
    prof = runner.load_profile("demo")
    with pytest.raises(InputError, match="unknown parameter 'tisue_threshold'"):
        runner.resolve_parameters(prof, {"tisue_threshold": 0.3}, nbs)
    with pytest.raises(InputError, match="tissue_threshold"):
        runner.resolve_parameters(prof, {"tissue_threshold": "high"}, nbs)
    with pytest.raises(InputError, match="unknown profile"):
        runner.load_profile("nope")


def test_cli_exit_codes(capsys):
    assert runner.main(["-p", "bogus", "1"]) == 2
    assert "unknown parameter 'bogus'" in capsys.readouterr().err
    assert runner.main(["--list"]) == 0
    assert "02_patch_extraction.ipynb" in capsys.readouterr().out


def test_run_folder_refuses_to_mix(tmp_path):
    done = {"02_x.ipynb": {"parameters": {"seed": 1, "workers": 2}}}
    (tmp_path / "params.json").write_text(json.dumps({"finished_notebooks": done}))
    runner.check_run_folder(tmp_path, {"02_x.ipynb": {"seed": 1, "workers": 1}})  # workers may differ
    with pytest.raises(InputError, match="seed"):
        runner.check_run_folder(tmp_path, {"02_x.ipynb": {"seed": 2, "workers": 2}})
    runner.check_run_folder(tmp_path, {"02_x.ipynb": {"seed": 2}}, overwrite=True)
    # A notebook that never finished in this folder constrains nothing.
    runner.check_run_folder(tmp_path, {"03_y.ipynb": {"seed": 2}})


def _fake_series(tmp_path, monkeypatch, body):
    """A one-notebook series whose second cell runs ``body`` (parameters: run_name, seed, mode)."""
    from helpers.core.params import SPECS, Spec

    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    cells = [
        nbformat.v4.new_markdown_cell("# 01 - t"),
        nbformat.v4.new_code_cell("run_name = 'demo'\nseed = 1\nmode = 'fine'"),
        nbformat.v4.new_code_cell(textwrap.dedent(body)),
    ]
    cells[1].metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nbdir / "01_t.ipynb")
    profdir = tmp_path / "profiles"
    profdir.mkdir()
    (profdir / "demo.yaml").write_text("parameters: {seed: 1}\n")
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", nbdir)
    monkeypatch.setattr(runner, "PROFILE_DIR", profdir)
    monkeypatch.setitem(SPECS, "mode", Spec("str", choices=("fine", "boom", "oom")))
    monkeypatch.setenv("PAIP_REPRO_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def test_failing_notebook_is_named_and_the_good_one_kept(tmp_path, monkeypatch, capsys):
    runs = _fake_series(
        tmp_path,
        monkeypatch,
        """
        if mode == "boom":
            raise ValueError("the cell that fails")
        print('fine')""",
    )
    assert runner.main(["--no-progress", "--run-name", "r"]) == 0
    rec = json.loads((runs / "r" / "params.json").read_text())
    assert rec["parameters"]["seed"] == 1 and "finished" in rec
    assert rec["finished_notebooks"]["01_t.ipynb"]["parameters"]["mode"] == "fine"
    good = (runs / "r" / "notebooks" / "01_t.ipynb").read_text()
    # A failing rerun with --overwrite: named with its cell, the good executed notebook kept.
    assert runner.main(["--no-progress", "--run-name", "r", "--overwrite", "-p", "mode", "boom"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: 01_t.ipynb, cell 3" in err and "the cell that fails" in err and "01_t.failed.ipynb" in err
    assert (runs / "r" / "notebooks" / "01_t.ipynb").read_text() == good
    assert (runs / "r" / "notebooks" / "01_t.failed.ipynb").exists()
    # A refused value never reaches params.json; the failed run did not mark 01 as finished.
    assert runner.main(["--no-progress", "--run-name", "r", "-p", "mode", "nonsense"]) == 2
    assert "must be one of" in capsys.readouterr().err
    rec = json.loads((runs / "r" / "params.json").read_text())
    assert "01_t.ipynb" not in rec["finished_notebooks"]
    # So the corrected rerun is compared with nothing stale and runs.
    assert runner.main(["--no-progress", "--run-name", "r"]) == 0
    assert not (runs / "r" / "notebooks" / "01_t.failed.ipynb").exists()


def test_a_broken_figure_is_one_line_on_users_data_and_fails_with_strict_figures(tmp_path, monkeypatch, capsys):
    from helpers.notebook.figures import STRICT_FIGURES_ENV

    runs = _fake_series(
        tmp_path,
        monkeypatch,
        """
        from helpers.notebook.figures import figure_guard
        with figure_guard("thumbnails"):
            raise ValueError("no slide to show")
        print("after the figure")""",
    )
    monkeypatch.setenv(STRICT_FIGURES_ENV, "0")  # a user's own run (this test itself runs under pytest)
    assert runner.main(["--no-progress", "--run-name", "r"]) == 0
    out = (runs / "r" / "notebooks" / "01_t.ipynb").read_text()
    assert "figure 'thumbnails' skipped: ValueError: no slide to show" in out and "after the figure" in out
    assert runner.main(["--no-progress", "--run-name", "s", "--strict-figures"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: 01_t.ipynb, cell 3" in err and "no slide to show" in err
    assert os.environ[STRICT_FIGURES_ENV] == "1"  # the flag reached the kernels through the environment


def test_a_killed_kernel_is_one_line_with_the_cell_and_the_cause(tmp_path, monkeypatch, capsys):
    runs = _fake_series(
        tmp_path,
        monkeypatch,
        """
        import os, signal
        from helpers.core.paths import run_dir
        (run_dir(run_name) / ".half.npy.tmp").write_bytes(b"x")   # what a killed writer leaves
        if mode == "oom":
            os.kill(os.getpid(), signal.SIGKILL)""",
    )
    import time

    t0 = time.monotonic()
    assert runner.main(["--no-progress", "--run-name", "k", "-p", "mode", "oom"]) == 1
    assert time.monotonic() - t0 < 60
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "FAILED: 01_t.ipynb, cell 3" in err and "killed by SIGKILL" in err and "out-of-memory" in err
    assert not list((runs / "k").glob(".*tmp*"))


def test_a_sweep_entry_never_writes_into_its_base_run(tmp_path):
    base, entry = tmp_path / "base", tmp_path / "entry"
    for f in ("extraction.json", "split.csv", "patch_counts.csv"):
        (base / f).parent.mkdir(parents=True, exist_ok=True)
        (base / f).write_text("x")
    (base / "segmentation").mkdir()
    (base / "classification" / "efficientnet_b0_x4").mkdir(parents=True)
    (base / "patches" / "s1" / "x4_aaa").mkdir(parents=True)
    (base / "patches" / "s1" / "x4_aaa" / "meta.json").write_text("{}")
    (base / "patches" / "s1" / "viable_counts.npy").write_text("x")
    entry.mkdir()
    nbs = [p for p in runner.notebooks() if p.name[:2] in ("04", "05")]
    runner.link_inputs(base, entry, nbs)
    assert (entry / "segmentation").is_symlink() and (entry / "split.csv").is_symlink()
    assert not (entry / "classification").exists(), "notebook 04's own output must not be linked"
    assert (entry / "patches" / "s1").is_dir() and not (entry / "patches" / "s1").is_symlink()
    assert (entry / "patches" / "s1" / "x4_aaa").is_symlink()
    # What the entry computes lands in its own folders.
    (entry / "classification" / "efficientnet_b0_x1").mkdir(parents=True)
    (entry / "patches" / "s1" / "x1_bbb").mkdir()
    assert sorted(p.name for p in (base / "classification").iterdir()) == ["efficientnet_b0_x4"]
    assert sorted(p.name for p in (base / "patches" / "s1").iterdir()) == ["viable_counts.npy", "x4_aaa"]
    # A base run without notebook 03's outputs cannot serve an entry that starts at 04.
    (base / "segmentation").rmdir()
    with pytest.raises(InputError, match="base_run 'base' lacks \\['segmentation'\\]"):
        runner.link_inputs(base, tmp_path / "entry2", nbs)


def test_a_rerun_after_a_killed_runner_removes_what_its_kernel_left(tmp_path, monkeypatch):
    """A runner killed by SIGKILL cleans nothing up; the kernel it took with it may have been half
    way through a figure. The rerun removes those temporaries before it starts (the fault-injection
    script found one left in figures/ after a rerun that had otherwise finished)."""
    runs = _fake_series(tmp_path, monkeypatch, "print('fine')")
    stale = runs / "r" / "figures" / ".02_kept_and_labels.png.ab12cd.tmp.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a png")
    assert runner.main(["--no-progress", "--run-name", "r"]) == 0
    assert not stale.exists()
    assert not [p for p in (runs / "r").rglob("*") if ".tmp" in p.name or p.name.endswith(".running.ipynb")]
