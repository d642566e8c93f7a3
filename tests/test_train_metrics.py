"""The shared training loop (checkpoints, resume, refusal, early stop) and the paper's metrics."""

import errno

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import batches_from_arrays

from helpers.core.errors import InputError
from helpers.learning import metrics
from helpers.learning.train import TrainConfig, fit

# -- metrics --------------------------------------------------------------------------------


def test_dice_jaccard_pooled_and_the_identity():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:5] = True  # 50 px
    b[2:7] = True  # 50 px, 30 shared
    d, j = metrics.dice_jaccard(a, b)
    assert d == pytest.approx(60 / 100) and j == pytest.approx(30 / 70)
    assert j == pytest.approx(metrics.jaccard_from_dice(d))
    assert metrics.dice_jaccard(np.zeros(4), np.zeros(4)) == (1.0, 1.0)
    assert metrics.dice_jaccard(np.zeros(4), np.zeros(4), empty=0.0) == (0.0, 0.0)
    # The paper's Dice 0.69 implies Jaccard 0.53 for one mask, not 0.68.
    assert metrics.jaccard_from_dice(0.69) == pytest.approx(0.5267, abs=1e-4)


def test_per_patch_means_count_empty_patches():
    p = np.zeros((3, 4, 4), bool)
    t = np.zeros((3, 4, 4), bool)
    p[0, :2] = t[0, :2] = True  # perfect
    t[1, :2] = True  # missed entirely
    d, j, n_empty = metrics.dice_jaccard_per_patch(p, t)
    assert n_empty == 1 and d == pytest.approx((1 + 0 + 1) / 3) and j == pytest.approx(2 / 3)
    d0, _, _ = metrics.dice_jaccard_per_patch(p, t, empty=0.0)
    assert d0 == pytest.approx(1 / 3)


def test_paip_score_threshold():
    assert metrics.paip_score(0.64) == 0.0 and metrics.paip_score(0.7) == 0.7


def test_soft_dice_loss_is_eq1_corrected():
    t = torch.zeros(2, 1, 8, 8)
    t[:, :, :4] = 1
    assert float(metrics.soft_dice_loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics.soft_dice_loss(1 - t, t)) == pytest.approx(1.0, abs=0.02)
    p = torch.full_like(t, 0.5)
    # 1 - 2*sum(pr)/(sum p^2 + sum r^2): 1 - 2*16/(16 + 32) = 1/3 per image (eps aside)
    assert float(metrics.soft_dice_loss(p, t, eps=0)) == pytest.approx(1 / 3, abs=1e-6)
    with pytest.raises(InputError):
        metrics.soft_dice_loss(p, t[:, 0])


def test_classification_report():
    r = metrics.classification_report([1, 1, 0, 0, 0], [1, 0, 0, 0, 1])
    assert r["accuracy"] == pytest.approx(0.6) and r["sensitivity"] == 0.5
    assert r["specificity"] == pytest.approx(2 / 3) and r["confusion"].tolist() == [[2, 1], [1, 1]]


# -- the training loop ----------------------------------------------------------------------


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 8, 8, 3)).astype(np.uint8)
    x[y == 1, :, :, 0] += 150  # class 1 is red: learnable
    return x, y


def _setup(tmp_path, epochs=3, **cfg):
    x, y = _data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 3, 2))
    config = TrainConfig(epochs=epochs, optimizer="adam", lr=0.01, device="cpu", **cfg)

    def train_batches(epoch):
        return batches_from_arrays(x[:48], y[:48], 16, shuffle=True, seed=epoch)

    def evaluate(m, device):
        xb = torch.from_numpy(x[48:]).permute(0, 3, 1, 2).float() / 255
        out = m(xb)
        return {
            "val_loss": float(torch.nn.functional.cross_entropy(out, torch.from_numpy(y[48:]))),
            "val_acc": float((out.argmax(1).numpy() == y[48:]).mean()),
        }

    return model, train_batches, evaluate, config


def _loss(out, y):
    return torch.nn.functional.cross_entropy(out, y.long())


def test_fit_learns_and_writes_checkpoints(tmp_path):
    model, tb, ev, cfg = _setup(tmp_path, epochs=5)
    h = fit(model, tb, ev, _loss, cfg, tmp_path / "run", meta={"arch": "linear"}, progress=False, log=lambda *_: None)
    assert len(h) == 5 and h.train_loss.iloc[-1] < h.train_loss.iloc[0]
    assert h.val_acc.iloc[-1] >= 0.8
    for f in ("last.pt", "best.pt", "history.csv"):
        assert (tmp_path / "run" / f).exists()
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ck["epoch"] == 5 and ck["identity"]["meta"] == {"arch": "linear"} and "torch" in ck["versions"]
    assert not list((tmp_path / "run").glob(".*tmp*"))
    # best.pt is the model to use: what resuming alone needs (the optimiser's state: twice the
    # weights with Adam) stays in last.pt.
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert not set(best) & {"optimizer", "scheduler", "rng"} and {"optimizer", "rng"} <= set(ck)
    assert best["identity"] == ck["identity"] and best["best"] == ck["best"] and best["epoch"] <= 5
    model.load_state_dict(best["model"])


def test_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    model, tb, ev, cfg = _setup(tmp_path, epochs=4)
    full = fit(model, tb, ev, _loss, cfg, tmp_path / "a", progress=False, log=lambda *_: None)

    model, tb, ev, cfg = _setup(tmp_path, epochs=4)
    calls = []

    def killed(epoch):  # dies in the middle of epoch 3
        calls.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt
        return tb(epoch)

    with pytest.raises(KeyboardInterrupt):
        fit(model, killed, ev, _loss, cfg, tmp_path / "b", progress=False, log=lambda *_: None)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["epoch"] == 2
    model, tb, ev, cfg = _setup(tmp_path, epochs=4)
    logs = []
    resumed = fit(model, tb, ev, _loss, cfg, tmp_path / "b", progress=False, log=logs.append)
    assert any("resumed" in m for m in logs) and len(resumed) == 4
    # Exact: every random state is in last.pt (tests/test_resume.py kills real pipelines).
    pd.testing.assert_frame_equal(resumed.drop(columns="seconds"), full.drop(columns="seconds"))


def test_rerun_with_fewer_epochs_says_the_checkpoint_is_from_the_longer_run(tmp_path):
    model, tb, ev, cfg = _setup(tmp_path, epochs=3)
    fit(model, tb, ev, _loss, cfg, tmp_path / "f", progress=False, log=lambda *_: None)
    model, tb, ev, cfg = _setup(tmp_path, epochs=2)
    logs = []
    h = fit(model, tb, ev, _loss, cfg, tmp_path / "f", progress=False, log=logs.append)
    assert len(h) == 3  # nothing trained: the history is the longer run's
    assert any("already holds 3 epochs, more than epochs=2" in m for m in logs)


def test_rerun_with_other_settings_is_refused(tmp_path):
    model, tb, ev, cfg = _setup(tmp_path, epochs=1)
    fit(model, tb, ev, _loss, cfg, tmp_path / "r", meta={"arch": "linear"}, progress=False, log=lambda *_: None)
    model, tb, ev, cfg = _setup(tmp_path, epochs=2)
    cfg.lr = 0.5
    with pytest.raises(InputError, match="config.lr"):
        fit(model, tb, ev, _loss, cfg, tmp_path / "r", meta={"arch": "linear"}, progress=False, log=lambda *_: None)
    cfg.lr = 0.01
    with pytest.raises(InputError, match="meta.arch"):
        fit(model, tb, ev, _loss, cfg, tmp_path / "r", meta={"arch": "other"}, progress=False, log=lambda *_: None)


def test_early_stop_and_lr_plateau(tmp_path):
    model, tb, ev, cfg = _setup(
        tmp_path, epochs=30, early_stop_patience=2, lr_patience=0, lr_factor=0.1, monitor="val_acc", mode="max"
    )
    h = fit(model, tb, ev, _loss, cfg, tmp_path / "e", progress=False, log=lambda *_: None)
    assert len(h) < 30
    assert h.lr.min() < 0.01  # the plateau rule lowered the rate


def test_bad_config_and_missing_monitor(tmp_path):
    with pytest.raises(InputError, match="optimizer"):
        TrainConfig(optimizer="rmsprop").validate()
    with pytest.raises(InputError, match="epochs"):
        TrainConfig(epochs=0).validate()
    model, tb, _, cfg = _setup(tmp_path, epochs=1)
    with pytest.raises(InputError, match="val_loss"):
        fit(model, tb, lambda m, d: {"acc": 1.0}, _loss, cfg, tmp_path / "m", progress=False, log=lambda *_: None)


def test_batch_pooled_dice_is_not_dominated_by_empty_patches():
    t = torch.zeros(4, 1, 8, 8)
    t[0, :, :4] = 1  # one patch holds tumour, three are empty
    p = t.clone()
    p[1:, :, 0, 0] = 0.5  # a speck of false positive in each empty patch
    per_image = float(metrics.soft_dice_loss(p, t, eps=1e-6))
    pooled = float(metrics.soft_dice_loss(p, t, eps=1e-6, per_image=False))
    assert per_image > 0.7 and pooled < 0.05


def test_recalibrate_batchnorm_gives_the_data_statistics():
    from helpers.learning.train import default_prepare, recalibrate_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    bn = model[1]
    bn.running_mean.fill_(5.0)  # stale statistics, as early in training
    bn.momentum = 0.3
    xs = [torch.rand(4, 3, 6, 6) * 3 + 1 for _ in range(5)]
    n = recalibrate_batchnorm(model.eval(), [(x, torch.zeros(4)) for x in xs], default_prepare, torch.device("cpu"))
    assert n == 5
    with torch.no_grad():
        feats = torch.cat([model[0](x) for x in xs])
    # A plain average over the batches of each batch's mean: here, the overall mean.
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert bn.momentum == 0.3 and not model.training  # both restored
    assert recalibrate_batchnorm(torch.nn.Conv2d(3, 1, 1), [], default_prepare, torch.device("cpu")) == 0


def _disk_full_on(monkeypatch, target, name, calls):
    """Make ``target.name`` raise ENOSPC on its ``calls``-th call (1-based), like a full disk."""
    real, seen = getattr(target, name), [0]

    def fake(*args, **kwargs):
        seen[0] += 1
        if seen[0] == calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, fake)


class _FillingFile:
    """A file that takes ``room`` bytes and then fails as a full disk does (``ENOSPC``)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _torch_save_fills_disk_on(monkeypatch, calls):
    """Make the ``calls``-th ``torch.save`` run out of disk part way through, as on a real disk:
    torch's zip writer then raises its own ``RuntimeError`` ("unexpected pos"), not the ENOSPC."""
    real, seen = torch.save, [0]

    def fake(obj, f, *args, **kwargs):
        seen[0] += 1
        return real(obj, _FillingFile(f, 4096) if seen[0] == calls else f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fake)


def test_torch_reports_a_full_disk_as_its_own_error_and_it_is_still_the_disk_full_error(tmp_path, monkeypatch):
    from helpers.core.errors import DiskFullError
    from helpers.learning.train import save_checkpoint

    with open(tmp_path / "raw.pt", "wb") as f, pytest.raises(RuntimeError, match="unexpected pos") as raw:
        torch.save({"w": torch.zeros(10_000)}, _FillingFile(f, 4096))  # what torch itself raises
    assert isinstance(raw.value.__context__, OSError)
    _torch_save_fills_disk_on(monkeypatch, 1)
    with pytest.raises(DiskFullError, match="is full"):
        save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(10_000)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.pt"]  # nothing half-written kept


def test_full_disk_while_saving_a_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    model, tb, ev, cfg = _setup(tmp_path, epochs=3)
    # Epoch 1 writes best.pt and last.pt (calls 1, 2); epoch 2's best.pt is call 3, its last.pt 4.
    _torch_save_fills_disk_on(monkeypatch, 4)
    with pytest.raises(InputError) as exc:
        fit(model, tb, ev, _loss, cfg, tmp_path / "d", progress=False, log=lambda *_: None)
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path / 'd' / 'last.pt'}: the disk is full") and "saving epoch 2" in msg
    assert "holds epoch 1 and is intact" in msg and "rerun" in msg
    assert load_epoch(tmp_path / "d" / "last.pt") == 1  # the previous checkpoint, intact
    assert not list((tmp_path / "d").glob(".*tmp*"))  # no half-written file left
    monkeypatch.undo()
    model, tb, ev, cfg = _setup(tmp_path, epochs=3)
    logs = []
    h = fit(model, tb, ev, _loss, cfg, tmp_path / "d", progress=False, log=logs.append)
    assert len(h) == 3 and any("after epoch 1" in m for m in logs)


def test_full_disk_before_any_checkpoint_and_for_the_history(tmp_path, monkeypatch):
    model, tb, ev, cfg = _setup(tmp_path, epochs=2)
    _torch_save_fills_disk_on(monkeypatch, 1)
    with pytest.raises(InputError, match=r"best\.pt: the disk is full .* no last\.pt to resume from yet"):
        fit(model, tb, ev, _loss, cfg, tmp_path / "e", progress=False, log=lambda *_: None)
    monkeypatch.undo()
    model, tb, ev, cfg = _setup(tmp_path, epochs=2)
    _disk_full_on(monkeypatch, pd.DataFrame, "to_csv", 1)
    with pytest.raises(InputError) as exc:
        fit(model, tb, ev, _loss, cfg, tmp_path / "h", progress=False, log=lambda *_: None)
    msg = str(exc.value)
    # The history comes after last.pt: that checkpoint (epoch 1) is complete, and a rerun resumes.
    assert msg.startswith(f"{tmp_path / 'h' / 'history.csv'}: the disk is full")
    assert "last.pt holds epoch 1 and is intact" in msg and load_epoch(tmp_path / "h" / "last.pt") == 1


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    model, tb, ev, cfg = _setup(tmp_path, epochs=1)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(PermissionError):
        fit(model, tb, ev, _loss, cfg, tmp_path / "p", progress=False, log=lambda *_: None)


def load_epoch(path):
    return torch.load(path, weights_only=False)["epoch"]
