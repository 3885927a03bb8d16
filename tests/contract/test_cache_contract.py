"""Every eviction policy × every KV storage type through the same contract, on a tiny random model."""

from __future__ import annotations

import json
import random

import pytest
import torch

import kvbound
from kvbound.chat.session import RECALL_SEGMENT
from kvbound.config import CacheConfig
from kvbound.kvcache import storage
from kvbound.kvcache.contiguous import ContiguousCache
from kvbound.kvcache.spec import KV_DTYPE_NAMES, KVSpec
from kvbound.policies import policy_names
from tests.helpers_tiny import random_ids, save_hf_dir, tiny_hf_model

POLICIES = policy_names()  # every registered policy, and turns around each attention scorer
EVICTING = [p for p in POLICIES if p != "none"]
# Logit error bounds vs the fp32 cache on the tiny random model (|logits| ~ 5-20), measured with margin.
BOUNDS = {"fp32": 0.0, "fp16": 0.05, "bf16": 0.3, "int8": 0.5, "int4": 6.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf_dir(tiny_hf_model("llama", max_position_embeddings=4096), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llm(model_dir):
    torch.set_num_threads(1)
    return kvbound.load(model_dir, dtype="fp32", device="cpu")


def feed(llm, cache, ids, chunk=24):
    out = []
    for i in range(0, len(ids), chunk):
        out.append(llm.runner.score(ids[i:i + chunk], cache))
    return torch.cat(out)


def pool_bytes(cache) -> int:
    extra = cache.res_k.nbytes + cache.res_v.nbytes if cache.spec.quantized else 0
    return sum(t.nbytes for t in cache.pool.tensors()) + extra


@pytest.mark.parametrize("dtype", KV_DTYPE_NAMES)
@pytest.mark.parametrize("policy", POLICIES)
def test_large_budget_matches_unbounded(llm, policy, dtype):
    """A budget larger than the text: no eviction, and logits equal the plain contiguous cache (fp32 exactly)."""
    ids = random_ids(300, seed=1)
    ref = feed(llm, ContiguousCache(llm.config, 512), ids)
    cache = llm.new_cache(CacheConfig(tokens=1024, dtype=dtype, policy=policy))
    out = feed(llm, cache, ids)
    err = (out - ref).abs().max().item()
    assert err <= BOUNDS[dtype], f"{policy}/{dtype}: max logit error {err}"
    if dtype == "fp32":
        assert err == 0.0
    assert cache.receipt().evicted_tokens == 0


@pytest.mark.parametrize("dtype", KV_DTYPE_NAMES)
@pytest.mark.parametrize("policy", EVICTING)
def test_budget_holds_pins_survive_receipts_add_up(llm, policy, dtype):
    spec = KVSpec.for_model(llm.config, dtype)
    budget = spec.residual_bytes + spec.bytes_for(192)  # ~192 tokens whatever the storage type
    cache = llm.new_cache(CacheConfig(budget=budget, dtype=dtype, policy=policy))
    assert pool_bytes(cache) <= budget
    size_at_start = pool_bytes(cache)
    cache.set_segment(0, pinned={0})
    system = random_ids(20, seed=2)
    feed(llm, cache, system)
    evicted, fed = 0, len(system)
    rng = random.Random(0)
    for turn in range(1, 25):
        cache.set_segment(turn, pinned={0, turn})
        ids = random_ids(rng.randint(5, 60), seed=turn)
        feed(llm, cache, ids, chunk=rng.choice([1, 7, 32]))
        fed += len(ids)
        evicted += cache.receipt().evicted_tokens
        assert cache.nbytes <= budget and pool_bytes(cache) == size_at_start
        assert cache.num_tokens <= cache.capacity
        assert cache.segment_tokens(0) == len(system), "the pinned system prompt lost tokens"
        assert cache.segment_tokens(turn) == len(ids), "the current turn lost tokens"
        held = cache.view().positions
        assert torch.equal(held, torch.arange(cache.num_tokens)), "positions must stay contiguous after compaction"
    assert evicted > 0 and fed - evicted == cache.num_tokens, "receipts must add up to what left the cache"
    cache.free()
    assert cache.pool.free_blocks == cache.pool.num_blocks and not any(cache.pool.refcount)


@pytest.mark.parametrize("dtype", KV_DTYPE_NAMES)
def test_none_refuses_with_numbers(llm, dtype):
    cache = llm.new_cache(CacheConfig(tokens=64, dtype=dtype, policy="none"))
    feed(llm, cache, random_ids(60))
    with pytest.raises(kvbound.KVBudgetExceeded) as info:
        feed(llm, cache, random_ids(10))
    assert info.value.available == 64 and info.value.needed > 64
    assert "64 tokens" in str(info.value)
    assert cache.num_tokens == 60  # the refused step wrote nothing


@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_rollback_restores_state(llm, dtype):
    cache = llm.new_cache(CacheConfig(tokens=512, dtype=dtype))
    ids = random_ids(100, seed=3)
    feed(llm, cache, ids[:70])
    expected = feed(llm, cache, ids[70:])
    cache.rollback(30)
    assert cache.num_tokens == 70
    again = feed(llm, cache, ids[70:])
    assert (again - expected).abs().max().item() <= BOUNDS[dtype]


def test_shared_pool_fragmented_tables_match(llm):
    """Two sequences interleaving allocations in one pool read through gathered (non-contiguous) tables."""
    from kvbound.kvcache.paged import PagedCache
    from kvbound.kvcache.pool import BlockPool
    from kvbound.kvcache.spec import KVSpec

    ids = random_ids(200, seed=4)
    ref = feed(llm, ContiguousCache(llm.config, 256), ids, chunk=40)
    pool = BlockPool(KVSpec.for_model(llm.config, "fp32", block_size=8), 64)
    a, b = PagedCache(pool, 256, llm.model.inv_freq), PagedCache(pool, 256, llm.model.inv_freq)
    outs = []
    for i in range(0, 200, 40):
        outs.append(llm.runner.score(ids[i:i + 40], a))
        llm.runner.score(ids[i:i + 40], b)
    assert not storage.consecutive(list(a.table))
    assert torch.equal(torch.cat(outs), ref)
    a.free()
    assert pool.used_blocks == len(b.table)
    b.free()
    assert pool.free_blocks == 64


@pytest.mark.parametrize("policy,dtype", [("window", "fp32"), ("turns+h2o", "int4"), ("snapkv", "int8")])
def test_thousand_turn_chat_constant_pool(llm, policy, dtype):
    chat = llm.chat(system="be brief", budget=256 * 1024, dtype=dtype, policy=policy)
    size = pool_bytes(chat.cache)
    rng = random.Random(7)
    words = ["tea", "rain", "hills", "a", "letter", "dance", "ball", "Mr", "Darcy", "1", "22"]
    for turn in range(1000):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        reply = chat.send(text, max_new_tokens=3, temperature=1.0, seed=turn)
        assert reply.kv_bytes <= 256 * 1024 and pool_bytes(chat.cache) == size
        assert chat.cache.segment_tokens(0) > 0, "the system prompt was evicted"
    assert chat.cache.num_tokens <= chat.cache.capacity


def test_summarize_keeps_a_pinned_note(llm):
    chat = llm.chat(system="be brief", budget=512 * 1024, policy="summarize")
    rng = random.Random(3)
    words = ["code", "is", "2128", "my", "name", "Anne", "tea", "rain", "hills"]
    summaries = []
    for turn in range(120):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        reply = chat.send(text, max_new_tokens=4, temperature=1.0, seed=turn)
        assert reply.kv_bytes <= 512 * 1024
        if reply.receipt.get("summarized_turns"):
            summaries.append(reply.receipt)
    assert summaries, "eviction happened but no summary was written"
    assert all(set(r["summarized_turns"]) for r in summaries)
    assert any(r["summary"] for r in summaries), "no summary text was written"
    assert chat.transcript.note_segment is not None  # the newest note sits in the cache, pinned
    assert chat.transcript.note_segment in chat.cache.labels()[1]
    assert chat.cache.segment_tokens(chat.transcript.note_segment) > 0
    assert chat.cache.segment_tokens(0) > 0


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_sessions_share_system_prompt_blocks(llm, dtype):
    pool = llm.shared_pool(budget=512 * 1024, dtype=dtype)
    system = "You are a careful assistant. " * 12  # several full blocks of identical tokens
    alone = llm.chat(system=system, dtype=dtype)
    expected = alone.send("tea in the hills", max_new_tokens=6, temperature=0)
    first = llm.chat(system=system, pool=pool, dtype=dtype)
    first.send("rain on the ball", max_new_tokens=6, temperature=0)
    second = llm.chat(system=system, pool=pool, dtype=dtype)
    got = second.send("tea in the hills", max_new_tokens=6, temperature=0)
    assert first.shared_prefix_tokens == 0 and second.shared_prefix_tokens >= 2 * pool.spec.block_size
    shared = second.cache.table[: second.shared_prefix_tokens // pool.spec.block_size]
    assert shared == first.cache.table[: len(shared)] and all(pool.refcount[b] == 2 for b in shared)
    assert got.token_ids == expected.token_ids  # sharing changes nothing the model sees
    assert got.prompt_tokens == expected.prompt_tokens
    first.close()
    assert all(pool.refcount[b] == 1 for b in shared)  # still held by the second session
    second.close()
    assert pool.free_blocks == pool.num_blocks and not any(pool.refcount)
    third = llm.chat(system=system, pool=pool, dtype=dtype)
    third.send("hello", max_new_tokens=2, temperature=0)
    assert third.shared_prefix_tokens == 0, "freed blocks must not be offered as a prefix"


def test_recent_turn_pins_are_soft(llm):
    """`turns` pins the newest turn only while the current one still fits: a long message is never refused
    because the previous turn is pinned."""
    chat = llm.chat(system="hi", tokens=96, policy="turns+h2o")
    text = "tea and rain " * 4  # ~40 tokens with the template, so two turns do not fit beside each other
    for turn in range(6):
        reply = chat.send(text, max_new_tokens=8, temperature=1.0, seed=turn)
        assert reply.context_tokens <= 96
    assert chat.cache.evicted_total > 0 and chat.cache.segment_tokens(0) > 0


@pytest.mark.parametrize("policy", ["window", "snapkv"])
def test_raw_completion_prefills_in_chunks_the_budget_can_hold(llm, policy):
    """A raw completion whose prompt is longer than an evicting cache, and the cache smaller than the runner's
    512-token chunk: the prefill steps down to chunks eviction can make room for, instead of KVBudgetExceeded."""
    prompt = " ".join(["the rain in spain stays mainly on the plain"] * 60)
    n = len(llm.tokenizer.encode(prompt, add_special=True))
    assert n > 4 * 96 and llm.runner.chunk > 96
    reply = llm.generate(prompt, raw=True, temperature=0.0, max_new_tokens=4,
                         cache=CacheConfig(tokens=96, policy=policy))
    assert reply.receipt["evicted_tokens"] >= n - 96
    assert reply.context_tokens <= 96


CHAT_WORDS = ["code", "is", "2128", "my", "name", "Anne", "tea", "rain", "hills", "flight", "TH9648"]


def chat_script(turns: int, seed: int) -> list[str]:
    """Random messages, each with a word of its own (`ref7`); every fifth one also names the word of the turn 15 back,
    which recall can find in the archive once that turn is evicted."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(CHAT_WORDS) for _ in range(rng.randint(3, 10))) + f" ref{i}" for i in range(turns)]
    return [t + (f" ref{i - 15}" if i % 5 == 4 and i >= 15 else "") for i, t in enumerate(texts)]


def room_for(policy: str) -> tuple[int, int]:
    """(KV tokens, turns) that make a chat evict several times; the tiny tokenizer spells text byte by byte, so a
    recalled turn (an eighth of the capacity at most) and a summary's prompt (a third) need a cache this large."""
    return 960, 40


@pytest.mark.parametrize("dtype", KV_DTYPE_NAMES)
@pytest.mark.parametrize("policy", EVICTING)
def test_chat_evicts_and_summarizes_with_every_storage(llm, policy, dtype):
    """Each policy × storage through a chat long enough to evict several times (and, for `summarize`, to write
    several notes, which runs the model between steps and reads the quantized blocks there)."""
    tokens, turns = room_for(policy)
    chat = llm.chat(system="be brief", tokens=tokens, dtype=dtype, policy=policy)
    budget = chat.cache.pool.nbytes + chat.cache.spec.residual_bytes
    evictions = summaries = recalls = 0
    for turn, text in enumerate(chat_script(turns, seed=11)):
        reply = chat.send(text, max_new_tokens=6, temperature=1.0, seed=turn)
        assert reply.kv_bytes <= budget and reply.context_tokens <= tokens
        assert chat.cache.segment_tokens(RECALL_SEGMENT) == 0
        evictions += reply.receipt["evictions"]
        summaries += bool(reply.receipt.get("summarized_turns"))
        recalls += reply.recall["passages"] > 0
    assert evictions >= 3, "the chat was too short to evict several times"
    assert recalls >= 2, "recall (on by default with an evicting policy) brought nothing back"
    assert chat.cache.segment_tokens(0) > 0, "the system prompt was evicted"
    if chat.cache.policy.summarizes:
        assert summaries >= 2 and chat.summary, "summarize wrote fewer than two notes"
        assert chat.cache.segment_tokens(chat.transcript.note_segment) > 0, "the newest note is not in the cache"


@pytest.mark.parametrize("policy,dtype", [("summarize", d) for d in KV_DTYPE_NAMES] + [("turns+h2o", "int4"),
                                                                                      ("snapkv", "int8")])
def test_cli_converse_with_every_storage(model_dir, tmp_path, policy, dtype):
    """The same through the CLI: `kvbound converse` ends with exit 0, every turn answered, nothing on stderr
    that looks like a traceback."""
    from typer.testing import CliRunner

    from kvbound.cli.app import app

    script = tmp_path / "chat.jsonl"
    tokens, turns = room_for(policy)
    lines = [{"system": "be brief"}] + [{"user": text} for text in chat_script(turns, seed=5)]
    script.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = CliRunner().invoke(app, ["converse", "--model", str(model_dir), "--script", str(script),
                                      "--kv-tokens", str(tokens), "--kv-dtype", dtype, "--policy", policy,
                                      "--max-new-tokens", "6", "--dtype", "fp32", "--device", "cpu", "--json"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    records = [json.loads(line) for line in result.output.strip().splitlines() if line.startswith("{")]
    done = [r for r in records if "turn" in r]
    assert len(done) == turns and all(r["context_tokens"] <= tokens for r in done)
    assert sum(r["receipt"]["evictions"] for r in done) >= 3
    assert sum(r["recall"]["passages"] > 0 for r in done) >= 2
    if policy == "summarize":
        assert sum(bool(r["receipt"].get("summary")) for r in done) >= 2


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_per_head_eviction_keeps_each_heads_own_tokens(llm, dtype):
    """`compactor` evicts per layer and KV head: after a compaction each head holds exactly the tokens it chose,
    in order; each key re-rotated to its new position (rotated back, it is the key as written) and each value
    as it was (int8: within one re-quantization)."""
    cache = llm.new_cache(CacheConfig(tokens=128, dtype=dtype, policy="compactor"))
    feed(llm, cache, random_ids(120, seed=5), chunk=40)
    n, run = cache.num_tokens, storage.consecutive(list(cache.table))
    with torch.inference_mode():  # a quantized read dequantizes into the pool's scratch
        keys_before = [k.clone() for k in cache._key_layers(plain=True)]
        values_before = [cache._read(layer, n, run)[1][:, :n].float().clone()
                         for layer in range(llm.config.num_layers)]
    chosen = []
    compact = cache.seq.compact
    cache.seq.compact = lambda keep, reposition, heads=None: chosen.append(heads) or compact(keep, reposition, heads)
    feed(llm, cache, random_ids(40, seed=6), chunk=40)  # 160 > 128: one eviction, then the 40 new tokens
    heads = chosen[0]
    K = heads.shape[-1]
    assert heads.shape[:2] == (llm.config.num_layers, llm.config.num_kv_heads) and K == n - int(128 * 0.1) - 20
    assert len({tuple(h.tolist()) for h in heads.flatten(0, 1)}) > 1, "every head kept the same tokens"
    run = storage.consecutive(list(cache.table))
    tol = 0.0 if dtype == "fp32" else 0.05
    with torch.inference_mode():
        keys_after = [k.clone() for k in cache._key_layers(plain=True)]
        values_after = [cache._read(layer, K, run)[1][:, :K].float().clone() for layer in range(llm.config.num_layers)]
    for layer in range(llm.config.num_layers):
        for head in range(llm.config.num_kv_heads):
            kept = heads[layer, head]
            assert torch.allclose(keys_after[layer][head, :K], keys_before[layer][head, kept], atol=1e-4 + tol * 10)
            assert torch.allclose(values_after[layer][head], values_before[layer][head, kept], atol=1e-6 + tol)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_key_moments_count_every_key_written_before_rope(llm, dtype):
    """`compactor`'s key moments: fed in uneven chunks, they are the mean and covariance of the keys before RoPE
    (the held keys rotated back, while nothing is evicted; as written, not as quantized); after evictions they
    still count every token written, not only the held ones."""
    cache = llm.new_cache(CacheConfig(tokens=256, dtype=dtype, policy="compactor"))
    feed(llm, cache, random_ids(150, seed=8), chunk=37)
    with torch.inference_mode():
        keys = [k.clone() for k in cache._key_layers(plain=True)]
    moments = cache.seq.key_moments
    tol = 1e-4 if dtype == "fp32" else 0.05
    for layer, held in enumerate(keys):
        mean, cov = moments.layer(layer)
        assert int(moments.count[layer]) == 150
        assert torch.allclose(mean, held.mean(1), atol=tol)
        centred = held - held.mean(1, keepdim=True)
        assert torch.allclose(cov, centred.transpose(1, 2) @ centred / 150, atol=tol * 10)
    feed(llm, cache, random_ids(200, seed=9), chunk=50)
    assert cache.evicted_total > 0 and cache.num_tokens < 350
    assert int(moments.count[0]) == 350 == int(moments.count[-1])
