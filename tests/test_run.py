"""The papermill runner: parameter checks, run-folder safety, and a failing notebook named."""

import json
import sys
import textwrap

import nbformat
import pytest

from helpers import run as runner
from helpers.errors import InputError


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
            merged, per = runner.resolve_parameters(p, {"data_dir": "/somewhere"}, nbs)
        else:
            merged, per = runner.resolve_parameters(p, {}, nbs)
        assert merged["patch_size"] == 224


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
    (tmp_path / "params.json").write_text(json.dumps({"parameters": {"seed": 1, "workers": 2}}))
    runner.check_run_folder(tmp_path, {"seed": 1, "workers": 1})  # workers may differ
    with pytest.raises(InputError, match="seed"):
        runner.check_run_folder(tmp_path, {"seed": 2, "workers": 2})
    runner.check_run_folder(tmp_path, {"seed": 2}, overwrite=True)


def test_failing_notebook_is_named_with_its_cell(tmp_path, monkeypatch, capsys):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    cells = [nbformat.v4.new_markdown_cell("# 01 - t"),
             nbformat.v4.new_code_cell("run_name = 'demo'\nseed = 1\nboom = False"),
             nbformat.v4.new_code_cell(textwrap.dedent("""
                 if boom:
                     raise ValueError("the cell that fails")
                 print('fine')"""))]
    cells[1].metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nbdir / "01_t.ipynb")
    profdir = tmp_path / "profiles"
    profdir.mkdir()
    (profdir / "demo.yaml").write_text("parameters: {seed: 1}\n")
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", nbdir)
    monkeypatch.setattr(runner, "PROFILE_DIR", profdir)
    monkeypatch.setenv("PAIP_REPRO_RUNS", str(tmp_path / "runs"))
    assert runner.main(["--no-progress", "--run-name", "ok"]) == 0
    rec = json.loads((tmp_path / "runs" / "ok" / "params.json").read_text())
    assert rec["parameters"]["seed"] == 1 and "finished" in rec
    assert runner.main(["--no-progress", "--run-name", "bad", "-p", "boom", "true"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: 01_t.ipynb, cell 3" in err and "the cell that fails" in err
