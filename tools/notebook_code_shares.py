"""Count the code lines of each notebook and sort them by what they do (issue 13's table).

A code line is a non-blank line that is not only a comment. Each code cell gets one category
(listed below by hand, cell by cell, in notebook order):

- ``S`` set-up, plumbing or CI: the parameters cell, the set-up cell, loading and saving, cells
  that only exist for nbval or bookkeeping;
- ``P`` the paper: its data, methods, equations, training, metrics and results;
- ``F`` figures (``figure_guard`` cells that only draw).

Usage: ``python tools/notebook_code_shares.py`` (prints a markdown table). When a notebook's
code cells change in number, the script refuses until the categories below are updated.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = {
    "01": "SSPPPFPFPF",
    "02": "SSPPFPPFPPFFP",
    "03": "SSPPPPPFPFPPPF",
    "04": "SSPFPPPFPPPF",
    "05": "SSSPPPPPFPPSPS",
}


def code_lines(cell):
    return [ln for ln in "".join(cell["source"]).splitlines() if ln.strip() and not ln.strip().startswith("#")]


def main():
    print("| notebook | code lines | setup cell lines | set-up, plumbing, CI | the paper | figures |")
    print("| --- | --- | --- | --- | --- | --- |")
    for num, cats in CATEGORIES.items():
        path = next((REPO / "notebooks").glob(f"{num}_*.ipynb"))
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        if len(cells) != len(cats):
            sys.exit(f"{path.name}: {len(cells)} code cells, {len(cats)} categories: update CATEGORIES")
        n = {k: 0 for k in "SPF"}
        for cell, cat in zip(cells, cats):
            n[cat] += len(code_lines(cell))
        total = sum(n.values())
        share = {k: f"{100 * v / total:.0f} %" for k, v in n.items()}
        print(f"| {num} | {total} | {len(code_lines(cells[1]))} | {share['S']} | {share['P']} | {share['F']} |")


if __name__ == "__main__":
    main()
