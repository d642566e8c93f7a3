"""Build a notebook from a percent-format script (``# %%`` code cells, ``# %% [markdown]``).

A cell header may carry tags: ``# %% tags=["parameters"]``. Markdown cells are written as
comment lines (``# `` is stripped). Used to author the numbered notebooks; the notebooks are
the source of truth once built.

Usage: python tools/py2nb.py SCRIPT.py NOTEBOOK.ipynb
"""

import json
import re
import sys

import nbformat


def convert(text):
    cells = []
    kind, tags, lines = None, [], []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in body.split("\n"))
            cell = nbformat.v4.new_markdown_cell(body)
        else:
            cell = nbformat.v4.new_code_cell(body)
        if tags:
            cell.metadata["tags"] = tags
        cells.append(cell)

    for line in text.split("\n"):
        m = re.match(r"^# %%(.*)$", line)
        if m:
            flush()
            rest = m.group(1)
            kind = "markdown" if "[markdown]" in rest else "code"
            t = re.search(r"tags=(\[.*?\])", rest)
            tags = json.loads(t.group(1)) if t else []
            lines = []
        else:
            lines.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    with open(src) as f:
        nbformat.write(convert(f.read()), dst)
