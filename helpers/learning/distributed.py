"""Training on several GPUs with PyTorch's own engine: torchrun, ``torch.distributed``, DDP.

:func:`helpers.learning.train.fit` trains with ``DistributedDataParallel`` whenever a process group is
initialised with more than one process (one process per GPU: NCCL on GPUs, gloo on CPUs). This
module holds the small pieces around it:

- :func:`init_from_env`: join the process group that ``torchrun`` describes in the
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
- rank helpers (:func:`rank`, :func:`world_size`, :func:`local_rank`, :func:`is_main`) that
  also answer in a plain single process (rank 0 of 1);
- :func:`run_on_main`: run something on rank 0 only (validation, writing checkpoints) and
  hand its result, or its error, to every rank, so that no rank waits forever for a failed one;
- :func:`launch`: run ``python -m torch.distributed.run ... -m helpers.paper.jobs SPEC.json`` as a
  subprocess, from a notebook cell (papermill too) or a script, its output shown line by line.
  A subprocess, not ``torch.multiprocessing``: the job is rebuilt from a JSON spec, so nothing
  of the notebook (closures, open files) has to be pickled, and no CUDA state is forked.

One machine, all its GPUs (``torchrun`` picks a free port itself)::

    python -m torch.distributed.run --standalone --nproc-per-node 8 -m helpers.paper.jobs job.json

Several machines (run the same command on each; ``HOST`` is one of them, reachable from all;
the spec's paths, the caches and ``out_dir`` must be the same on every machine, e.g. a shared
file system, since every rank reads the caches and ``last.pt`` on resume)::

    python -m torch.distributed.run --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 --rdzv-id paip -m helpers.paper.jobs job.json

Used by :mod:`helpers.learning.train` and :mod:`helpers.paper.jobs`.
"""

import datetime
import os
import selectors
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import InputError, check_positive
from ..core.paths import REPO_ROOT

#: The variables torchrun sets for each process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed():
    """Whether a ``torch.distributed`` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank():
    """This process's global rank (0 in a plain single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size():
    """The number of processes training together (1 in a plain single process)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank():
    """This process's rank on its own machine (torchrun's ``LOCAL_RANK``; 0 without it)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main():
    """Whether this process is rank 0: the one that validates, logs and writes files."""
    return rank() == 0


def rank_seed(seed, rank_=None):
    """The seed of a rank's random streams (augmentation, dropout).

    Rank 0 keeps ``seed`` itself, so a single process draws exactly what it always drew; other
    ranks get seeds derived from ``(seed, rank)``, so that their augmentations differ (the same
    seed everywhere would give every rank's slice the same random transforms).

    Args:
        seed: the run's seed.
        rank_: the rank (default: this process's).

    Returns:
        An int seed.
    """
    r = rank() if rank_ is None else int(rank_)
    if r == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**32, r]).generate_state(1)[0])


def init_from_env(backend=None, timeout_minutes=60):
    """Join the process group described by torchrun's environment variables, if any.

    Args:
        backend: ``nccl`` (GPUs) or ``gloo`` (CPUs); default: ``nccl`` when CUDA is available,
            else ``gloo``.
        timeout_minutes: how long a collective waits for the other ranks before failing
            (rank 0 validates while the others wait, so this must exceed a validation pass).

    Returns:
        True when this process is now part of a process group (already initialised, or
        initialised here), False when the torchrun variables are absent (a plain process).

    Raises:
        InputError: NCCL asked for without a GPU, or more processes on this machine than GPUs.
    """
    if is_distributed():
        return True
    if not all(v in os.environ for v in ("RANK", "WORLD_SIZE")):
        return False
    check_positive("timeout_minutes", timeout_minutes)
    local = int(os.environ.get("LOCAL_RANK", 0))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise InputError(f"parameter 'backend' must be 'nccl' or 'gloo', got {backend!r}")
    kwargs = {}
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise InputError("backend 'nccl' needs CUDA GPUs and none is visible; use backend='gloo' on CPUs")
        if local >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible: "
                "--nproc-per-node must not exceed the GPUs of each machine"
            )
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return True


def cleanup():
    """Leave the process group (at the end of a torchrun job); nothing in a plain process."""
    if is_distributed():
        dist.destroy_process_group()


def exit_process(code=0):
    """End a torchrun worker process now, after :func:`cleanup`, skipping interpreter shutdown.

    In torch 2.14 a ``DistributedDataParallel`` keeps references to its process group, so
    ``destroy_process_group`` leaves gloo's threads running (pytorch/pytorch#107298), and the
    interpreter's shutdown then aborts the process now and then (SIGABRT, "terminate called
    without an active exception"; pytorch/pytorch#179291) after the work is done and written;
    torchrun would report the run as failed. Measured here: 8 of 20 two-process runs. Files
    are closed by then (checkpoints are written atomically); stdout and stderr are flushed.

    Args:
        code: the exit status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier():
    """Wait until every rank reaches this point (nothing in a plain process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src=0):
    """``obj`` of rank ``src`` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj):
    """The list of every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn):
    """``fn()`` run on rank 0 only, its result handed to every rank.

    If ``fn`` raises on rank 0, rank 0 re-raises it and every other rank raises an error with
    its message (an :class:`InputError` for an input error), instead of waiting for a result
    that never comes.
    """
    if not is_distributed():
        return fn()
    failure = None
    result = None
    if is_main():
        try:
            result = fn()
        except BaseException as exc:
            failure = exc
    box = broadcast_object(("error", type(failure).__name__, str(failure)) if failure is not None else ("ok", result))
    if failure is not None:
        raise failure
    if box[0] == "error":
        kind, msg = box[1], box[2]
        raise (InputError if kind == "InputError" else RuntimeError)(f"rank 0 failed ({kind}): {msg}")
    return box[1]


def torchrun_command(
    args, nproc_per_node, nnodes=1, rdzv_endpoint=None, rdzv_id="paip-repro", module=True, python=None
):
    """The ``python -m torch.distributed.run`` command line for ``args``.

    Args:
        args: what each process runs: a module and its arguments (``module=True``, e.g.
            ``["helpers.paper.jobs", "job.json"]``) or a script and its arguments.
        nproc_per_node: processes on this machine (one per GPU).
        nnodes: machines taking part. With 1 and no ``rdzv_endpoint`` torchrun runs
            ``--standalone`` (a rendezvous on a free local port).
        rdzv_endpoint: ``host:port`` of the rendezvous, the same on every machine (needed
            when ``nnodes`` > 1).
        rdzv_id: a name for the job, the same on every machine.
        module: ``args[0]`` is a module (``-m``), else a script path.
        python: the interpreter (default: this one).

    Returns:
        The argument list for :mod:`subprocess`.
    """
    check_positive("nproc_per_node", nproc_per_node, integer=True)
    check_positive("nnodes", nnodes, integer=True)
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node)]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise InputError(
                f"parameter 'rdzv_endpoint' is needed with nnodes={nnodes}: pass 'host:port' of "
                "one of the machines, reachable from all of them (e.g. 'node1:29400')"
            )
        cmd += [
            "--nnodes",
            str(nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv_endpoint,
            "--rdzv-id",
            rdzv_id,
        ]
    if module:
        cmd.append("-m")
    return cmd + [str(a) for a in args]


def child_environment(extra=None):
    """This process's environment with the repository importable (``PYTHONPATH``) and ``extra``
    variables set (a value of ``None`` removes the variable)."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


class OutputStreams:
    """Show the output of running subprocesses line by line, as it comes.

    Each process must be started with ``stdout=subprocess.PIPE, stderr=subprocess.STDOUT``
    (bytes). Lines go to ``log`` (``print`` shows them in a notebook cell, under papermill
    too), prefixed ``[name]`` unless the name is empty; the last lines of each are kept for
    error messages.
    """

    def __init__(self, log=print, keep=30):
        self.log, self.keep = log, keep
        self.sel = selectors.DefaultSelector()
        self.procs, self.partial, self.tails = {}, {}, {}

    def add(self, name, proc):
        """Follow ``proc``'s output under ``name``."""
        self.procs[name] = proc
        self.partial[name] = b""
        self.tails[name] = deque(maxlen=self.keep)
        self.sel.register(proc.stdout, selectors.EVENT_READ, name)

    def _emit(self, name, raw):
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.tails[name].append(line)
        self.log(f"[{name}] {line}" if name else line)

    def wait(self, first=False):
        """Show output until every followed process has ended (``first``: until one has).

        Returns:
            ``{name: (returncode, last lines)}`` of the processes that ended.
        """
        ended = {}
        while self.procs and not (first and ended):
            for key, _ in self.sel.select():
                name = key.data
                chunk = os.read(key.fileobj.fileno(), 65536)
                if chunk:
                    *lines, self.partial[name] = (self.partial[name] + chunk).split(b"\n")
                    for raw in lines:
                        self._emit(name, raw)
                    continue
                if self.partial[name]:
                    self._emit(name, self.partial[name])
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
                ended[name] = (self.procs.pop(name).wait(), list(self.tails[name]))
        return ended


def launch(spec_files, nproc_per_node, nnodes=1, rdzv_endpoint=None, rdzv_id="paip-repro", env=None, log=print):
    """Run job specs under torchrun: ``python -m torch.distributed.run ... -m helpers.paper.jobs SPEC...``.

    Works from a notebook cell (papermill included) and from scripts: the processes are started
    fresh (no fork of the notebook's kernel) and rebuild their job from the JSON spec; their
    output appears line by line through ``log``. Each spec's ``out_dir`` receives the
    checkpoints and ``history.csv`` (rank 0 writes them); a rerun of the same command resumes
    from ``last.pt``. See :func:`helpers.paper.jobs.run_distributed` to start from spec objects.

    For several machines, run this (or the equivalent command, see the module's docstring) on
    every machine with the same ``nnodes``, ``rdzv_endpoint`` and ``rdzv_id``.

    Args:
        spec_files: JSON job specs (:mod:`helpers.paper.jobs`), trained one after another.
        nproc_per_node: processes on this machine: one per GPU (on CPUs, a few: gloo).
        nnodes: machines taking part.
        rdzv_endpoint: ``host:port`` of the rendezvous when ``nnodes`` > 1.
        rdzv_id: the job's name, the same on every machine.
        env: extra environment variables for the processes (e.g. ``{"OMP_NUM_THREADS": 4}``).
        log: where the processes' output goes.

    Returns:
        0, torchrun's exit code.

    Raises:
        InputError: a spec file is missing.
        RuntimeError: the run failed; the message holds the end of its output.
    """
    files = [Path(f) for f in ([spec_files] if isinstance(spec_files, (str, os.PathLike)) else spec_files)]
    for f in files:
        if not f.is_file():
            raise InputError(f"{f}: no such job spec; write it first (helpers.paper.jobs.write_spec)")
    cmd = torchrun_command(["helpers.paper.jobs", *files], nproc_per_node, nnodes, rdzv_endpoint, rdzv_id)
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=child_environment(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    streams = OutputStreams(log)
    streams.add("", proc)
    try:
        ((rc, tail),) = streams.wait().values()
    except BaseException:  # e.g. the notebook's kernel is interrupted: stop the run too
        proc.terminate()
        proc.wait()
        raise
    if rc != 0:
        raise RuntimeError(
            f"the distributed run ({nproc_per_node} processes per machine, {nnodes} machines) failed "
            f"with exit code {rc}; its last lines:\n" + "\n".join(tail[-12:])
        )
    return rc
