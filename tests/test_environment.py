"""The set-up files agree: environment.yml and pyproject.toml name the same dependencies."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req):
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    assert set(py) == set(conda), (
        f"only in pyproject: {set(py) - set(conda)}; only in environment.yml: {set(conda) - set(py)}"
    )
    # The pins must agree too, not only the names.
    assert {k: py[k] for k in py} == {k: conda[k] for k in py}
    assert any(r.startswith("-e") for r in pip), "environment.yml must install the project itself"


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_torch_pins_are_the_ones_on_disk():
    mk = (ROOT / "Makefile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in mk


def _recipe(makefile, target):
    """``(prerequisites, recipe lines)`` of a Makefile rule."""
    m = re.search(rf"^{re.escape(target)}:([^\n]*)\n((?:\t[^\n]*\n)*)", makefile, re.M)
    assert m, f"the Makefile has no rule {target!r}"
    return m.group(1).split(), m.group(2)


def test_the_two_lanes_and_make_lab():
    """make test (CI) is everything, the lab extra included; make test-fast leaves the slow tests out;
    make lab installs the pinned extra and starts tools/lab.py."""
    mk = (ROOT / "Makefile").read_text()
    pre, body = _recipe(mk, "test")
    assert "$(LAB_STAMP)" in pre, "make test must install the lab extra, or CI skips tests/test_lab.py"
    assert "pytest tests -q\n" in body and "--nbval-lax" in body and "not slow" not in body
    pre, body = _recipe(mk, "test-fast")
    assert '-m "not slow"' in body and "ruff check" in body and "nbval" not in body
    pre, body = _recipe(mk, "$(LAB_STAMP)")
    assert '-e ".[lab]"' in body
    pre, body = _recipe(mk, "lab")
    assert "$(LAB_STAMP)" in pre and "tools/lab.py" in body
    lab = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["lab"]
    assert lab and all(re.fullmatch(r"[\w-]+==[\w.]+", r) for r in lab), f"pin the lab extra exactly: {lab}"
    pytest_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("slow:") for m in pytest_cfg["markers"]) and "--strict-markers" in pytest_cfg["addopts"]
