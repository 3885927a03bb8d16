"""Session state export / restore / offload on a tiny random model: a restored chat's next greedy replies equal the
original's (every KV storage type, evicting and summarizing policies), a snapshot holds exactly the sequence's
data, offloading frees shared-pool blocks for another session, and bad states fail with their reasons."""

from __future__ import annotations

import random

import pytest
import torch

import kvbound
from kvbound.chat import snapshot
from kvbound.chat.session import Chat
from kvbound.config import CacheConfig
from kvbound.errors import SnapshotError
from tests.helpers_tiny import save_hf_dir, tiny_hf_model

WORDS = ["tea", "rain", "hills", "a", "letter", "dance", "ball", "Mr", "Darcy", "1", "22", "code", "is", "2128"]
GREEDY = dict(max_new_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    torch.set_num_threads(1)
    path = save_hf_dir(tiny_hf_model("llama", max_position_embeddings=4096), tmp_path_factory.mktemp("tiny"))
    return kvbound.load(path, dtype="fp32", device="cpu")


def messages(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(count)]


def round_trip(state: dict) -> dict:
    return snapshot.from_bytes(snapshot.to_bytes(state))


def assert_same_replies(a: Chat, b: Chat, texts: list[str], **sampling) -> None:
    for text in texts:
        got, want = b.send(text, **{**GREEDY, **sampling}), a.send(text, **{**GREEDY, **sampling})
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.context_tokens == want.context_tokens and got.receipt == want.receipt
        assert got.forecast == want.forecast


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4"])
def test_restored_chat_continues_identically(llm, dtype):
    original = llm.chat(system="be brief and kind", tokens=1024, dtype=dtype)
    for text in messages(3):
        original.send(text, **GREEDY)
    restored = Chat.from_state(llm, round_trip(original.export_state()))
    assert restored.restored_from == "snapshot" and restored.messages == original.messages
    assert restored.cache.num_tokens == original.cache.num_tokens
    assert restored.memory().tokens_quantized == original.memory().tokens_quantized
    assert_same_replies(original, restored, messages(4, seed=1))


@pytest.mark.parametrize("policy,dtype", [("window", "fp32"), ("h2o", "int8"), ("turns+h2o", "int4"),
                                          ("turns+snapkv", "fp32"), ("tova", "int4"), ("compactor", "int8"),
                                          ("turns+compactor", "fp32")])
def test_restore_after_evictions_continues_identically(llm, policy, dtype):
    """Scores, positions after compaction and the evicted count come back: later evictions pick the same victims."""
    original = llm.chat(system="be brief", tokens=160, dtype=dtype, policy=policy)
    for text in messages(8, seed=2):
        original.send(text, **GREEDY)
    assert original.cache.evicted_total > 0
    restored = Chat.from_state(llm, round_trip(original.export_state()))
    assert torch.equal(restored.cache.view().scores, original.cache.view().scores)
    if original.cache.policy.scores_writes:  # per-head scores, NaN for decoded tokens
        heads = [c.cache.view().head_scores.nan_to_num(-1.0) for c in (original, restored)]
        assert torch.equal(*heads)
    if original.cache.policy.key_moments:  # the mean and covariance of every key written, evicted ones too
        moments = [c.cache.view().key_moments for c in (original, restored)]
        assert int(moments[0].count[0]) > 0
        assert all(torch.equal(getattr(moments[0], t), getattr(moments[1], t)) for t in ("count", "mean", "scatter"))
    evicted = original.cache.evicted_total
    assert_same_replies(original, restored, messages(8, seed=3))
    assert restored.cache.evicted_total == original.cache.evicted_total > evicted, "evictions after the restore"


def test_restore_with_a_pending_summary_note(llm):
    """policy summarize: the note waiting to be fed, the summarized turns and the note's pinned segment carry over."""
    original = llm.chat(system="be brief", tokens=1024, policy="summarize")
    texts = iter(messages(80, seed=4))
    while not original.transcript.pending_note:
        original.send(next(texts), **GREEDY)
    restored = Chat.from_state(llm, round_trip(original.export_state()))
    assert restored.summary == original.summary and restored.transcript.summarized == original.transcript.summarized
    assert_same_replies(original, restored, [next(texts) for _ in range(6)])
    assert restored.transcript.note_segment == original.transcript.note_segment is not None


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_snapshot_holds_exactly_the_sequence(llm, dtype):
    """The tensors of a state are the held blocks as stored plus the filled residual window: no free slots."""
    chat = llm.chat(system="be brief", tokens=1024, dtype=dtype)
    for text in messages(3, seed=5):
        chat.send(text, **GREEDY)
    cache, spec = chat.cache, chat.cache.spec
    state = chat.cache.export_state()
    kv = snapshot.state_bytes(state["blocks"])
    n = cache.num_tokens
    pooled = spec.pooled(n)
    if spec.quantized:
        residual = (n - pooled) * spec.residual_bytes // spec.block_size
        assert kv == (pooled // spec.block_size) * spec.bytes_per_block + residual
    else:
        assert kv == n * spec.bytes_per_token  # not the partial last block's free slots
    meta = snapshot.state_bytes(state) - kv
    assert meta == n * (4 + 4 + 4)  # positions, segments (int32), scores (fp32)
    assert len(snapshot.to_bytes(state)) < kv + meta + 4096


def test_offload_frees_shared_pool_blocks_for_another_session(llm):
    pool = llm.shared_pool(budget=48 * 1024, dtype="int8")  # room for about one of these sessions at a time
    a = llm.chat(system="you are A", pool=pool, dtype="int8")
    for text in messages(3, seed=6):
        a.send(text, **GREEDY)
    twin = Chat.from_state(llm, a.export_state())  # the same session in a pool of its own, never offloaded
    used = pool.used_blocks
    freed = a.offload()
    assert a.offloaded and freed == used * pool.spec.bytes_per_block and pool.used_blocks == 0
    b = llm.chat(system="you are B", pool=pool, dtype="int8")
    for text in messages(5, seed=7):
        b.send(text, **GREEDY)
    assert pool.used_blocks > pool.num_blocks // 2, "B uses the blocks A gave back"
    with pytest.raises(kvbound.KVBudgetExceeded) as info:
        a.reload()
    assert info.value.needed == used and info.value.available == pool.free_blocks
    assert a.offloaded and pool.used_blocks == len(b.cache.table), "a refused reload leaves the pool unchanged"
    b.offload()
    assert_same_replies(twin, a, messages(2, seed=8))  # send() swaps A back in on demand
    assert not a.offloaded and b.offloaded
    a.close()
    b.reload()
    b.close()
    assert pool.free_blocks == pool.num_blocks and not any(pool.refcount)


@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_shared_prefix_reattached_on_reload(llm, dtype):
    """A session that shares its system prompt's blocks gets the same blocks back on reload (no copy); once no
    session holds them, a reload allocates fresh ones and offers them for sharing again."""
    pool = llm.shared_pool(budget=512 * 1024, dtype=dtype)
    system = "You are a careful assistant. " * 12
    first = llm.chat(system=system, pool=pool, dtype=dtype)
    first.send("rain on the ball", **GREEDY)
    second = llm.chat(system=system, pool=pool, dtype=dtype)
    second.send("tea in the hills", **GREEDY)
    shared = second.cache.table[: second.shared_prefix_tokens // pool.spec.block_size]
    assert len(shared) >= 2
    twin = Chat.from_state(llm, second.export_state())
    used, own = pool.used_blocks, len(second.cache.table) - len(shared)
    assert second.offload() == own * pool.spec.bytes_per_block  # the shared blocks stay, held by `first`
    assert pool.used_blocks == used - own and all(pool.refcount[b] == 1 for b in shared)
    second.reload()
    assert second.cache.table[: len(shared)] == shared and all(pool.refcount[b] == 2 for b in shared)
    assert pool.used_blocks == used
    assert_same_replies(twin, second, messages(2, seed=9))
    state = first.export_state()
    first.close()
    second.close()
    assert pool.free_blocks == pool.num_blocks
    again = Chat.from_state(llm, state, pool=pool)  # nothing to share now: fresh blocks, published again
    third = llm.chat(system=system, pool=pool, dtype=dtype)
    third.send("hello", **GREEDY)
    assert third.shared_prefix_tokens == len(shared) * pool.spec.block_size
    assert third.cache.table[: len(shared)] == again.cache.table[: len(shared)]


def test_state_of_another_layout_or_model_is_refused(llm, tmp_path):
    chat = llm.chat(system="be brief", tokens=256, dtype="int8")
    chat.send("tea in the hills", **GREEDY)
    state = chat.export_state()
    with pytest.raises(SnapshotError, match="dtype 'int8' \\(saved\\) vs 'fp32'"):
        llm.new_cache(CacheConfig(tokens=256)).import_state(state["cache"])
    with pytest.raises(SnapshotError, match="same policy"):
        Chat.from_state(llm, state, cache=llm.new_cache(CacheConfig(tokens=256, dtype="int8", policy="window")))
    with pytest.raises(SnapshotError, match="same KV layout"):
        Chat.from_state(llm, state, pool=llm.shared_pool(budget=64 * 1024, dtype="int4"))
    other = kvbound.load(save_hf_dir(tiny_hf_model("llama", seed=1, max_position_embeddings=4096), tmp_path),
                         dtype="fp32", device="cpu")
    with pytest.raises(SnapshotError, match="weights_sha256"):
        Chat.from_state(other, state)
    assert isinstance(SnapshotError("x"), (ValueError, kvbound.KvboundError))


def test_damaged_bytes_raise_snapshot_error(llm):
    chat = llm.chat(system="be brief", tokens=256)
    chat.send("tea", **GREEDY)
    blob = snapshot.to_bytes(chat.export_state())
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1  # one bit of KV data
    for bad in (blob[: len(blob) // 2], b"", b"\x00" * 64, blob[:9] + b"!" + blob[10:], bytes(flipped)):
        with pytest.raises(SnapshotError):
            snapshot.from_bytes(bad)


def test_import_too_big_for_the_cache_is_refused(llm):
    chat = llm.chat(tokens=1024)
    chat.send(" ".join(WORDS * 3), **GREEDY)
    small = llm.new_cache(CacheConfig(tokens=32))
    with pytest.raises(kvbound.KVBudgetExceeded) as info:
        small.import_state(chat.cache.export_state())
    assert info.value.needed == chat.cache.num_tokens and info.value.available == 32
    assert small.num_tokens == 0 and small.pool.free_blocks == small.pool.num_blocks


def test_rebuild_from_messages(llm):
    """Without a KV state a conversation is re-fed (no reply regenerated) and the chat goes on from there."""
    original = llm.chat(system="be brief", tokens=512)
    for text in messages(4, seed=10):
        original.send(text, **GREEDY)
    rebuilt = Chat.from_messages(llm, original.messages, llm.new_cache(CacheConfig(tokens=512)))
    assert rebuilt.restored_from == "messages" and rebuilt.messages == original.messages and rebuilt.turn == 4
    assert rebuilt.cache.segment_tokens(0) == original.cache.segment_tokens(0)
    assert all(rebuilt.cache.segment_tokens(t) > 0 for t in range(1, 5))
    reply = rebuilt.send("tea", **GREEDY)
    assert reply.prompt_tokens < 20, "only the new message is prefilled"
    small = Chat.from_messages(llm, original.messages, llm.new_cache(CacheConfig(tokens=128)))
    assert small.messages == original.messages and 0 < small.cache.num_tokens <= 96
    assert small.cache.segment_tokens(0) > 0 and small.cache.segment_tokens(4) > 0  # system + newest turn
    after = small.send("tea", **GREEDY)  # the next turn continues the cut conversation without re-feeding it
    assert after.reprefilled_tokens == 0 and after.prompt_tokens < 20 and after.context_tokens <= 128


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bf16", "int4"])
def test_cuda_offload_to_host_and_back(tmp_path, dtype):
    """On a GPU the offloaded state lives in host memory and comes back bit for bit."""
    path = save_hf_dir(tiny_hf_model("llama", max_position_embeddings=4096), tmp_path)
    llm = kvbound.load(path, dtype="bf16", device="cuda")
    pool = llm.shared_pool(budget=256 * 1024, dtype=dtype)
    chat = llm.chat(system="be brief", pool=pool, dtype=dtype)
    for text in messages(3, seed=11):
        chat.send(text, **GREEDY)
    twin = Chat.from_state(llm, round_trip(chat.export_state()))
    chat.offload()
    assert all(t.device.type == "cpu" for t in chat.export_state()["cache"]["blocks"].values())
    assert twin.cache.pool.device.type == "cuda" and pool.used_blocks == 0
    assert_same_replies(twin, chat, messages(3, seed=12))
