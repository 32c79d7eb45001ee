"""Capture shifts drawn on meta-training episodes (HyperFlow.fit(augment=...))."""
import pytest
import torch

from hyperflow_ext.flow import AUGMENTATIONS, EpisodeAugmenter, augment_episode


def _episode(seed=0, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    sx = lo + (hi - lo) * torch.rand(6, 1, 12, 12, generator=g)
    qx = lo + (hi - lo) * torch.rand(9, 1, 12, 12, generator=g)
    return sx, torch.arange(3).repeat_interleave(2), qx, torch.arange(3).repeat_interleave(3), "toy"


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_each_shift_changes_the_images_keeps_labels_and_range(name):
    for lo, hi in ((0.0, 1.0), (-2.1, 2.6)):  # [0, 1] images and normalised ones
        ep = _episode(lo=lo, hi=hi)
        out = augment_episode(ep, torch.Generator().manual_seed(3), shifts=[name], max_shifts=1)
        assert out[0].shape == ep[0].shape and out[2].shape == ep[2].shape
        assert torch.equal(out[1], ep[1]) and torch.equal(out[3], ep[3]) and out[4] == "toy"
        assert not torch.allclose(out[0], ep[0]) and not torch.allclose(out[2], ep[2])
        both = torch.cat([out[0], out[2]])
        assert both.min() >= lo - 1e-5 and both.max() <= hi + 1e-5 and torch.isfinite(both).all()


def test_support_and_query_see_the_same_shift():
    ep = _episode()
    same = (ep[0], ep[1], ep[0].clone(), ep[1])  # the query set is a copy of the support set
    out = augment_episode(same, torch.Generator().manual_seed(5), shifts=["invert", "rotate", "gamma"])
    torch.testing.assert_close(out[0], out[2])


def test_the_augmenter_is_deterministic_per_index_and_shifts_its_share():
    eps = [_episode(seed=i) for i in range(40)]
    aug = EpisodeAugmenter(probability=0.5, seed=1)
    a, b = aug(eps), aug(eps)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    changed = sum(not torch.equal(x[0], e[0]) for x, e in zip(a, eps))
    assert 10 <= changed <= 30  # about half, drawn per episode
    assert all(torch.equal(x[0], e[0]) for x, e in zip(EpisodeAugmenter(probability=0.0)(eps), eps))
    assert EpisodeAugmenter.from_setting(False) is None and EpisodeAugmenter.from_setting(None) is None
    assert EpisodeAugmenter.from_setting(["blur"]).shifts == ("blur",)
    with pytest.raises(ValueError, match="shifts must be names"):
        EpisodeAugmenter(["sepia"])
    with pytest.raises(ValueError, match="probability"):
        EpisodeAugmenter(probability=1.5)
