"""Progress bars on stderr, off when ``TQDM_DISABLE`` is set (CI, nbval, committed outputs).

A plain text bar (not the widget one): notebooks run under papermill and nbval have no widgets.
Used by ``synthetic``, ``patches`` and the runner.
"""

import os
import sys


def progress_bar(total, desc, unit="it", enabled=True):
    """A tqdm bar writing to stderr, or a silent one when disabled by argument or environment."""
    from tqdm import tqdm

    env_off = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false", "no")
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=(not enabled) or env_off,
        mininterval=2.0,
        file=sys.stderr,
        dynamic_ncols=True,
    )
