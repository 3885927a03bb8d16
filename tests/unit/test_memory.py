"""Memory transparency on tiny random-weight configs: the estimator's KV bytes equal the allocator's, its weights
bytes the model's, its activation term the bytes torch really holds (profiler); the guard's thresholds fire once per
upward crossing; the ledger's KV bytes are the pool's; refusals carry their numbers."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
import weakref
from types import SimpleNamespace

import pytest
import torch
import typer
from typer.testing import CliRunner

import kvbound
from kvbound.config import CacheConfig, ModelConfig
from kvbound.errors import MemoryBudgetExceeded
from kvbound.kvcache.factory import build_cache
from kvbound.kvcache.spec import FLOAT_DTYPES, KV_DTYPE_NAMES
from kvbound.memory import Ledger, MemoryGuard, estimate
from kvbound.memory.estimate import activation_bytes
from kvbound.memory.guard import MemoryWarning, admit_turn, fitting_chunk, predict_turn_peak
from kvbound.memory.ledger import process_memory
from kvbound.models.llama import LlamaModel

TINY = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_context=512)
CONFIGS = {
    "llama": TINY,
    "qwen2-bias": ModelConfig("qwen2", 128, 64, 96, 2, 4, 1, 16, 512, attention_bias=True),
    "tied": ModelConfig("llama", 128, 64, 96, 3, 4, 2, 16, 512, tie_embeddings=True),
}
# Big enough that activations, not allocator bookkeeping, dominate what the profiler sees.
SMALL = ModelConfig("llama", vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=2, num_heads=8,
                    num_kv_heads=2, head_dim=32, max_context=2048)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> LlamaModel:
    with torch.device("meta"):
        shapes = [(name, p.shape) for name, p in LlamaModel(config).named_parameters()]
    generator = torch.Generator().manual_seed(0)
    return LlamaModel.from_tensors(config, ((n, (torch.randn(s, generator=generator) * 0.1).to(dtype))
                                            for n, s in shapes))


def real_kv_bytes(cache) -> int:
    """What the allocator holds: every pool tensor plus the residual window, counted from the tensors."""
    residual = [cache.res_k, cache.res_v] if cache.spec.quantized else []
    return sum(t.nbytes for t in [*cache.pool.tensors(), *residual])


# ---- estimator -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", ["auto", *KV_DTYPE_NAMES])
@pytest.mark.parametrize("sizing", [{"context": 100}, {"context": 512}, {"context": 4096},
                                    {"kv_budget": "100KiB"}, {"kv_budget": 300_000}, {"kv_budget": "64MiB"}])
def test_kv_bytes_equal_the_pool(kv_dtype: str, sizing: dict) -> None:
    est = estimate(TINY, kv_dtype=kv_dtype, dtype="fp32", **sizing)
    options = {"budget": sizing["kv_budget"]} if "kv_budget" in sizing else {"tokens": sizing["context"]}
    cache = build_cache(TINY, CacheConfig(dtype=kv_dtype, **options), "fp32", torch.ones(8))
    assert est.kv_bytes == real_kv_bytes(cache)
    assert est.capacity_tokens == cache.capacity
    if "kv_budget" in sizing:
        assert est.max_context_tokens == cache.capacity
        assert est.kv_bytes <= est.kv_budget_bytes  # the budget is honoured, scales and residual included


def test_sessions_multiply_the_kv_bytes() -> None:
    one = estimate(TINY, context=256, kv_dtype="int8")
    three = estimate(TINY, context=256, kv_dtype="int8", sessions=3)
    assert three.kv_bytes == 3 * one.kv_bytes and three.workspace_bytes == 3 * one.workspace_bytes
    assert three.activation_peak_bytes == one.activation_peak_bytes  # one prefill at a time
    assert three.total_peak_bytes > one.total_peak_bytes


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weights_bytes_equal_the_parameters(name: str, dtype: str) -> None:
    config = CONFIGS[name]
    model = random_model(config, FLOAT_DTYPES[dtype])
    assert estimate(config, context=64, dtype=dtype).weights_bytes == sum(p.nbytes for p in model.parameters())


def test_total_is_the_larger_of_loading_and_a_turn() -> None:
    e = estimate(TINY, context=300, kv_dtype="int4", sessions=2)
    assert e.run_peak_bytes == (e.baseline_bytes + e.weights_bytes + e.kv_bytes + e.cache_metadata_bytes
                                + e.workspace_bytes + e.activation_peak_bytes)
    assert e.load_peak_bytes == e.baseline_bytes + e.loader_bytes + e.weights_bytes
    assert e.total_peak_bytes == max(e.load_peak_bytes, e.run_peak_bytes)
    assert e.baseline_bytes == e.runtime_bytes + e.tokenizer_bytes
    data = e.to_dict()
    assert {"weights_bytes", "kv_bytes", "activation_peak_bytes", "baseline_bytes", "total_peak_bytes"} <= set(data)
    json.dumps(data)


def test_device_memory_holds_no_loader_or_tokenizer(tiny_gguf) -> None:
    cpu, cuda = estimate(tiny_gguf, context=64, device="cpu"), estimate(tiny_gguf, context=64, device="cuda")
    assert cpu.loader_bytes > 0 and cpu.tokenizer_bytes > 0
    assert cuda.loader_bytes == cuda.tokenizer_bytes == 0 and cuda.dtype == "bf16"
    assert cuda.total_peak_bytes == cuda.run_peak_bytes


def peak_live_bytes(model: LlamaModel, cache, tokens: int) -> int:
    """Most bytes torch's CPU allocator held at once during one forward step (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(ids, cache)
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype,kv_dtype", [("fp32", "auto"), ("bf16", "auto"), ("fp32", "fp16"), ("fp32", "int8")])
@pytest.mark.parametrize("held", [0, 960])
def test_activation_term_matches_the_profiler(dtype: str, kv_dtype: str, held: int) -> None:
    """The shape-derived activation bytes of a 64-token chunk after `held` tokens, against what torch allocated
    (the pool's scratch, allocated on the first quantized read, is a separate term)."""
    model = random_model(SMALL, FLOAT_DTYPES[dtype])
    cache = build_cache(SMALL, CacheConfig(tokens=1024, dtype=kv_dtype), dtype, model.inv_freq)
    if held:
        model(torch.randint(0, SMALL.vocab_size, (1, held)), cache)
    scratch_before = cache.pool.workspace_bytes
    measured = peak_live_bytes(model, cache, 64) - (cache.pool.workspace_bytes - scratch_before)
    predicted = activation_bytes(SMALL, cache.spec, 64, held + 64, "cpu")
    assert 0.75 * measured <= predicted <= 1.35 * measured, (predicted, measured)


def test_memory_budget_inverse_is_the_longest_context_that_fits() -> None:
    budget = estimate(TINY, context=300).total_peak_bytes
    e = estimate(TINY, context=16, memory_budget=budget)
    assert e.max_context_tokens >= 300
    assert estimate(TINY, context=e.max_context_tokens).total_peak_bytes <= budget
    if e.max_context_tokens < TINY.max_context:
        assert estimate(TINY, context=e.max_context_tokens + 1).total_peak_bytes > budget
    assert e.turns_that_fit(budget, 100) == e.max_context_tokens // 100
    assert estimate(TINY, context=16, memory_budget=1000).max_context_tokens == 0  # not even the runtime fits


def test_estimate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="KV dtype"):
        estimate(TINY, context=64, kv_dtype="int3")
    with pytest.raises(ValueError, match="device"):
        estimate(TINY, context=64, device="tpu")
    with pytest.raises(ValueError, match="chunk"):
        estimate(TINY, context=64, chunk=0)
    assert estimate(TINY, context=64, device="cuda").dtype == "bf16"  # planning for a GPU needs none


# ---- guard ---------------------------------------------------------------------------------------------------------
def test_thresholds_fire_once_per_upward_crossing_and_rearm_below(caplog) -> None:
    guard = MemoryGuard(1000)
    seen = []
    guard.on_event(seen.append)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, "kvbound.memory"):
        warnings.simplefilter("always")
        steps = {500: [], 850: ["warning"], 900: [], 960: ["critical"], 990: [], 700: [], 820: ["warning"],
                 999: ["critical"], 100: [], 1200: ["warning", "critical"]}
        for used, kinds in steps.items():
            assert [e.kind for e in guard.check(used)] == kinds, used
    assert [e.kind for e in seen] == ["warning", "critical", "warning", "critical", "warning", "critical"]
    assert [e.threshold for e in seen[:2]] == [0.8, 0.95]
    assert seen[0].used_bytes == 850 and seen[0].budget_bytes == 1000 and seen[0].fraction == pytest.approx(0.85)
    assert sum(issubclass(w.category, MemoryWarning) for w in caught) == 6
    assert len([r for r in caplog.records if r.name == "kvbound.memory"]) == 6


def test_guard_validates_thresholds() -> None:
    with pytest.raises(ValueError):
        MemoryGuard("1GiB", thresholds=(0.5, 1.5))
    assert MemoryGuard("1GiB").budget_bytes == 1 << 30


def test_refusal_carries_the_numbers_and_a_suggestion() -> None:
    guard = MemoryGuard(1000)
    seen = []
    guard.on_event(seen.append)
    with pytest.raises(MemoryBudgetExceeded) as info:
        guard.admit(1500, used_bytes=900)
    error = info.value
    assert (error.needed, error.available, error.budget) == (1500, 100, 1000)
    assert "--kv-dtype int8" in str(error) and "1000 B" in str(error)
    assert [e.kind for e in seen] == ["refused"]
    assert guard.admit(800, used_bytes=700) == []


def test_ladder_runs_in_order_until_the_turn_fits() -> None:
    guard = MemoryGuard(1000)
    calls = []

    def rung(name: str, frees: int):
        def relieve(missing: int) -> int:
            calls.append((name, missing))
            return frees
        return name, relieve

    ladder = [rung("quantize", 300), rung("evict", 300), rung("summarize", 300)]
    assert guard.admit(1500, used_bytes=900, ladder=ladder) == ["quantize", "evict"]
    assert calls == [("quantize", 500), ("evict", 200)]
    with pytest.raises(MemoryBudgetExceeded, match="quantize → evict → summarize") as info:
        guard.admit(2500, used_bytes=900, ladder=ladder)
    assert info.value.needed == 1600


def fake_llm(model: LlamaModel, chunk: int = 32):
    return SimpleNamespace(model=model, config=model.config, device=torch.device("cpu"),
                           runner=SimpleNamespace(chunk=chunk))


def test_predicted_turn_peak_adds_the_step_and_a_pending_scratch() -> None:
    model = random_model(TINY)
    cache = build_cache(TINY, CacheConfig(tokens=256, dtype="int8"), "fp32", model.inv_freq)
    llm = fake_llm(model)
    first = predict_turn_peak(llm, cache, new_tokens=140, used_bytes=10_000)
    model(torch.randint(0, 128, (1, 40)), cache)  # the first read allocates the scratch
    later = predict_turn_peak(llm, cache, new_tokens=100, used_bytes=10_000)  # the same 140 keys at the end
    assert first - later == cache.pool.workspace_bytes > 0
    assert later > 10_000
    assert predict_turn_peak(llm, cache, new_tokens=200, used_bytes=10_000) >= later


def test_predicted_turn_peak_counts_the_new_kv_of_a_pool_committed_on_write() -> None:
    """On CPU a large pool's pages become resident only when written: a turn's new tokens add their KV bytes."""
    config = dataclasses.replace(TINY, max_context=16384)
    model = random_model(config)
    small = build_cache(config, CacheConfig(tokens=256), "fp32", model.inv_freq)
    large = build_cache(config, CacheConfig(tokens=16384), "fp32", model.inv_freq)  # K: 4 MiB
    assert not small.pool.committed_on_write and large.pool.committed_on_write
    llm = fake_llm(model)
    base = predict_turn_peak(llm, small, new_tokens=100, used_bytes=0)
    assert predict_turn_peak(llm, large, new_tokens=100, used_bytes=0) == base + 100 * large.spec.bytes_per_token


def test_fitting_chunk_is_the_largest_that_fits() -> None:
    model = random_model(TINY)
    cache = build_cache(TINY, CacheConfig(tokens=512), "fp32", model.inv_freq)
    llm = fake_llm(model, chunk=256)
    budget = predict_turn_peak(llm, cache, 400, used_bytes=0, chunk=16)
    chunk = fitting_chunk(llm, cache, 400, budget, used_bytes=0)
    assert 16 <= chunk < 256 and predict_turn_peak(llm, cache, 400, used_bytes=0, chunk=chunk) <= budget
    assert predict_turn_peak(llm, cache, 400, used_bytes=0, chunk=chunk * 2) > budget
    assert fitting_chunk(llm, cache, 400, budget_bytes=1000, used_bytes=0) == 0


def test_admit_turn_shrinks_the_chunk_before_refusing_and_the_session_stays_usable() -> None:
    model = random_model(TINY)
    cache = build_cache(TINY, CacheConfig(tokens=512), "fp32", model.inv_freq)
    llm = fake_llm(model, chunk=256)
    roomy = MemoryGuard(10 * predict_turn_peak(llm, cache, 400, used_bytes=0))
    assert admit_turn(roomy, llm, cache, 400, used_bytes=0)[0] == 256
    tight = MemoryGuard(predict_turn_peak(llm, cache, 400, used_bytes=0, chunk=32))
    chunk, predicted = admit_turn(tight, llm, cache, 400, used_bytes=0)
    assert 32 <= chunk < 256 and predicted <= tight.budget_bytes
    with pytest.raises(MemoryBudgetExceeded) as info:
        admit_turn(tight, llm, cache, 400, used_bytes=tight.budget_bytes - 100)
    assert info.value.budget == tight.budget_bytes and info.value.available == 100
    assert info.value.needed > tight.budget_bytes
    # nothing ran: the cache is as it was, and a turn that fits goes through
    assert cache.num_tokens == 0
    chunk, _ = admit_turn(tight, llm, cache, 20, used_bytes=0)
    model(torch.randint(0, 128, (1, 20)), cache)
    assert cache.num_tokens == 20


# ---- ledger --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", ["auto", "bf16", "int8", "int4"])
def test_ledger_kv_bytes_are_the_pool_tensors(kv_dtype: str) -> None:
    model = random_model(TINY)
    cache = build_cache(TINY, CacheConfig(tokens=256, dtype=kv_dtype), "fp32", model.inv_freq)
    model(torch.randint(0, 128, (1, 70)), cache)
    ledger = Ledger(kv_budget_bytes=None)
    ledger.record_turn(70, {"evicted_tokens": 0, "quantized_tokens": 64 if "int" in kv_dtype else 0})
    report = ledger.report(fake_llm(model), cache)
    assert report.kv_reserved_bytes == real_kv_bytes(cache)
    assert report.kv_used_bytes == cache.nbytes <= report.kv_reserved_bytes
    assert report.tokens_held == 70 and report.capacity_tokens == 256
    assert report.weights_bytes == sum(p.nbytes for p in model.parameters())
    assert report.rss_bytes > 0 and report.peak_rss_bytes >= report.rss_bytes
    assert report.device_allocated_bytes == 0
    assert report.turns_left_forecast == (256 - 70) // 70
    json.dumps(report.to_dict())


def test_process_memory_counts_a_shared_pool_once() -> None:
    from kvbound.kvcache.factory import build_pool

    model = random_model(TINY)
    config = CacheConfig(budget="256KiB", dtype="int8")
    pool = build_pool(TINY, config, "fp32", capacity=512)
    caches = [build_cache(TINY, config, "fp32", model.inv_freq, pool=pool) for _ in range(2)]
    own = build_cache(TINY, CacheConfig(tokens=64), "fp32", model.inv_freq)
    for cache in caches + [own]:
        model(torch.randint(0, 128, (1, 40)), cache)
    report = process_memory(fake_llm(model), caches + [own])
    assert report.kv_reserved_bytes == pool.nbytes + own.pool.nbytes + sum(c.spec.residual_bytes for c in caches)
    assert report.kv_used_bytes == sum(c.nbytes for c in caches + [own]) and report.sessions == 3
    assert report.workspace_bytes == pool.workspace_bytes > 0


def test_forecast_uses_the_last_three_turns() -> None:
    ledger = Ledger()
    assert ledger.forecast(1000, "none", evicts=False)[0] is None
    for size in (1000, 100, 200, 300):
        ledger.record_turn(size, {"evicted_tokens": 5, "quantized_tokens": 32, "summarized_tokens": 1})
    assert ledger.turn_size == 200
    turns, text = ledger.forecast(1000, "none", evicts=False)
    assert turns == 5 and text.startswith("≈5 more turns") and "refused" in text
    turns, text = ledger.forecast(1000, "window", evicts=True)
    assert turns == 5 and "policy window evicts" in text
    assert ledger.forecast(150, "window", evicts=True) == (None, "budget full; evicting per policy window")
    assert ledger.forecast(150, "none", evicts=False)[0] == 0
    assert (ledger.tokens_evicted, ledger.tokens_quantized, ledger.tokens_summarized) == (20, 128, 4)


# ---- CLI -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.helpers_tiny import tiny_hf_model, write_gguf

    path = tmp_path_factory.mktemp("estimate") / "tiny.gguf"
    write_gguf(tiny_hf_model("llama"), path)
    return path


def run_estimate(*args: str):
    from kvbound.cli.estimate import estimate_command

    app = typer.Typer()
    app.command("estimate")(estimate_command)
    app.callback()(lambda: None)
    return CliRunner().invoke(app, ["estimate", *args])


def test_cli_json_reads_only_metadata(tiny_gguf) -> None:
    result = run_estimate(str(tiny_gguf), "--context", "200", "--kv-dtype", "int8", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    expected = estimate(tiny_gguf, context=200, kv_dtype="int8", device="cpu")
    for key in ("weights_bytes", "kv_bytes", "activation_peak_bytes", "baseline_bytes", "total_peak_bytes"):
        assert data[key] == getattr(expected, key)
    assert data["format"] == "gguf" and data["loader_bytes"] > 0 and data["load_peak_bytes"] > 0


def test_cli_table_and_budget_inverse(tiny_gguf) -> None:
    result = run_estimate(str(tiny_gguf), "--memory-budget", "2GiB", "--turn-tokens", "50", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "total peak" in result.output and "turns that fit" in result.output
    bad = run_estimate(str(tiny_gguf), "--kv-dtype", "int3")
    assert isinstance(bad.exception, ValueError) and "--kv-dtype" in str(bad.exception)


def test_cli_counts_what_the_policy_and_recall_add(tiny_gguf) -> None:
    """--policy and --recall: an evicting policy with recall adds an archive per session; compactor adds its
    per-layer, per-head scores to the cache metadata, as the cache it builds holds them."""
    def run(*extra: str) -> dict:
        result = run_estimate(str(tiny_gguf), "--kv-budget", "1MiB", "--sessions", "2", "--json", "--device", "cpu",
                              *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    none, keydiff, compactor = run(), run("--policy", "turns+keydiff"), run("--policy", "compactor")
    off = run("--policy", "turns+keydiff", "--recall", "off")
    assert none["archive_bytes"] == off["archive_bytes"] == 0 < keydiff["archive_bytes"] == compactor["archive_bytes"]
    assert keydiff["total_peak_bytes"] - off["total_peak_bytes"] == keydiff["archive_bytes"]
    cache = kvbound.load(tiny_gguf, dtype="fp32").new_cache(CacheConfig(budget="1MiB", policy="compactor"))
    assert compactor["cache_metadata_bytes"] == 2 * cache.metadata_bytes
    per_token = {name: r["cache_metadata_bytes"] / r["capacity_tokens"] for name, r in
                 (("keydiff", keydiff), ("compactor", compactor))}
    assert per_token["compactor"] > per_token["keydiff"]  # 4 bytes per token per layer and KV head more
    bad = run_estimate(str(tiny_gguf), "--policy", "bogus")
    assert isinstance(bad.exception, ValueError) and "unknown policy" in str(bad.exception)
    assert isinstance(run_estimate(str(tiny_gguf), "--recall", "maybe").exception, ValueError)


def test_loading_drops_each_source_tensor_once_it_is_adopted() -> None:
    """The loader streams tensors so that one source is alive at a time. It once kept the first (the vocabulary
    matrix, 31 MB in the default GGUF) to the end, which raised the load's peak RSS by as much."""
    with torch.device("meta"):
        shapes = [(name, p.shape) for name, p in LlamaModel(SMALL).named_parameters()]
    sources: list[weakref.ref] = []
    alive_later: list[bool] = []

    def stream():
        for i, (name, shape) in enumerate(shapes):
            if i == len(shapes) - 1:  # by the last tensor, the first is long adopted
                alive_later.append(sources[0]() is not None)
            tensor = torch.randn(shape, dtype=torch.float64)  # converted to fp32: the model keeps a copy
            sources.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    LlamaModel.from_tensors(SMALL, stream())
    assert alive_later == [False]
