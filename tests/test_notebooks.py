"""The committed notebooks: what a reader on GitHub and nbval rely on.

Every figure is visible (a cell that draws carries an image), the parameters cell holds the demo
profile's values (nbval runs the notebooks as committed, ``make demo`` with the profile: both
must be the same run), every parameter is checked by ``helpers.core.params``, set-up cells stay short,
and no output holds a machine-specific path.
"""

import json
from pathlib import Path

import pytest

from helpers import run as runner
from helpers.core.params import SPECS

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
DRAWS = ("save_fig(", "plt.subplots(", "plt.figure(", ".imshow(", "plt.show(")


def _cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_cell_that_draws_shows_its_figure(path):
    for i, c in enumerate(_cells(path)):
        src = "".join(c["source"])
        body = "\n".join(ln for ln in src.splitlines() if not ln.lstrip().startswith(("import ", "from ", "#", "def ")))
        if any(k in body for k in DRAWS):
            outs = c.get("outputs", [])
            # A figure that a parameter turns off says so on stdout ("... is off"); anything else
            # (a figure_guard note on stderr, nothing at all) is a figure that broke.
            off = any(o.get("name") == "stdout" and " is off" in "".join(o.get("text", [])) for o in outs)
            assert off or any("image/png" in o.get("data", {}) for o in outs), (
                f"{path.name}: code cell {i} draws but its committed output has no image"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_outputs_are_machine_independent_and_short(path):
    for i, c in enumerate(_cells(path)):
        outs = json.dumps(c.get("outputs", []))
        assert "ipykernel_" not in outs and "/tmp/" not in outs, f"{path.name}: cell {i} shows a temp path"
        assert "Traceback" not in outs and '"output_type": "error"' not in outs, f"{path.name}: cell {i} failed"
        lines = sum(len("".join(o.get("text", "")).splitlines()) for o in c.get("outputs", []))
        assert lines <= 60, f"{path.name}: cell {i} prints {lines} lines"
        if c.get("outputs"):
            assert c.get("execution_count") is not None, f"{path.name}: cell {i} has outputs but no count"


def test_the_committed_notebooks_stay_readable_on_github():
    total = sum(p.stat().st_size for p in NOTEBOOKS)
    assert total < 8e6, f"the notebooks weigh {total / 1e6:.1f} MB; keep figures small"


def test_notebook_defaults_are_the_demo_profile():
    prof = runner.load_profile("demo")["parameters"]
    for path in NOTEBOOKS:
        for k, v in runner.notebook_parameters(path).items():
            if k in prof:
                assert v == prof[k], f"{path.name}: {k} = {v!r} but the demo profile says {prof[k]!r}"


def test_every_parameter_is_checked_and_the_set_up_cell_is_short():
    for path in NOTEBOOKS:
        params = runner.notebook_parameters(path)
        assert set(params) <= set(SPECS), f"{path.name}: {sorted(set(params) - set(SPECS))} not in helpers.core.params"
        cells = _cells(path)
        assert "parameters" in cells[0]["metadata"].get("tags", [])
        setup = "".join(cells[1]["source"])
        assert "check_parameters(globals())" in setup, f"{path.name}: the set-up cell must check the parameters"
        assert len(setup.splitlines()) <= 20, f"{path.name}: the set-up cell has {len(setup.splitlines())} lines"
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_papermill_reads_every_parameter_line():
    """papermill skips a parameter line it cannot parse (an '=' in a comment, say) with a mere
    log message: the runner would then refuse the parameter as unknown."""
    for path in NOTEBOOKS:
        src = "".join(_cells(path)[0]["source"])
        names = {ln.split("=")[0].strip() for ln in src.splitlines() if "=" in ln and not ln.startswith("#")}
        assert names == set(runner.notebook_parameters(path)), path.name
