"""The README, bench/README.md and the notebooks name only files and functions that exist.

Every repository path they cite (in backticks, in a code block or as a link: ``helpers/x.py``,
``notebooks/...``, ``bench/...``, ``tools/...``, ``sweeps/...``, ``profiles/...``, ...) must be
in the repository, and every ``helpers.<module>[.<name>]`` must import and be defined where it
is cited (not merely imported there: ``helpers.patching.patches.to_gray`` lives in ``helpers.wsi.tissue``).
Generated paths (``runs/``, ``data/``, ``bench/results/``, ``bench/cache/``) and templates
(``<run_name>``, ``*``) are not checked.
"""

import importlib
import inspect
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "bench/README.md"]
ROOTS = ("helpers", "notebooks", "bench", "tools", "sweeps", "profiles", "figures", "tests", ".ci")
TOP_FILES = ("Makefile", "pyproject.toml", "environment.yml", "README.md")
GENERATED = ("bench/results/", "bench/cache/")
OUTSIDE = ("", "~", ".venv", "runs", "data")  # absolute paths, the environment, a run's outputs, data


def _spans(text):
    """Inline code spans, fenced code blocks and relative link targets of a markdown text."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    inline = re.findall(r"`([^`\n]+)`", rest)
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", rest) if not re.match(r"[a-z]+:", t)]
    return fenced + inline, links


def _tokens(span):
    for tok in re.split(r"[\s,;()\[\]'\"=]+", span):
        tok = tok.rstrip(".:")
        if tok:
            yield tok


def cited_paths(doc, text=None):
    """``(paths, bare)``: the repository paths ``doc`` (or ``text``) cites (``bench/x.py``,
    links), and the bare file names (``gpu_check.py``) it cites."""
    text = (REPO / doc).read_text() if text is None else text
    spans, links = _spans(text)
    paths, bare = set(links), set()
    for span in spans:
        for tok in _tokens(span):
            if any(c in tok for c in "<>*{}$"):
                continue  # a template, not a file
            head, is_file = tok.split("/")[0], re.search(r"\.(py|ipynb|yaml|yml|md|toml|png)$", tok)
            if "/" in tok and (head in ROOTS or (is_file and head not in OUTSIDE)) or tok in TOP_FILES:
                paths.add(tok)
            elif "/" not in tok and is_file:
                bare.add(tok)
    return sorted(p for p in paths if not p.startswith(GENERATED)), sorted(bare)


def bare_name_exists(doc, name):
    """A bare name in a document beside the code (bench/README.md) is a file beside it. The
    top README names its own outputs bare (``spread.md``, ``out.ipynb``): there only a ``.py``
    name is a file, somewhere in the repository's folders (``refresh_committed.py``)."""
    base = (REPO / doc).parent
    if base != REPO:
        return (base / name).exists()
    return not name.endswith(".py") or any(next((REPO / r).rglob(name), None) for r in ROOTS)


def cited_names(doc):
    """Every dotted ``helpers.<module>[.<name>...]`` that ``doc`` cites (a notebook: in its cells'
    text, prose and code alike)."""
    path = REPO / doc
    if path.suffix == ".ipynb":
        text = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])
    else:
        text = path.read_text()
    return sorted(set(re.findall(r"\bhelpers(?:\.[A-Za-z_]\w*)+", text)))


def resolve(dotted):
    """Import the longest module prefix of ``dotted``, then look the rest up in it; return an
    error message, or ``None`` when the name exists and is defined in the module that is cited."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        modname = ".".join(parts[:i])
        try:
            obj = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and modname.startswith(exc.name) and exc.name.startswith("helpers"):
                continue  # this prefix is not a module: try a shorter one
            raise
        owner = obj
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return f"{dotted}: {type(obj).__name__} {'.'.join(parts[:i])} has no {attr!r}"
            owner, obj = obj, getattr(obj, attr)
        if i < len(parts) and inspect.ismodule(owner):
            home = getattr(obj, "__module__", None)
            exported = parts[-1] in getattr(owner, "__all__", ())
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and home != owner.__name__ and not exported:
                return f"{dotted}: defined in {home}, only imported into {owner.__name__}: cite {home}.{parts[-1]}"
        return None
    return f"{dotted}: no such module"


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_path_exists(doc):
    paths, bare = cited_paths(doc)
    assert any(p.startswith(("bench/", "notebooks/")) for p in paths), f"{doc}: the parser found no path"
    missing = [p for p in paths if not (REPO / p).exists()] + [b for b in bare if not bare_name_exists(doc, b)]
    assert not missing, f"{doc} cites files that are not in the repository: {missing}"


NOTEBOOKS = sorted(str(p.relative_to(REPO)) for p in (REPO / "notebooks").glob("*.ipynb"))


def notebook_prose(doc):
    """The markdown cells of notebook ``doc``, as one markdown text."""
    cells = json.loads((REPO / doc).read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


@pytest.mark.parametrize("doc", NOTEBOOKS)
def test_every_path_a_notebook_cites_exists(doc):
    paths, _ = cited_paths(doc, notebook_prose(doc))
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"{doc} cites files that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", DOCS + NOTEBOOKS)
def test_every_cited_helpers_name_exists_where_it_is_cited(doc):
    names = cited_names(doc)
    assert names, f"{doc}: the parser found no helpers name"
    errors = [e for e in map(resolve, names) if e]
    assert not errors, f"{doc}: " + "; ".join(errors)


def test_the_checks_catch_a_stale_reference():
    """The parser and the resolver see what a stale document would get wrong."""
    text = (
        "see `helpers/nothing.py`, `shared/x.py`, `no_tool.py`, `runs/<run>/a.md` and [nb](notebooks/99_x.ipynb)\n"
        "```bash\nmake sweeps/no.yaml\n.venv/bin/python x\n```\n"
    )
    paths, bare = cited_paths("README.md", text)
    assert paths == ["helpers/nothing.py", "notebooks/99_x.ipynb", "shared/x.py", "sweeps/no.yaml"]
    assert bare == ["no_tool.py"]
    assert not bare_name_exists("README.md", "no_tool.py") and bare_name_exists("README.md", "py2nb.py")
    assert not bare_name_exists("bench/README.md", "py2nb.py")  # beside bench/README.md: bench/py2nb.py
    assert "only imported into helpers.patching.patches: cite helpers.wsi.tissue.to_gray" in resolve(
        "helpers.patching.patches.to_gray"
    )
    assert "has no 'no_such_name'" in resolve("helpers.wsi.tissue.no_such_name")
    assert resolve("helpers.no_such_module") == "helpers.no_such_module: module helpers has no 'no_such_module'"
    assert resolve("helpers.wsi.tissue.to_gray") is None and resolve("helpers.paper.jobs") is None
