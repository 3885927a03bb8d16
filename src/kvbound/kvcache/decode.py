"""Single-token steps on the native kernels over a paged cache's blocks, read in place: one layer's attention
(`attend_native`), or the plan a native whole-model step follows (`plan`, models/native_step.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvbound.kvcache import native
from kvbound.kvcache.base import DecodePlan

if TYPE_CHECKING:
    from kvbound.kvcache.paged import PagedCache


def attend_native(cache: "PagedCache", layer: int, q: torch.Tensor, count: int) -> torch.Tensor | None:
    """A single-query step with the native kernel, reading the blocks in place (None: use the eager path)."""
    pool, spec, blocks = cache.pool, cache.spec, cache.step.blocks
    observe = cache.policy.needs_attention
    if spec.quantized:
        rest = count - blocks.numel() * spec.block_size
        done = native.decode_attention(
            q[0, :, 0], pool.k[layer], pool.k_scale[layer], pool.k_zero[layer], pool.v[layer],
            pool.v_scale[layer], pool.v_zero[layer], block=spec.block_size, group=spec.group, bits=spec.bits,
            table=blocks, res_k=cache.res_k[layer, :, :rest], res_v=cache.res_v[layer, :, :rest],
            with_scores=observe)
    else:
        done = native.decode_attention_float(q[0, :, 0], pool.k[layer], pool.v[layer], block=spec.block_size,
                                             table=blocks, held=count, with_scores=observe)
    if done is None:
        return None
    out, logits = done
    if observe:
        cache.observe(layer, logits)
    return out.view(1, -1, 1, q.shape[-1])


def plan(cache: "PagedCache") -> DecodePlan | None:
    """The begun step as a native whole-model step sees it, when it is one token on the CPU with nothing masked;
    None otherwise. A quantized cache's token goes into the residual window; the step that fills a block runs
    eagerly (it quantizes the block)."""
    step, pool, spec = cache.step, cache.pool, cache.spec
    if step is None or pool.device.type != "cpu" or step.count != 1 or step.mask is not None:
        return None
    observe, held = cache.policy.needs_attention, step.start + 1
    if not spec.quantized:
        return DecodePlan(pool.k, pool.v, spec.block_size, int(step.new_slots[0]), step.blocks, held, observe)
    rest = step.start % spec.block_size
    if rest + 1 >= spec.block_size:
        return None
    return DecodePlan(pool.k, pool.v, spec.block_size, -1, step.blocks, held, observe, pool.k_scale, pool.k_zero,
                      pool.v_scale, pool.v_zero, spec.bits, spec.group, cache.res_k, cache.res_v, rest)
