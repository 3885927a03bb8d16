"""Reading and writing one layer of a sequence's K/V in the pool, through the block table it is given: float
slots written and read in place (a view when the table is one run of blocks, else a gather into the pool's
scratch), quantized blocks written whole from the residual window and read dequantized. No metadata here."""

from __future__ import annotations

import torch

from kvbound.kvcache import quant
from kvbound.kvcache.pool import BlockPool


def slots(pool: BlockPool, table: list[int], count: int) -> torch.Tensor:
    """Pool slot of each of the first `count` tokens of a sequence with block table `table`, in order."""
    B = pool.spec.block_size
    blocks = torch.tensor(table, dtype=torch.long, device=pool.device)
    return (blocks[:, None] * B + torch.arange(B, device=pool.device)[None, :]).flatten()[:count]


def consecutive(table: list[int]) -> bool:
    """Whether the table is one run of blocks (its slots are one view of the pool)."""
    return all(b == table[0] + i for i, b in enumerate(table))


def write_float(pool: BlockPool, layer: int, where: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v (n_kv, T, D) into float pool slots `where` (T,)."""
    pool.k[layer].index_copy_(1, where, k.to(pool.k.dtype))
    pool.v[layer].index_copy_(1, where, v.to(pool.v.dtype))


def read_float(pool: BlockPool, layer: int, table: list[int], count: int, run: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` tokens of one layer, (n_kv, count, D) each: a view if `run` (the table is consecutive)."""
    B = pool.spec.block_size
    if run:
        first = table[0] * B
        return pool.k[layer, :, first:first + count], pool.v[layer, :, first:first + count]
    k_out, v_out = pool.scratch(count)
    where = slots(pool, table, count)
    if pool.k.dtype == k_out.dtype:  # gather straight into the preallocated scratch
        torch.index_select(pool.k[layer], 1, where, out=k_out)
        torch.index_select(pool.v[layer], 1, where, out=v_out)
    else:
        k_out.copy_(pool.k[layer].index_select(1, where))
        v_out.copy_(pool.v[layer].index_select(1, where))
    return k_out, v_out


def read_quantized(pool: BlockPool, layer: int, table: list[int], count: int, run: bool, res_k: torch.Tensor,
                   res_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` tokens of one layer in the compute dtype, in the pool's scratch: whole blocks dequantized,
    the rest from the residual window res_k/res_v (n_kv, B, D)."""
    spec, B = pool.spec, pool.spec.block_size
    pooled = spec.pooled(count)
    k_out, v_out = pool.scratch(count)
    if pooled:
        nblocks = pooled // B
        if run:
            first = table[0]
            s0, s1 = first * B, (first + nblocks) * B
            kc, vc = pool.k[layer, :, s0:s1], pool.v[layer, :, s0:s1]
            ks, kz = pool.k_scale[layer, :, first:first + nblocks], pool.k_zero[layer, :, first:first + nblocks]
            vs, vz = pool.v_scale[layer, :, s0:s1], pool.v_zero[layer, :, s0:s1]
        else:
            where = slots(pool, table, pooled)
            blocks = torch.tensor(table[:nblocks], dtype=torch.long, device=pool.device)
            kc, vc = pool.k[layer].index_select(1, where), pool.v[layer].index_select(1, where)
            ks, kz = pool.k_scale[layer].index_select(1, blocks), pool.k_zero[layer].index_select(1, blocks)
            vs, vz = pool.v_scale[layer].index_select(1, where), pool.v_zero[layer].index_select(1, where)
        quant.dequantize_keys(kc, ks, kz, spec.bits, B, k_out[:, :pooled])
        quant.dequantize_values(vc, vs, vz, spec.bits, spec.group, v_out[:, :pooled])
    rest = count - pooled
    k_out[:, pooled:count] = res_k[:, :rest]
    v_out[:, pooled:count] = res_v[:, :rest]
    return k_out, v_out


def store_block(pool: BlockPool, layer: int, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Quantize one whole block of k, v (n_kv, B, D) into pool block `block`."""
    spec, B = pool.spec, pool.spec.block_size
    codes, scale, zero = quant.quantize_keys(k, spec.bits)
    pool.k[layer, :, block * B:(block + 1) * B] = codes
    pool.k_scale[layer, :, block], pool.k_zero[layer, :, block] = scale, zero
    codes, scale, zero = quant.quantize_values(v, spec.bits, spec.group)
    pool.v[layer, :, block * B:(block + 1) * B] = codes
    pool.v_scale[layer, :, block * B:(block + 1) * B] = scale
    pool.v_zero[layer, :, block * B:(block + 1) * B] = zero


def write_quantized(pool: BlockPool, layer: int, table: list[int], start: int, k: torch.Tensor, v: torch.Tensor,
                    res_k: torch.Tensor, res_v: torch.Tensor) -> None:
    """Append k, v (n_kv, T, D) after `start` held tokens: fill the residual window res_k/res_v (n_kv, B, D) and
    quantize each block that fills into its pool block."""
    B, T = pool.spec.block_size, k.shape[1]
    before, after = pool.spec.pooled(start), pool.spec.pooled(start + T)
    r = start - before
    if after == before:
        res_k[:, r:r + T] = k
        res_v[:, r:r + T] = v
        return
    k_all = torch.cat((res_k[:, :r], k.to(res_k.dtype)), dim=1)  # (n_kv, r+T, D)
    v_all = torch.cat((res_v[:, :r], v.to(res_v.dtype)), dim=1)
    for i in range((after - before) // B):
        store_block(pool, layer, table[before // B + i], k_all[:, i * B:(i + 1) * B], v_all[:, i * B:(i + 1) * B])
    done, rest = after - before, start + T - after
    res_k[:, :rest] = k_all[:, done:done + rest]
    res_v[:, :rest] = v_all[:, done:done + rest]


def rewrite(pool: BlockPool, layer: int, table: list[int], first: int, held: int, k: torch.Tensor, v: torch.Tensor,
            res_k: torch.Tensor | None, res_v: torch.Tensor | None) -> None:
    """Write tokens first..held-1 of a sequence (k, v: (n_kv, held-first, D)) over what it holds there: float slots
    in place; quantized whole blocks re-quantized and the partial tail put back in the residual window."""
    if res_k is None:
        write_float(pool, layer, slots(pool, table, held)[first:], k, v)
        return
    B, pooled = pool.spec.block_size, pool.spec.pooled(held)
    for b in range(first // B, pooled // B):
        lo = b * B - first
        store_block(pool, layer, table[b], k[:, lo:lo + B], v[:, lo:lo + B])
    rest = held - max(pooled, first)
    res_k[:, :rest] = k[:, k.shape[1] - rest:].to(res_k.dtype)
    res_v[:, :rest] = v[:, v.shape[1] - rest:].to(res_v.dtype)
