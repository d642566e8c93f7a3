"""``make lab``: JupyterLab started by ``tools/lab.py`` runs the notebooks on this environment.

The test starts the server headless on a free port with a token, opens notebook 01 the way
JupyterLab's front end does (a session through the REST API, whose kernel runs in
``notebooks/``), runs the notebook's code cells through the kernel's websocket on the small
synthetic dataset (``data_dir`` set after the parameters cell, as papermill does; figures into a
temporary runs folder), and stops the server. A decoy user-wide ``python3`` kernel spec that
runs no python is put where Jupyter looks first unless ``tools/lab.py`` puts this environment
first: the notebook runs only if it does.

Needs the ``lab`` extra (``make lab`` and ``make test`` install it); skipped without it.
"""

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REASON = "JupyterLab is not installed: the project's 'lab' extra (make lab, make test or pip install -e '.[lab]')"
pytest.importorskip("jupyterlab", reason=REASON)
pytest.importorskip("jupyter_server", reason=REASON)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "01_slide_exploration.ipynb"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The JupyterLab server process and its REST API."""

    def __init__(self, tmp_path, extra_env):
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "lab.log"
        cmd = [
            sys.executable,
            str(REPO / "tools" / "lab.py"),
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
        ] + (["--allow-root"] if os.geteuid() == 0 else [])  # CI containers often run as root
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env={**os.environ, **extra_env}, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self):
        return self.log_path.read_text(errors="replace")[-3000:]

    def api(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"token {self.token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as exc:
            pytest.fail(f"{method} {path}: HTTP {exc.code} {exc.read().decode()[:500]}\nserver log:\n{self.log()}")
        return json.loads(text) if text else None

    def wait_ready(self, timeout=90):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"JupyterLab exited ({self.proc.returncode}) before serving:\n{self.log()}")
            try:
                return self.api("GET", "/api/status", timeout=5)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        pytest.fail(f"JupyterLab did not answer on port {self.port} within {timeout} s:\n{self.log()}")

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.api("POST", "/api/shutdown", timeout=10)
                return self.proc.wait(timeout=30)
            except (urllib.error.URLError, ConnectionError, TimeoutError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        return self.proc.returncode


async def _run_cells(ws_url, cells, timeout=180):
    """Execute ``cells`` one by one through the kernel's websocket (Jupyter's JSON protocol).

    Returns one ``(status, text, error)`` per cell: the execute_reply's status, the cell's
    stdout and stderr, and ``"ename: evalue"`` plus the traceback's tail when it failed.
    """
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(ws_url)
    session, results = uuid.uuid4().hex, []
    try:
        for code in cells:
            msg_id = uuid.uuid4().hex
            header = {
                "msg_id": msg_id,
                "msg_type": "execute_request",
                "session": session,
                "username": "test",
                "version": "5.3",
                "date": "",
            }
            content = {"code": code, "silent": False, "store_history": True, "allow_stdin": False}
            msg = {"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell"}
            await ws.write_message(json.dumps(msg))
            text, error, status, idle = [], None, None, False
            deadline = time.monotonic() + timeout
            while status is None or not idle:  # the reply, and the kernel idle again (all output sent)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply within {timeout} s to:\n{code[:300]}")
                raw = await asyncio.wait_for(ws.read_message(), left)
                if raw is None:
                    raise ConnectionError("the kernel's websocket closed")
                m = json.loads(raw)
                if m.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, c = m["msg_type"], m["content"]
                if kind == "stream":
                    text.append(c["text"])
                elif kind == "error":
                    error = f"{c['ename']}: {c['evalue']}\n" + "\n".join(c["traceback"][-3:])
                elif kind == "execute_reply":
                    status = c["status"]
                elif kind == "status" and c["execution_state"] == "idle":
                    idle = True
            results.append((status, "".join(text), error))
            if status != "ok":
                break
    finally:
        ws.close()
    return results


def test_jupyterlab_runs_notebook_01_through_its_kernel(small_dataset, tmp_path):
    # A decoy python3 kernel in the user's Jupyter folder, searched first (before this
    # environment) with JUPYTER_PREFER_ENV_PATH=0: only tools/lab.py's JUPYTER_PATH avoids it.
    decoy = tmp_path / "user-data" / "kernels" / "python3"
    decoy.mkdir(parents=True)
    spec = {"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]}
    (decoy / "kernel.json").write_text(json.dumps({**spec, "display_name": "decoy", "language": "python"}))
    runs = tmp_path / "runs"
    env = {
        "PAIP_REPRO_RUNS": str(runs),
        "TQDM_DISABLE": "1",
        "JUPYTER_DATA_DIR": str(tmp_path / "user-data"),
        "JUPYTER_PREFER_ENV_PATH": "0",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),  # no user configuration, no workspace written
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    server = Server(tmp_path, env)
    try:
        server.wait_ready()
        sess = server.api(
            "POST", "/api/sessions", {"path": NOTEBOOK.name, "type": "notebook", "kernel": {"name": "python3"}}
        )
        kid = sess["kernel"]["id"]
        ws_url = f"ws://127.0.0.1:{server.port}/api/kernels/{kid}/channels?token={server.token}"
        code = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
        sources = ["".join(c["source"]) for c in code]
        assert "parameters" in code[0]["metadata"].get("tags", [])
        probe = "import os, sys, helpers\nprint(sys.prefix)\nprint(helpers.__file__)\nprint(os.getcwd())"
        injected = f"data_dir = {str(small_dataset)!r}\nrun_name = 'lab'"  # as papermill injects it
        cells = [probe, sources[0], injected, *sources[1:]]
        results = asyncio.run(_run_cells(ws_url, cells))
        for i, (status, text, error) in enumerate(results):
            assert status == "ok", f"cell {i} of {len(cells)} failed in the lab kernel: {error}\n{text[-1500:]}"
        assert len(results) == len(cells)
        prefix, helpers_file, cwd = results[0][1].split("\n")[:3]
        assert Path(prefix) == Path(sys.prefix), "the notebook's kernel is not this environment's python"
        assert Path(helpers_file).is_relative_to(REPO) and Path(cwd) == REPO / "notebooks"
        out = "".join(t for _, t, _ in results)
        assert "slides                             3" in out, out[:2000]  # the dataset's summary table
        figures = sorted(p.name for p in (runs / "lab" / "figures").glob("01_*.png"))
        assert "01_thumbnails.png" in figures and "01_figure1_scales.png" in figures, figures
        server.api("DELETE", f"/api/sessions/{sess['id']}")
        assert server.api("GET", "/api/kernels") == [], "the kernel outlived its session"
    finally:
        rc = server.stop()
    assert rc == 0, f"JupyterLab did not stop cleanly ({rc}):\n{server.log()}"
