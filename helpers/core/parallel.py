"""Parallel work: read ahead in a thread, and an ordered map over threads or worker processes.

Training (notebooks 03 and 04) and whole-slide inference (notebook 03) alternate two kinds of
work: the host gathers the next batch (memory-mapped patches, a slide strip) and the model
consumes it. On a GPU the model's work is asynchronous, so if the host only starts gathering
after the model has finished, every step costs gather + compute; with the gathering done in a
thread one or two items ahead it costs about max(gather, compute). NumPy copies, file reads and
JPEG decoding release the GIL, so a thread is enough (no worker processes, no pickling).

Where one thread cannot keep up (decoding a 50,000 px slide's JPEG tiles for a GPU that
segments ~4,700 patches a second), :func:`ordered_map` spreads independent pieces of work over
several threads, or over the processes of a :func:`process_pool` (patch extraction), and still
hands the results out in order; a dead worker process ends it with one clear error instead of
a hang.

The items come out in the iterable's order, so results do not change; an exception in a
thread is raised in the caller at the item where it happened; and a caller that stops early
(``break``, an exception of its own) stops the threads instead of leaving them blocked.
"""

import collections
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import InputError, check_positive

_END = object()


class _Failure:
    def __init__(self, exc):
        self.exc = exc


def pin_batch(item):
    """Copy every CPU tensor of a tuple/list batch into page-locked memory (for async copies).

    torch is imported here, not at module level: extraction's worker processes use this module
    and must not carry a deep-learning framework.
    """
    import torch

    if isinstance(item, torch.Tensor):
        return item.pin_memory()
    if isinstance(item, (tuple, list)):
        return type(item)(pin_batch(t) for t in item)
    return item


class ReadAhead:
    """Iterate over ``iterable`` with up to ``depth`` items prepared ahead in a thread.

    Args:
        iterable: anything iterable; it is iterated in the thread, once per ``iter()`` call.
        depth: how many items may wait ready (bounds the extra memory to ``depth`` items).
        transform: optional function applied to each item in the thread (e.g. :func:`pin_batch`).

    ``len()`` is the iterable's, when it has one (for progress bars).
    """

    def __init__(self, iterable, depth=2, transform=None):
        check_positive("depth", depth, integer=True)
        self.iterable, self.depth, self.transform = iterable, depth, transform

    def __len__(self):
        return len(self.iterable)

    def __iter__(self):
        q = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item):
            # Wait for room, but give up when the consumer has gone.
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        def work():
            try:
                for item in self.iterable:
                    if self.transform is not None:
                        item = self.transform(item)
                    if not put(item):
                        return
            except BaseException as exc:  # handed to the consumer, raised there
                put(_Failure(exc))
                return
            put(_END)

        thread = threading.Thread(target=work, name="read-ahead", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            thread.join()


def _cgroup_quota(cgroup_root, proc_cgroup):
    """The CPU quota (in CPUs, a float) of this process's cgroup and its parents, or ``None``.

    cgroup v2 (``cpu.max``: ``"<quota> <period>"`` or ``"max <period>"``) and v1
    (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, quota -1 for none). Inside a container the
    path in ``proc_cgroup`` may name the host's hierarchy, so the cgroup mount's root is read too;
    the smallest quota found wins.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one unified hierarchy
            mounts, files = [cgroup_root, os.path.join(cgroup_root, "unified")], ("cpu.max",)
        elif "cpu" in controllers.split(","):
            mounts = [os.path.join(cgroup_root, n) for n in dict.fromkeys((controllers, "cpu", "cpu,cpuacct"))]
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        for mount in mounts:
            folder = os.path.join(mount, path.strip("/"))
            while True:
                quotas.append(_read_quota(folder, files))
                if os.path.normpath(folder) == os.path.normpath(mount):
                    break
                folder = os.path.dirname(folder)
    quotas = [q for q in quotas if q]
    return min(quotas) if quotas else None


def _read_quota(folder, files):
    try:
        fields = [Path(folder, f).read_text().split() for f in files]
    except OSError:
        return None
    try:
        quota, period = (fields[0][0], fields[0][1]) if len(files) == 1 else (fields[0][0], fields[1][0])
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (IndexError, ValueError, ZeroDivisionError):
        return None


def usable_cpus(cgroup_root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """How many CPUs this process can really keep busy: the CPUs it may run on (its affinity,
    e.g. ``taskset``), lowered to its cgroup's CPU quota (``docker --cpus 2``, a Kubernetes CPU
    limit, a CI runner) rounded up.

    ``os.cpu_count()`` counts the host's CPUs and ignores both; torch's default thread count
    follows the affinity but not the quota. A container limited to 2 CPUs on a 64-core host
    would otherwise start 64 extraction workers and 64 torch threads that take turns on 2 CPUs
    (a ResNet-50 training step with 8 threads under a 1-CPU quota took 1.55x as long as with 1,
    measured on a 2-core EPYC).
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root, proc_cgroup)
    return max(1, min(n, math.ceil(quota - 1e-9)) if quota else n)


def cap_torch_threads():
    """Lower torch's intra-op threads to :func:`usable_cpus` where torch would start more (a
    CPU quota); never raises them (a user's ``torch.set_num_threads`` stands). Returns the count.

    torch is imported here, not at module level (see :func:`pin_batch`).
    """
    import torch

    n = usable_cpus()
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


class WorkerDied(InputError):
    """A worker process died (killed by a signal, most often the out-of-memory killer)."""


def _die_with_parent():
    """In a forked worker: die (SIGKILL) as soon as the process that started it dies, so a killed
    notebook kernel never leaves workers running on (Linux; elsewhere a no-op)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def process_pool(workers, initializer=None):
    """A pool of ``workers`` processes for :func:`ordered_map` (forked where the platform allows,
    so notebooks and scripts without a ``__main__`` guard work; spawned elsewhere).

    Each worker dies with the process that started it, and a worker that dies (killed by the
    out-of-memory killer, say) makes :func:`ordered_map` raise :class:`WorkerDied` instead of
    waiting forever for its task.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    check_positive("workers", workers, integer=True)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"

    def init():
        _die_with_parent()
        if initializer is not None:
            initializer()

    if method != "fork":  # a spawned worker cannot run a closure
        init = initializer
    return ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=init)


def _death_cause(pool):
    """How a dead worker of ``pool`` ended, in words (from its exit code, where it is known)."""
    import signal
    import time

    procs = list((getattr(pool, "_processes", None) or {}).values())
    deadline = time.monotonic() + 3.0  # the pool's own thread may be reaping them right now
    while any(getattr(p, "exitcode", 0) is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    codes = [p.exitcode for p in procs if getattr(p, "exitcode", None) not in (None, 0)]
    # The pool terminates (SIGTERM) the other workers once one has died: that one comes first.
    for code in sorted(codes, key=lambda c: c == -signal.SIGTERM):
        if code < 0:
            sig = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            hint = {
                "SIGKILL": "most often the out-of-memory killer: use fewer workers or free memory",
                "SIGBUS": "most often a full disk under a memory-mapped file: free space",
                "SIGSEGV": "a crash in native code",
            }.get(sig, "")
            return f"killed by {sig}" + (f" ({hint})" if hint else "")
        return f"exited with code {code}"
    return "ended abruptly (killed, most often by the out-of-memory killer: use fewer workers or free memory)"


def ordered_map(fn, items, workers=2, ahead=1, executor=None):
    """``fn(item)`` for each of ``items``, computed in parallel, yielded in order.

    At most ``workers + ahead`` results are in progress or waiting at any time, so memory stays
    bounded however long ``items`` is. Without ``executor`` the work runs in ``workers``
    threads (``fn`` must then be safe to call from several threads at once, e.g. each thread
    opens its own file handle: see :mod:`helpers.learning.inference`); with a :func:`process_pool` it
    runs in its processes (``fn`` and the items must be picklable).

    Args:
        fn: the work for one item.
        items: an iterable of inputs (consumed lazily).
        workers: threads (or the processes of ``executor``).
        ahead: results allowed to wait, finished, beyond one per worker.
        executor: a :func:`process_pool` (kept open for the caller), or ``None`` for threads.

    Raises:
        WorkerDied: a worker process died; the exception raised by ``fn`` otherwise.
    """
    from concurrent.futures.process import BrokenProcessPool

    check_positive("workers", workers, integer=True)
    if ahead:
        check_positive("ahead", ahead, integer=True)
    items = iter(items)
    window = collections.deque()
    pool = executor or ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-ahead")
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= workers + ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    except BrokenProcessPool:
        raise WorkerDied(f"a worker process {_death_cause(pool)}") from None
    finally:
        for f in window:
            f.cancel()
        if executor is None:
            pool.shutdown(wait=True)
