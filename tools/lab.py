"""Start JupyterLab on ``notebooks/`` with this environment as the notebooks' kernel (``make lab``).

The notebooks ask for the kernel ``python3``. Jupyter resolves that name to this environment's
kernel spec (``<sys.prefix>/share/jupyter/kernels/python3``, installed with ipykernel, which runs
the server's own python) only if no other ``python3`` spec comes first: a user-wide one (e.g.
``~/.local/share/jupyter/kernels/python3``) may run another interpreter without this project's
packages. ``JUPYTER_PATH`` is searched before every other place, so this script puts this
environment's folder there (and writes the spec there if the environment lacks it).

Usage: ``python tools/lab.py [JupyterLab options]``, e.g. ``--no-browser --port 8890``.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ensure_kernel_spec():
    """Path of this environment's ``python3`` kernel spec. ipykernel's wheel ships it; an
    environment without it (ipykernel reached another way) gets one written, for this python."""
    spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / "python3" / "kernel.json"
    if not spec.exists():
        from ipykernel.kernelspec import install

        install(prefix=sys.prefix, kernel_name="python3")
    return spec


def lab_command(argv=()):
    """``(command, environment)`` that start JupyterLab on ``notebooks/`` with this python's kernel."""
    share = str(Path(sys.prefix) / "share" / "jupyter")
    paths = [share] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p and p != share]
    env = {**os.environ, "JUPYTER_PATH": os.pathsep.join(paths)}
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={REPO / 'notebooks'}", *argv]
    return cmd, env


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        print(
            f"JupyterLab is not installed in this environment ({sys.prefix}): `make lab` installs it "
            "(the project's pinned 'lab' extra: pip install -e '.[lab]')",
            file=sys.stderr,
        )
        return 2
    ensure_kernel_spec()
    cmd, env = lab_command(argv)
    os.execve(cmd[0], cmd, env)  # JupyterLab takes over this process (Ctrl-C stops it)


if __name__ == "__main__":
    sys.exit(main())
