"""The native decode kernels (quantized and float KV, blocks read through the table) against the eager path they
replace and against a float64 softmax."""

from __future__ import annotations

import pytest
import torch

from kvbound.kvcache import native, storage
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
    entry = "decode_attention" if dtype.startswith("int") else "decode_attention_float"
    real = getattr(native, entry)
    monkeypatch.setattr(native, entry, lambda *a, **kw: (calls.append(1) if use_native else None) or real(*a, **kw))
    pool = BlockPool(KVSpec(2, N_KV, D, dtype, "fp32", BLOCK), 64)
    a, b = new_cache(pool, policy), new_cache(pool, policy)
    gen = torch.Generator().manual_seed(0)
    for T in (13, 7, 20):
        step(a, T, gen)
        step(b, T, gen)
    outs = [step(seq, 1, gen) for _ in range(19) for seq in (a, b)]
    assert not storage.consecutive(list(a.table))
    monkeypatch.undo()
    return torch.stack(outs), a.view().scores.clone(), len(calls)


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("policy", ["none", "h2o"])
def test_native_decode_matches_eager(dtype, policy, monkeypatch):
    fast, fast_scores, fast_calls = run(dtype, policy, monkeypatch, use_native=True)
    slow, slow_scores, _ = run(dtype, policy, monkeypatch, use_native=False)
    assert fast_calls == 2 * 19 * 2  # every single-token step of both layers went through the kernel
    # eager dequantizes (or widens) into fp32 with the same formula; only summation order differs
    assert (fast - slow).abs().max().item() < 1e-4
    if policy == "h2o":  # the policy saw the same attention (from the kernel's logits) on the decode steps
        assert fast_scores.abs().sum() > 0
        assert torch.allclose(fast_scores, slow_scores, atol=1e-5)


def stored(blocks: int, bits: int, gen: torch.Generator) -> tuple[BlockPool, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A one-layer pool of random codes and scales, its blocks in shuffled sequence order; returns the pool, the
    table, and the keys/values (n_kv, S, D) it dequantizes to, in sequence order."""
    from kvbound.kvcache import quant

    pool = BlockPool(KVSpec(1, N_KV, D, f"int{bits}", "fp32", BLOCK), blocks)
    pool.k[0] = torch.randint(0, 256, pool.k[0].shape, dtype=torch.uint8, generator=gen)
    pool.v[0] = torch.randint(0, 256, pool.v[0].shape, dtype=torch.uint8, generator=gen)
    for t in (pool.k_scale, pool.v_scale):
        t[0] = (torch.rand(t[0].shape, generator=gen) * 0.1 + 0.01).half()
    for t in (pool.k_zero, pool.v_zero):
        t[0] = (torch.randn(t[0].shape, generator=gen)).half()
    table = torch.randperm(blocks, generator=gen)
    slots = (table[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
    keys = quant.dequantize_keys(pool.k[0][:, slots], pool.k_scale[0][:, table], pool.k_zero[0][:, table], bits,
                                 BLOCK, torch.empty(N_KV, blocks * BLOCK, D))
    values = quant.dequantize_values(pool.v[0][:, slots], pool.v_scale[0][:, slots], pool.v_zero[0][:, slots], bits,
                                     32, torch.empty(N_KV, blocks * BLOCK, D))
    return pool, table, keys, values


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("blocks,threads", [(5, 1), (97, 1), (97, 2), (97, 3), (200, 16)])
def test_kernel_matches_softmax_over_dequantized_rows(bits, blocks, threads):
    """decode_attention on scattered blocks plus a residual window, on one thread or split among several, against a
    plain softmax over the dequantized rows."""
    gen = torch.Generator().manual_seed(blocks * 10 + bits)
    pool, table, keys, values = stored(blocks, bits, gen)
    rest, g = 3, HEADS // N_KV
    res_k, res_v = torch.randn(2, N_KV, rest, D, generator=gen)
    q = torch.randn(HEADS, D, generator=gen) * 3
    out, logits = native.decode_attention(q, pool.k[0], pool.k_scale[0], pool.k_zero[0], pool.v[0], pool.v_scale[0],
                                          pool.v_zero[0], block=BLOCK, group=32, bits=bits, table=table,
                                          res_k=res_k, res_v=res_v, with_scores=True, threads=threads)
    all_k, all_v = torch.cat((keys, res_k), 1).double(), torch.cat((values, res_v), 1).double()  # (n_kv, S, D)
    ref_logits = q.view(N_KV, g, D).double() @ all_k.transpose(1, 2) / D ** 0.5
    ref = torch.softmax(ref_logits, -1) @ all_v
    assert torch.allclose(logits.double(), ref_logits, rtol=1e-5, atol=1e-4)
    assert torch.allclose(out.double(), ref.reshape(HEADS, D), rtol=1e-4, atol=1e-5)


FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("kv", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("q_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("blocks,held,threads", [(1, 1, 1), (5, 37, 1), (97, 97 * BLOCK, 1), (97, 771, 2),
                                                 (97, 770, 3), (200, 1595, 16)])
def test_float_kernel_matches_float64_softmax(kv, q_dtype, blocks, held, threads):
    """decode_attention_float on scattered blocks whose last one is partly filled, on one thread or split among
    several, against a float64 softmax over the rows the table names. Slots past `held` hold garbage (huge values)
    that must not leak into the result."""
    gen = torch.Generator().manual_seed(blocks * 7 + held)
    dtype = FLOATS[kv]
    pool = BlockPool(KVSpec(1, N_KV, D, kv, "fp32", BLOCK), blocks + 3)
    pool.k[0] = (torch.randn(pool.k[0].shape, generator=gen) * 2).to(dtype)
    pool.v[0] = torch.randn(pool.v[0].shape, generator=gen).to(dtype)
    table = torch.randperm(blocks + 3, generator=gen)[:blocks]
    slots = (table[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
    pool.k[0][:, slots[held:]] = 3e4  # written by nobody: past the sequence's end
    pool.v[0][:, slots[held:]] = 3e4
    q = (torch.randn(HEADS, D, generator=gen) * 3).to(FLOATS[q_dtype])
    out, logits = native.decode_attention_float(q, pool.k[0], pool.v[0], block=BLOCK, table=table, held=held,
                                                with_scores=True, threads=threads)
    g = HEADS // N_KV
    keys, values = pool.k[0][:, slots[:held]].double(), pool.v[0][:, slots[:held]].double()  # (n_kv, held, D)
    ref_logits = q.view(N_KV, g, D).double() @ keys.transpose(1, 2) / D ** 0.5
    ref = (torch.softmax(ref_logits, -1) @ values).reshape(HEADS, D)
    assert out.dtype == q.dtype and logits.shape == (N_KV, g, held)
    assert torch.allclose(logits.double(), ref_logits, rtol=1e-5, atol=1e-4)
    tol = 1e-5 if q_dtype == "fp32" else 1e-2  # bf16 output: one rounding of a value of magnitude ~1
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol)


def test_float_kernel_refuses_an_inconsistent_length():
    """`held` past the table's blocks (or short of its last block) would read another sequence's slots: refused."""
    pool = BlockPool(KVSpec(1, N_KV, D, "fp32", "fp32", BLOCK), 4)
    q, table = torch.randn(HEADS, D), torch.tensor([2, 0])
    assert native.decode_attention_float(q, pool.k[0], pool.v[0], block=BLOCK, table=table,
                                         held=2 * BLOCK + 1) is None
    assert native.decode_attention_float(q, pool.k[0], pool.v[0], block=BLOCK, table=table, held=BLOCK) is None


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
