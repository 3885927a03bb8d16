"""The running key moments (kvcache/moments.py): merged step by step they equal the mean and covariance of every
key at once, in float32 even when the keys share a large offset."""

from __future__ import annotations

import torch

from kvbound.kvcache.moments import KeyMoments


def test_steps_merge_to_the_moments_of_all_keys():
    gen = torch.Generator().manual_seed(0)
    keys = [300.0 + torch.randn(2, t, 8, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 8, dtype=torch.float64)
            for t in (1, 7, 64, 3, 200)]  # a mean far larger than the spread: raw second moments would cancel
    moments = KeyMoments.zeros(layers=3, kv_heads=2, head_dim=8)
    for step in keys:
        moments.add(1, step.float())
    every = torch.cat(keys, dim=1)  # (2, 275, 8)
    mean, cov = moments.layer(1)
    assert int(moments.count[1]) == 275 and moments.layer(0) is None and moments.layer(2) is None
    assert torch.allclose(mean.double(), every.mean(1), rtol=1e-6)
    for head in range(2):
        expected = torch.cov(every[head].T, correction=0)
        assert torch.allclose(cov[head].double(), expected, rtol=1e-3, atol=1e-3 * expected.diagonal().mean())


def test_export_and_load_round_trip():
    moments = KeyMoments.zeros(2, 1, 4)
    moments.add(0, torch.randn(1, 5, 4))
    copy = KeyMoments.zeros(2, 1, 4)
    copy.load(moments.export())
    assert all(torch.equal(getattr(moments, t), getattr(copy, t)) for t in ("count", "mean", "scatter"))
    assert moments.nbytes == 2 * 8 + 2 * 4 * 4 + 2 * 16 * 4
