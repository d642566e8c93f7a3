"""helpers.notebook.figures.figure_guard: one line on a user's data, the error itself under tests and CI."""

import os
from pathlib import Path

import matplotlib
import pytest

from helpers.core.errors import DiskFullError
from helpers.notebook.figures import STRICT_FIGURES_ENV, figure_guard, strict_figures

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "env,strict",
    [
        ({}, False),  # a user's own run: one line, the run goes on
        ({"CI": "true"}, True),
        ({"CI": "1"}, True),
        ({"CI": "false"}, False),
        ({"CI": ""}, False),
        ({"PYTEST_CURRENT_TEST": "tests/x.py::t (call)"}, True),
        ({STRICT_FIGURES_ENV: "1"}, True),
        ({STRICT_FIGURES_ENV: "true"}, True),
        ({STRICT_FIGURES_ENV: "0", "CI": "true", "PYTEST_CURRENT_TEST": "t"}, False),  # the variable wins
        ({STRICT_FIGURES_ENV: "no"}, False),
    ],
)
def test_strict_figures_reads_the_environment(env, strict):
    assert strict_figures(env) is strict


def test_a_mistyped_strict_value_is_refused_by_name():
    with pytest.raises(ValueError, match=f"{STRICT_FIGURES_ENV}='maybe'"):
        strict_figures({STRICT_FIGURES_ENV: "maybe"})


def test_lenient_guard_prints_one_line_and_closes_the_figure(capsys):
    import matplotlib.pyplot as plt

    with figure_guard("thumbnails", strict=False):
        plt.figure()
        raise ValueError("no slide to show")
    err = capsys.readouterr().err
    assert err == "figure 'thumbnails' skipped: ValueError: no slide to show\n"
    assert plt.get_fignums() == []  # a half-drawn figure is not shown by the next cell


def test_strict_guard_reraises_the_error_itself(capsys):
    with pytest.raises(KeyError, match="'scale'"), figure_guard("figure1_scales", strict=True):
        raise KeyError("scale")
    assert "figure 'figure1_scales' failed" in capsys.readouterr().err


def test_the_guard_is_strict_under_pytest_by_default(monkeypatch):
    """pytest sets PYTEST_CURRENT_TEST: a figure broken by a change fails the test run."""
    monkeypatch.delenv(STRICT_FIGURES_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert os.environ.get("PYTEST_CURRENT_TEST")
    with pytest.raises(ZeroDivisionError), figure_guard("heatmaps"):
        1 / 0  # noqa: B018
    monkeypatch.setenv(STRICT_FIGURES_ENV, "0")
    with figure_guard("heatmaps"):
        1 / 0  # noqa: B018


def test_a_full_disk_or_an_interrupt_always_stops_the_run():
    for exc in (DiskFullError("the disk is full"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), figure_guard("x", strict=False):
            raise exc


def test_a_notebook_kernel_started_under_pytest_reraises(monkeypatch):
    """nbval and papermill start the kernel as a subprocess: it must see the same signal. The
    kernel inherits this process's environment (PYTEST_CURRENT_TEST, and the Makefile's
    PAIP_REPRO_STRICT_FIGURES=1 on nbval's line), so a broken figure cell fails there too."""
    from jupyter_client.manager import start_new_kernel

    monkeypatch.delenv(STRICT_FIGURES_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(REPO), startup_timeout=60)
    try:
        code = 'from helpers.notebook.figures import figure_guard\nwith figure_guard("thumbnails"):\n    1 / 0\n'
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
        assert reply["content"]["status"] == "error", reply["content"]
        assert reply["content"]["ename"] == "ZeroDivisionError"
        reply = kc.execute_interactive(
            f'import os\nos.environ["{STRICT_FIGURES_ENV}"] = "0"\n' + code, timeout=60, output_hook=lambda msg: None
        )
        assert reply["content"]["status"] == "ok", reply["content"]  # a user's run: one line, no error
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
