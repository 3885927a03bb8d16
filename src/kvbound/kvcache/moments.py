"""The running mean and covariance of every key a sequence has written, per layer and KV head, before RoPE.

A policy that ranks held keys by how unusual they are (compactor's leverage) needs a reference. The held keys
alone are a poor one under a streaming budget: after a few evictions they are the survivors of earlier rankings,
all unusual, and the needle that stood out from the whole prompt no longer stands out among them. These moments
describe the whole text the sequence has seen, evicted or not, in D + D² numbers per layer and head, so a token's
score no longer depends on which others happen to be held (kvpress scores a prompt against all of it too, but
must hold all of it to do so).

Each multi-token step is merged with the pairwise update of Chan, Golub & LeVeque (1979): the step's own mean and
centred scatter, then one correction for the shift of the mean, which stays accurate in float32 over millions
of tokens where summing raw second moments would cancel catastrophically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class KeyMoments:
    count: torch.Tensor  # (L,) int64 on the CPU (read every step; no device sync): keys merged per layer
    mean: torch.Tensor  # (L, n_kv, D) float32
    scatter: torch.Tensor  # (L, n_kv, D, D) float32: Σ (x - mean)(x - mean)ᵀ

    @classmethod
    def zeros(cls, layers: int, kv_heads: int, head_dim: int, device: torch.device | str = "cpu") -> "KeyMoments":
        return cls(torch.zeros(layers, dtype=torch.long),
                   torch.zeros(layers, kv_heads, head_dim, dtype=torch.float32, device=device),
                   torch.zeros(layers, kv_heads, head_dim, head_dim, dtype=torch.float32, device=device))

    @property
    def nbytes(self) -> int:
        return self.count.nbytes + self.mean.nbytes + self.scatter.nbytes

    def add(self, layer: int, keys: torch.Tensor) -> None:
        """Merge one layer's new keys, (n_kv, T, D) before RoPE."""
        keys = keys.float()
        seen, new = int(self.count[layer]), keys.shape[1]
        if new == 0:
            return
        step_mean = keys.mean(dim=1)
        centred = keys - step_mean[:, None]
        delta = step_mean - self.mean[layer]
        total = seen + new
        self.mean[layer] += delta * (new / total)
        self.scatter[layer] += centred.transpose(1, 2) @ centred + delta[:, :, None] * delta[:, None, :] * (
            seen * new / total)
        self.count[layer] = total

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean (n_kv, D), covariance (n_kv, D, D)) of the keys merged into `layer`, or None before any."""
        seen = int(self.count[layer])
        return (self.mean[layer], self.scatter[layer] / seen) if seen else None

    def export(self) -> dict[str, Any]:
        return {"count": self.count.to("cpu", copy=True), "mean": self.mean.to("cpu", copy=True),
                "scatter": self.scatter.to("cpu", copy=True)}

    def load(self, state: dict[str, Any]) -> None:
        for name in ("count", "mean", "scatter"):
            getattr(self, name).copy_(state[name])
