"""KIVI-style asymmetric quantization of one block: keys per channel (over the block's tokens), values per
token in groups of channels. int4 packs two codes per byte. Pure functions; storage lives in the pool."""

from __future__ import annotations

import torch


def quantize(x: torch.Tensor, bits: int, reduce_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float (..., n) → (codes uint8, scale fp16, zero fp16) with min/max over `reduce_dim` (kept as size 1)."""
    levels = (1 << bits) - 1
    xf = x.float()
    lo = xf.amin(dim=reduce_dim, keepdim=True)
    hi = xf.amax(dim=reduce_dim, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    codes = ((xf - lo) / scale).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale.half(), lo.half()


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """(..., D) codes in [0, 15] → (..., D/2) bytes, element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """(..., D/2) bytes → (..., D) codes."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def quantize_keys(k: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k: (n_kv, B, D) → codes (n_kv, B, D or D/2), scale/zero (n_kv, D): one pair per channel."""
    codes, scale, zero = quantize(k, bits, reduce_dim=1)
    return (pack4(codes) if bits == 4 else codes), scale[:, 0], zero[:, 0]


def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v: (n_kv, B, D) → codes (n_kv, B, D or D/2), scale/zero (n_kv, B, D/group): one pair per token group."""
    n_kv, B, D = v.shape
    codes, scale, zero = quantize(v.reshape(n_kv, B, D // group, group), bits, reduce_dim=3)
    codes = codes.reshape(n_kv, B, D)
    return (pack4(codes) if bits == 4 else codes), scale[..., 0], zero[..., 0]


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, block: int,
                    out: torch.Tensor) -> torch.Tensor:
    """codes (n_kv, n*B, D') with scale/zero (n_kv, n, D) → out (n_kv, n*B, D) in out's dtype."""
    n_kv, S, D = out.shape
    out.copy_(unpack4(codes) if bits == 4 else codes)
    view = out.view(n_kv, S // block, block, D)
    view.mul_(scale[:, :, None, :].to(out.dtype)).add_(zero[:, :, None, :].to(out.dtype))
    return out


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                      out: torch.Tensor) -> torch.Tensor:
    """codes (n_kv, S, D') with scale/zero (n_kv, S, D/group) → out (n_kv, S, D)."""
    n_kv, S, D = out.shape
    out.copy_(unpack4(codes) if bits == 4 else codes)
    view = out.view(n_kv, S, D // group, group)
    view.mul_(scale[..., None].to(out.dtype)).add_(zero[..., None].to(out.dtype))
    return out
