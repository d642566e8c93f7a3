"""Read ahead: produce the items of an iterable in a background thread while the caller works.

Training (notebooks 03 and 04) and whole-slide inference (notebook 03) alternate two kinds of
work: the host gathers the next batch (memory-mapped patches, a slide strip) and the model
consumes it. On a GPU the model's work is asynchronous, so if the host only starts gathering
after the model has finished, every step costs gather + compute; with the gathering done in a
thread one or two items ahead it costs about max(gather, compute). NumPy copies, file reads and
JPEG decoding release the GIL, so a thread is enough (no worker processes, no pickling).

Where one thread cannot keep up (decoding a 50,000 px slide's JPEG tiles for a GPU that
segments ~4,700 patches a second), :func:`ordered_map` spreads independent pieces of work over
several threads and still hands the results out in order.

The items come out in the iterable's order, so results do not change; an exception in a
thread is raised in the caller at the item where it happened; and a caller that stops early
(``break``, an exception of its own) stops the threads instead of leaving them blocked.
"""

import collections
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import check_positive

_END = object()


class _Failure:
    def __init__(self, exc):
        self.exc = exc


def pin_batch(item):
    """Copy every CPU tensor of a tuple/list batch into page-locked memory (for async copies)."""
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


def ordered_map(fn, items, workers=2, ahead=1):
    """``fn(item)`` for each of ``items``, computed by ``workers`` threads, yielded in order.

    At most ``workers + ahead`` results are in progress or waiting at any time, so memory stays
    bounded however long ``items`` is. ``fn`` must be safe to call from several threads at
    once (e.g. each thread opens its own file handle: see :class:`helpers.inference`).

    Args:
        fn: the work for one item.
        items: an iterable of inputs (consumed lazily).
        workers: threads.
        ahead: results allowed to wait, finished, beyond one per worker.
    """
    check_positive("workers", workers, integer=True)
    if ahead:
        check_positive("ahead", ahead, integer=True)
    items = iter(items)
    window = collections.deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-ahead")
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= workers + ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        for f in window:
            f.cancel()
        pool.shutdown(wait=True)
