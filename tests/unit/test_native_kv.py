"""The native quantized-KV decode kernel against the eager path (dequantize, then SDPA) it replaces."""

from __future__ import annotations

import pytest
import torch

from kvbound.kvcache import native
from kvbound.kvcache.paged import PagedCache
from kvbound.kvcache.pool import BlockPool
from kvbound.kvcache.spec import KVSpec
from kvbound.policies import make_policy

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernel is not built")

N_KV, HEADS, D, BLOCK = 2, 6, 64, 8


def new_cache(pool: BlockPool, policy: str = "none") -> PagedCache:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    return PagedCache(pool, 256, inv_freq, policy=make_policy(policy))


def step(cache: PagedCache, T: int, gen: torch.Generator) -> torch.Tensor:
    """Feed T random tokens through every layer; return each layer's attention output, stacked."""
    cache.begin(T)
    outs = []
    for layer in range(cache.spec.num_layers):
        q = torch.randn(1, HEADS, T, D, generator=gen)
        k, v = torch.randn(2, 1, N_KV, T, D, generator=gen) * 2
        outs.append(cache.attend(layer, q, k, v))
    cache.end()
    return torch.stack(outs)


def run(dtype: str, policy: str, monkeypatch, use_native: bool):
    """Two sequences interleaved in one pool (so their tables are not consecutive), prefilled in chunks then
    decoded a token at a time past block boundaries; the decode outputs and the first sequence's policy scores."""
    if not use_native:
        monkeypatch.setattr(native, "library", lambda: None)
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    pool = BlockPool(KVSpec(2, N_KV, D, dtype, "fp32", BLOCK), 64)
    a, b = new_cache(pool, policy), new_cache(pool, policy)
    gen = torch.Generator().manual_seed(0)
    for T in (13, 7, 20):
        step(a, T, gen)
        step(b, T, gen)
    outs = [step(seq, 1, gen) for _ in range(19) for seq in (a, b)]
    assert not a._contiguous()
    monkeypatch.undo()
    return torch.stack(outs), a.scores[: a.n].clone(), len(calls)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("policy", ["none", "h2o"])
def test_native_decode_matches_eager(dtype, policy, monkeypatch):
    fast, fast_scores, fast_calls = run(dtype, policy, monkeypatch, use_native=True)
    slow, slow_scores, _ = run(dtype, policy, monkeypatch, use_native=False)
    assert fast_calls == 2 * 19 * 2  # every single-token step of both layers went through the kernel
    # eager dequantizes into the fp32 scratch with the same formula; only summation order differs
    assert (fast - slow).abs().max().item() < 1e-4
    if policy == "h2o":  # the policy saw the same attention (from the kernel's logits) on the decode steps
        assert fast_scores.abs().sum() > 0
        assert torch.allclose(fast_scores, slow_scores, atol=1e-5)


def test_kernel_reads_residual_and_scattered_blocks():
    """decode_attention on hand-made storage against a plain softmax over the dequantized rows."""
    from kvbound.kvcache import quant

    gen = torch.Generator().manual_seed(1)
    blocks, rest, g = 5, 3, HEADS // N_KV
    keys = torch.randn(N_KV, blocks * BLOCK, D, generator=gen)
    values = torch.randn(N_KV, blocks * BLOCK, D, generator=gen)
    table = torch.tensor([3, 0, 4, 1, 2])  # sequence order -> pool block
    pool = BlockPool(KVSpec(1, N_KV, D, "int8", "fp32", BLOCK), blocks)
    deq_k, deq_v = torch.empty_like(keys), torch.empty_like(values)
    for i, blk in enumerate(table.tolist()):
        seq, slot = slice(i * BLOCK, (i + 1) * BLOCK), slice(blk * BLOCK, (blk + 1) * BLOCK)
        codes, pool.k_scale[0, :, blk], pool.k_zero[0, :, blk] = quant.quantize_keys(keys[:, seq], 8)
        pool.k[0, :, slot] = codes
        quant.dequantize_keys(codes, pool.k_scale[0, :, blk:blk + 1], pool.k_zero[0, :, blk:blk + 1], 8, BLOCK,
                              deq_k[:, seq])
        codes, pool.v_scale[0, :, slot], pool.v_zero[0, :, slot] = quant.quantize_values(values[:, seq], 8, 32)
        pool.v[0, :, slot] = codes
        quant.dequantize_values(codes, pool.v_scale[0, :, slot], pool.v_zero[0, :, slot], 8, 32, deq_v[:, seq])
    res_k, res_v = torch.randn(2, N_KV, rest, D, generator=gen)
    q = torch.randn(HEADS, D, generator=gen)
    out, logits = native.decode_attention(q, pool.k[0], pool.k_scale[0], pool.k_zero[0], pool.v[0], pool.v_scale[0],
                                          pool.v_zero[0], block=BLOCK, group=32, bits=8, table=table,
                                          res_k=res_k, res_v=res_v, with_scores=True)
    all_k, all_v = torch.cat((deq_k, res_k), 1), torch.cat((deq_v, res_v), 1)  # (n_kv, S, D)
    ref_logits = q.view(N_KV, g, D) @ all_k.transpose(1, 2) / D ** 0.5
    ref = torch.softmax(ref_logits, -1) @ all_v
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert torch.allclose(out, ref.reshape(HEADS, D), atol=1e-5)


def test_disabled_or_unbuildable_falls_back(monkeypatch, tmp_path):
    """KVBOUND_NATIVE=0 turns the kernel off; a compiler that fails leaves the eager path, with the reason logged."""
    native.library.cache_clear()
    try:
        monkeypatch.setenv("KVBOUND_NATIVE", "0")
        assert native.library() is None
        native.library.cache_clear()
        monkeypatch.setenv("KVBOUND_NATIVE", "1")
        monkeypatch.setenv("KVBOUND_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("CC", "false")  # exits 1: the build fails
        assert native.library() is None
        assert not list(tmp_path.rglob("*.so"))
        native.library.cache_clear()
        monkeypatch.delenv("CC")
        assert native.library() is not None  # built afresh into the new cache directory
        assert len(list(tmp_path.rglob("qattn-*.so"))) == 1
    finally:
        native.library.cache_clear()
