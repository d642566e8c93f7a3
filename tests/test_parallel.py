"""Reading ahead in a thread: same items in the same order, errors reach the caller, no thread
is left behind, and training gives the same result with and without it."""

import threading
import time

import numpy as np
import pytest
import torch
from test_train_metrics import _loss, _setup

from helpers.core.errors import InputError
from helpers.core.parallel import ReadAhead
from helpers.learning.train import fit


def _read_ahead_threads():
    return [t for t in threading.enumerate() if t.name.startswith("read-ahead") and t.is_alive()]


def test_items_in_order_with_length_and_transform():
    seen = []

    def square(v):
        seen.append(threading.current_thread().name)
        return v * v

    ra = ReadAhead(list(range(50)), depth=3, transform=square)
    assert len(ra) == 50
    assert list(ra) == [v * v for v in range(50)]
    assert list(ra) == [v * v for v in range(50)]  # iterable again, from the start
    assert set(seen) == {"read-ahead"}  # the work ran in the thread
    assert not _read_ahead_threads()


def test_error_in_the_thread_is_raised_in_the_caller_after_the_good_items():
    def items():
        yield 1
        yield 2
        raise ValueError("strip 3 is unreadable")

    got = []
    with pytest.raises(ValueError, match="strip 3 is unreadable"):
        for v in ReadAhead(items()):
            got.append(v)
    assert got == [1, 2]
    assert not _read_ahead_threads()


def test_a_caller_that_stops_early_stops_the_thread_and_reading_is_bounded():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    ra = iter(ReadAhead(endless(), depth=2))
    assert next(ra) == 0
    time.sleep(0.3)  # let the thread run ahead as far as it may
    # one handed out, two waiting, one made and waiting for room: never the whole stream
    assert len(produced) <= 4
    ra.close()  # what a break or an exception does
    assert not _read_ahead_threads()

    with pytest.raises(RuntimeError, match="model failed"):
        for v in ReadAhead(endless()):
            if v == 5:
                raise RuntimeError("model failed")
    assert not _read_ahead_threads()


@pytest.mark.parametrize("depth", [0, -1, 1.5, "2"])
def test_bad_depth_names_the_parameter(depth):
    with pytest.raises(InputError, match="depth"):
        ReadAhead([1], depth=depth)


@pytest.mark.slow
def test_training_is_the_same_with_and_without_read_ahead(tmp_path):
    runs = []
    for k, read_ahead in enumerate((0, 2)):
        model, tb, ev, cfg = _setup(tmp_path, epochs=3)
        h = fit(
            model, tb, ev, _loss, cfg, tmp_path / str(k), progress=False, log=lambda *_: None, read_ahead=read_ahead
        )
        runs.append((h, [p.detach().clone() for p in model.parameters()]))
    (h0, w0), (h1, w1) = runs
    np.testing.assert_array_equal(h0.train_loss, h1.train_loss)
    np.testing.assert_array_equal(h0.val_loss, h1.val_loss)
    for a, b in zip(w0, w1):
        assert torch.equal(a, b)
    assert not _read_ahead_threads()

    model, tb, ev, cfg = _setup(tmp_path, epochs=1)
    with pytest.raises(InputError, match="read_ahead"):
        fit(model, tb, ev, _loss, cfg, tmp_path / "bad", progress=False, log=lambda *_: None, read_ahead=-1)


def test_ordered_map_keeps_the_order_bounds_the_work_and_stops_on_errors():
    from helpers.core.parallel import ordered_map

    started = []

    def slow_square(v):
        started.append(v)
        time.sleep(0.02 * (v % 3))  # finishing out of order
        return v * v

    assert list(ordered_map(slow_square, range(20), workers=3)) == [v * v for v in range(20)]

    started.clear()
    it = ordered_map(slow_square, range(10**6), workers=2, ahead=1)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(started) <= 4  # never the whole input: two workers, one ahead, one handed out
    it.close()
    assert not _read_ahead_threads()

    def fails_at_7(v):
        if v == 7:
            raise OSError("tile 7 is truncated")
        return v

    got = []
    with pytest.raises(OSError, match="tile 7"):
        for v in ordered_map(fails_at_7, range(100), workers=2):
            got.append(v)
    assert got == list(range(7))
    with pytest.raises(InputError, match="workers"):
        list(ordered_map(fails_at_7, range(3), workers=0))
