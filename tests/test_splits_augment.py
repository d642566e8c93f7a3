"""Patient-grouped splits, augmentations and class balance."""

import numpy as np
import pytest
import torch

from helpers.core.errors import InputError
from helpers.patching.augment import augment_batch, balance_indices
from helpers.patching.splits import split_cases


def test_split_is_by_slide_stratified_and_seeded():
    ids = [f"c{i:02d}" for i in range(10)]
    labels = [1] * 7 + [0] * 3
    a = split_cases(ids, labels, seed=3)
    b = split_cases(ids, labels, seed=3)
    assert a.equals(b)
    assert a.split.value_counts().to_dict() == {"train": 6, "val": 2, "test": 2}
    for s in ("val", "test"):  # every split holds both slide labels
        assert set(a.label[a.split == s]) == {0, 1}
    assert not a.equals(split_cases(ids, labels, seed=4))


def test_split_paper_sized():
    ids = [f"p{i:02d}" for i in range(50)]
    s = split_cases(ids, None, seed=0)
    assert s.split.value_counts().to_dict() == {"train": 30, "val": 10, "test": 10}


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.6, 0.3, 0.3), (1.2, -0.1, -0.1), (0, 0.5, 0.5), "abc"])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(InputError, match="split_fractions"):
        split_cases(["a", "b", "c"], None, fractions)


def test_split_groups_patients_and_stratifies():
    # 60 slides of 40 patients (20 with two slides), a third tumour patients, a few unlabelled.
    ids, pats, labs = [], [], []
    for p in range(40):
        for k in range(1 + (p % 2)):
            ids.append(f"s{p:02d}_{k}")
            pats.append(f"P{p:02d}")
            labs.append(None if p >= 37 else int(p % 3 == 0))
    s = split_cases(ids, labs, (0.6, 0.2, 0.2), seed=1, patients=pats)
    assert (s.groupby("patient_id").split.nunique() == 1).all(), "a patient in two splits leaks"
    counts = s.split.value_counts()
    assert 10 <= counts["test"] <= 14 and 10 <= counts["val"] <= 14
    for sp in ("train", "val", "test"):
        assert set(s.label[s.split == sp].dropna()) == {0, 1}
    # Without patients, the same slides are split one by one: patients then land in two splits.
    by_slide = split_cases(ids, labs, (0.6, 0.2, 0.2), seed=1)
    assert (by_slide.assign(p=pats).groupby("p").split.nunique() > 1).any()


def test_split_rejects_empty_and_duplicates():
    with pytest.raises(InputError, match="empty"):
        split_cases([], None)
    with pytest.raises(InputError, match="unique"):
        split_cases(["a", "a"], None)


def test_augment_is_seeded_and_keeps_shape_and_range():
    x = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    a = augment_batch(x, generator=torch.Generator().manual_seed(0), blur_p=1.0)
    b = augment_batch(x, generator=torch.Generator().manual_seed(0), blur_p=1.0)
    c = augment_batch(x, generator=torch.Generator().manual_seed(1), blur_p=1.0)
    assert a.shape == (5, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_augment_identity_when_all_off():
    x = torch.rand(3, 3, 32, 32)
    y = augment_batch(x, rotation=0, flip=0.0, scale=(1, 1), shift=0, blur_p=0.0)
    assert torch.allclose(x, y, atol=1e-5)


def test_augment_masks_follow_geometry():
    x = torch.zeros(4, 3, 48, 48)
    m = torch.zeros(4, 1, 48, 48)
    x[:, :, 10:20, 30:40] = 1.0
    m[:, :, 10:20, 30:40] = 1.0
    xa, ma = augment_batch(x, masks=m, generator=torch.Generator().manual_seed(5), blur_p=0.0)
    assert set(torch.unique(ma).tolist()) <= {0.0, 1.0}
    # Where the mask went, the bright square went too.
    inside = xa.mean(1, keepdim=True)[ma > 0.5]
    assert float(inside.mean()) > 0.8


def test_augment_blur_lowers_variance():
    x = torch.rand(2, 3, 64, 64)
    y = augment_batch(x, rotation=0, flip=0.0, scale=(1, 1), shift=0, blur_p=1.0, blur_sigma=(1.5, 1.5))
    assert float(y.std()) < 0.6 * float(x.std())


def test_augment_rejects_bad_shape_and_probability():
    with pytest.raises(InputError, match="batch"):
        augment_batch(torch.rand(3, 32, 32))
    with pytest.raises(InputError, match="flip"):
        augment_batch(torch.rand(1, 3, 8, 8), flip=1.5)


def test_balance_repeats_minority_up_to_majority():
    labels = np.array([1] * 3 + [0] * 10 + [-1] * 4)
    idx = balance_indices(labels, seed=0)
    got = labels[idx]
    assert (got == 1).sum() == 10 and (got == 0).sum() == 10 and (got == -1).sum() == 0
    assert set(idx[got == 1]) == {0, 1, 2}  # every minority patch is used
    assert np.array_equal(idx, balance_indices(labels, seed=0))


def test_balance_needs_two_classes():
    with pytest.raises(InputError, match="only"):
        balance_indices(np.array([0, 0, -1]))
