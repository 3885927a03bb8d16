"""Predict a process's peak memory from model metadata alone (GGUF header / config.json), before any weight loads.

KV bytes come from the allocator itself: the cache is built on the meta device (no memory) through the same
`build_cache` a chat uses, so an estimate and an allocation cannot disagree. Activations are derived from tensor
shapes; the runtime and loader baselines are per-platform constants calibrated by benchmarks/estimate_accuracy.py.
The process peaks either while loading (checkpoint metadata and conversion transients beside the weights) or during
a turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from kvbound.config import CacheConfig, ModelConfig
from kvbound.engine.runner import DEFAULT_CHUNK, prefill_chunk
from kvbound.kvcache.factory import build_cache
from kvbound.kvcache.paged import SCORE_QUERIES
from kvbound.kvcache.pool import BlockPool
from kvbound.kvcache.spec import FLOAT_DTYPES, KVSpec, parse_size
from kvbound.models.linear import KERNEL_ROWS
from kvbound.models.weights import plan_weights

# -- calibration (benchmarks/estimate_accuracy.py measures each constant; results/estimate_accuracy.json) ----------
# The runtime itself, whatever the model. CPU: RSS of a fresh process that imported kvbound.cli.app (Python, torch,
#   tokenizers, typer, rich) and ran one forward of a tiny random model (the benchmark's "runtime" child: 246.5 MiB
#   on Linux x86-64, Python 3.11, torch 2.13 CPU; 318.7 MiB while building on the meta device imported sympy and
#   torch._dynamo, see models/layers.rope_inv_freq). CUDA: the target is torch.cuda.max_memory_allocated, which counts tensors
#   only; what the runtime adds there is cuBLAS's workspace, taken from torch's caching allocator on the first
#   matmul (the same child on an H200, torch 2.11+cu130: 32.0 MiB).
RUNTIME_BASELINE_BYTES: dict[str, int] = {"cpu": 246 << 20, "cuda": 32 << 20}
# Loading, per vocabulary entry of the checkpoint (LLM drops the file reader once the weights are in):
# - while loading: GGUF metadata as Python strings and lists (loading/gguf_index.py; tokenizer.json is parsed in
#   Rust) and the heap that converting tensors leaves — a run's peak RSS in kvbound.load() minus its RSS at the
#   end, less a quantizing plan's own transient (WeightsPlan.load_transient_bytes). The file's memory map adds
#   nothing at the peak: each tensor's pages are released once converted, and the peak comes at the end, when all
#   the weights are in;
# - what stays: the tokenizer and the heap around it — a run's RSS after kvbound.load() minus runtime and weights.
# The benchmark's medians over its 16 CPU runs of SmolLM2 (49,152 entries): GGUF 601 and 307 bytes (with the gguf
# package's reader they were 3,288 and 487; the load's peak was 31 MB higher while the loader kept the first
# tensor, the embedding's source, alive to the end); safetensors (the same vocabulary as tokenizer.json) 24 and 110.
LOADING_BYTES_PER_VOCAB_ENTRY: dict[str, int] = {"gguf": 601, "safetensors": 24, "none": 0}
TOKENIZER_BYTES_PER_VOCAB_ENTRY: dict[str, int] = {"gguf": 307, "safetensors": 110, "none": 0}
# glibc malloc: freeing an mmapped chunk raises the mmap threshold to that chunk's size (up to 32 MiB) and the heap
# then keeps up to twice the threshold free before it trims, so a turn's RSS peak exceeds the bytes torch holds by
# about twice its largest tensor, plus fragmentation: 18 MiB fits the turns the benchmark isolates (the RSS
# high-water mark is reset after loading) within ±10 MiB. CUDA's max_memory_allocated counts requested bytes.
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20
HEAP_FRAGMENTATION_BYTES: dict[str, int] = {"cpu": 18 << 20, "cuda": 0}
DEVICE_TYPES = ("cpu", "cuda")


# A full recall archive in process (chat/archive.py) under its default 1 MiB cap of text: its SQLite pages (text,
# index, reused free pages): 3.52 MiB after 100,000 archived turns (benchmarks/archive.py's procedure). Sessions
# whose archive a SessionStore keeps hold next to none of it in process: estimate them with recall="off".
ARCHIVE_BYTES = 15 << 18  # 3.75 MiB

@dataclass
class Estimate:
    """Predicted bytes of one process that loads the model and runs `sessions` chats of `context` tokens."""

    model: str
    format: str  # gguf | safetensors | none (a bare ModelConfig)
    device: str  # cpu | cuda: what total_peak_bytes predicts (process RSS | torch.cuda.max_memory_allocated)
    dtype: str  # compute dtype of the activations and dense weights
    weights: str  # weights storage mode (auto, fp32, bf16, fp16, int8, int4)
    weights_storage: dict  # storage → number of matrices, e.g. {"int4": 210, "int8": 1}
    kv_dtype: str  # storage type of the KV cache
    context: int  # tokens each session holds (the prefill fills them)
    capacity_tokens: int  # tokens each session's cache is built for
    chunk: int
    sessions: int
    weights_bytes: int
    kv_bytes: int  # pool + residual windows of every session, exactly what the allocator reserves
    kv_bytes_per_token: float
    kv_bytes_per_session: int
    cache_metadata_bytes: int  # per-token positions, segments and scores of every session
    workspace_bytes: int  # each pool's gather/dequantize scratch (quantized KV)
    archive_bytes: int  # the recall archives of evicted turns, full (recall is on with an evicting policy)
    activation_peak_bytes: int  # one prefill chunk at full context, allocator slack included
    runtime_bytes: int  # the runtime itself (see RUNTIME_BASELINE_BYTES)
    tokenizer_bytes: int  # what loading leaves besides the weights: the tokenizer
    baseline_bytes: int  # runtime_bytes + tokenizer_bytes: resident before any session
    loader_bytes: int  # held only while loading: parsed checkpoint metadata, the file's mapped pages
    load_peak_bytes: int  # baseline + loader + weights: the peak while loading
    run_peak_bytes: int  # baseline + weights + KV + cache metadata + workspace + archives + activations: a turn's peak
    total_peak_bytes: int  # the larger of the two
    max_context_tokens: int  # longest context the budget allows (KV budget, memory budget, or the model's limit)
    kv_budget_bytes: int | None = None
    memory_budget_bytes: int | None = None
    _inputs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def turns_that_fit(self, budget_bytes: int | str, tokens_per_turn: int) -> int:
        """How many turns of `tokens_per_turn` (message + reply) one session holds within a process memory
        budget, without evicting."""
        if tokens_per_turn < 1:
            raise ValueError(f"tokens per turn must be >= 1, got {tokens_per_turn}")
        return max_context_within(parse_size(budget_bytes), **self._inputs) // tokens_per_turn


def estimate(model: str | Path | ModelConfig | Any | None = None, context: int | None = None, kv_dtype: str = "auto",
             kv_budget: int | str | None = None, chunk: int = DEFAULT_CHUNK, sessions: int = 1, dtype: str = "auto",
             device: str = "cpu", memory_budget: int | str | None = None, policy: str = "none",
             weights: str = "auto", recall: str = "auto") -> Estimate:
    """Predict the memory of running `model` (a path or known name, an opened Checkpoint, or a ModelConfig).

    `context` (default: the model's limit) is the tokens each session holds, prefilled in `chunk`-token steps.
    `kv_budget` sizes each session's cache in bytes instead (an evicting `policy` then keeps it full).
    `memory_budget` (the whole process) sets max_context_tokens to the longest context that fits it.
    `weights` is the storage mode `load()` takes; the bytes are what that storage allocates (models/weights.py).
    `recall` ("auto", "on", "off"): whether each session keeps a recall archive in process (it fills only when the
    policy evicts; "off" for sessions without recall or whose archive a SessionStore keeps in its file).
    """
    if recall not in ("auto", "on", "off"):
        raise ValueError(f"recall must be auto, on or off, got {recall!r}")
    source = _source(model)
    inputs = dict(source=source, kv_dtype=kv_dtype, kv_budget=kv_budget, chunk=chunk, sessions=sessions,
                  dtype=dtype, device=device, policy=policy, weights=weights, recall=recall)
    result = _estimate(context=context, **inputs)
    longest = result.capacity_tokens if kv_budget is not None else source.config.max_context
    if memory_budget is not None:
        result.memory_budget_bytes = parse_size(memory_budget)
        longest = min(longest, max_context_within(result.memory_budget_bytes, **inputs))
    result.max_context_tokens = longest
    result._inputs = inputs
    return result


def max_context_within(budget_bytes: int, source: "_Source", kv_budget: int | str | None = None, **inputs) -> int:
    """Longest context (tokens per session) whose predicted process peak stays within `budget_bytes`; 0 if none."""
    def fits(tokens: int) -> bool:
        return _estimate(context=tokens, source=source, kv_budget=None, **inputs).total_peak_bytes <= budget_bytes

    lo, hi = 0, source.config.max_context
    if kv_budget is not None:  # a KV budget caps the cache whatever the context
        hi = _estimate(context=hi, source=source, kv_budget=kv_budget, **inputs).capacity_tokens
    while lo < hi:  # the total grows with the context: bisect on it
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


# -- the model -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    config: ModelConfig
    format: str
    file_types: dict | None = None  # HF tensor name → storage type in the file (None: a bare config)


def _source(model: Any) -> _Source:
    if isinstance(model, ModelConfig):
        return _Source(model, "none")
    if isinstance(model, _Source):
        return model
    if not hasattr(model, "config"):  # a path or name: read the metadata only
        from kvbound.loading import open_checkpoint

        model = open_checkpoint(model)
    return _Source(model.config, model.format, dict(model.file_types))


def _device_type(device: str | torch.device) -> str:
    """The device type to predict for. Unlike loading, 'cuda' is accepted without a GPU (plan on a laptop)."""
    name = str(device)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = name.split(":")[0]
    if kind not in DEVICE_TYPES:
        raise ValueError(f"unknown device '{device}'; use auto, cpu or cuda[:N]")
    return kind


def _estimate(context: int | None, source: _Source, kv_dtype: str, kv_budget: int | str | None, chunk: int,
              sessions: int, dtype: str, device: str, policy: str, weights: str = "auto", recall: str = "auto"
              ) -> Estimate:
    config = source.config
    device = _device_type(device)
    plan = plan_weights(config, source.file_types, weights, dtype, device)
    compute = plan.compute
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1 token, got {chunk}")
    if sessions < 1:
        raise ValueError(f"sessions must be >= 1, got {sessions}")
    context = config.max_context if context is None else context
    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    cache_config = (CacheConfig(budget=kv_budget, dtype=kv_dtype, policy=policy) if kv_budget is not None
                    else CacheConfig(tokens=context, dtype=kv_dtype, policy=policy))
    cache = _meta_cache(config, cache_config, compute)
    spec, pool = cache.spec, cache.pool
    kv_session = cache.reserved_bytes
    metadata = cache.metadata_bytes
    # Every read of a quantized cache dequantizes into the pool's scratch, allocated on first use and kept.
    workspace = scratch_bytes(spec, pool.num_blocks) if spec.quantized else 0
    archive = ARCHIVE_BYTES if cache.policy.evicts and recall != "off" else 0  # only what evicts fills one
    held = min(context, cache.capacity)
    chunk = prefill_chunk(chunk, cache.capacity, cache.policy.evicts)  # the step the chat will use
    activation = activation_peak(config, spec, min(chunk, held), held, device, cache.policy.needs_attention)
    if chunk > KERNEL_ROWS:  # multi-row steps dequantize int4 matrices into one shared scratch buffer
        activation += plan.scratch_bytes(config)
    weights = plan.nbytes(config)
    runtime = RUNTIME_BASELINE_BYTES[device]
    tokenizer = loader = 0
    if device == "cpu":  # device memory holds none of this
        tokenizer = config.vocab_size * TOKENIZER_BYTES_PER_VOCAB_ENTRY[source.format]
        loader = config.vocab_size * LOADING_BYTES_PER_VOCAB_ENTRY[source.format]
        if plan.quantized:
            loader += plan.load_transient_bytes(config)
    baseline = runtime + tokenizer
    load_peak = baseline + loader + weights
    run_peak = baseline + weights + sessions * (kv_session + metadata + workspace + archive) + activation
    return Estimate(
        model=config.name, format=source.format, device=device, dtype=compute, weights=plan.mode,
        weights_storage=plan.counts(), kv_dtype=spec.dtype, context=context,
        capacity_tokens=cache.capacity, chunk=chunk, sessions=sessions, weights_bytes=weights,
        kv_bytes=sessions * kv_session, kv_bytes_per_token=spec.bytes_per_token, kv_bytes_per_session=kv_session,
        cache_metadata_bytes=sessions * metadata, workspace_bytes=sessions * workspace,
        archive_bytes=sessions * archive,
        activation_peak_bytes=activation, runtime_bytes=runtime, tokenizer_bytes=tokenizer, baseline_bytes=baseline,
        loader_bytes=loader, load_peak_bytes=load_peak, run_peak_bytes=run_peak,
        total_peak_bytes=max(load_peak, run_peak), max_context_tokens=cache.capacity,
        kv_budget_bytes=parse_size(kv_budget) if kv_budget is not None else None)


def _meta_cache(config: ModelConfig, cache_config: CacheConfig, compute: str):
    """The cache a chat would get, built on the meta device: real shapes and nbytes, no memory."""
    inv_freq = torch.empty(config.head_dim // 2, device="meta")
    return build_cache(config, cache_config, compute, inv_freq, device="meta")


def scratch_bytes(spec: KVSpec, num_blocks: int) -> int:
    """Bytes of the scratch a pool of `num_blocks` allocates on its first gathered/dequantized read."""
    pool = BlockPool(spec, num_blocks, device="meta")
    pool.scratch(1)
    return pool.workspace_bytes


def activation_peak(config: ModelConfig, spec: KVSpec, tokens: int, keys: int, device: str,
                    observes: bool = False) -> int:
    """Memory a forward step of `tokens` queries over `keys` keys adds at its peak on `device`: the bytes its
    tensors take (activation_bytes) plus what the allocator keeps around them (see HEAP_FRAGMENTATION_BYTES)."""
    held, largest = _step_bytes(config, spec, tokens, keys, device, observes)
    if device != "cpu":
        return held
    return held + 2 * min(largest, GLIBC_MMAP_THRESHOLD_MAX) + HEAP_FRAGMENTATION_BYTES[device]


def activation_bytes(config: ModelConfig, spec: KVSpec, tokens: int, keys: int, device: str = "cpu",
                     observes: bool = False) -> int:
    """Bytes torch holds at the peak of one forward step of `tokens` queries over `keys` held keys (new ones
    included), weights and KV pool excluded, derived from the shapes in models/llama.py and kvcache/paged.py."""
    return _step_bytes(config, spec, tokens, keys, device, observes)[0]


def _step_bytes(config: ModelConfig, spec: KVSpec, tokens: int, keys: int, device: str,
                observes: bool) -> tuple[int, int]:
    """(bytes at the peak, the largest single tensor). Alive through the layer loop: the residual stream x and
    the block output added to it, cos/sin, the causal mask (T, S) bool. On top, the larger of the attention
    phase (normed input, q/k/v, the mask converted to the compute dtype inside SDPA, SDPA's workspace and output,
    K/V converted when the pool stores another float type, the eviction scores' (G*32, S) float logits) and the
    MLP phase (gate→silu, up, their product: 3 × (T, I))."""
    T, S, e = tokens, keys, spec.compute_element_bytes
    H, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    q_width, kv_width = config.num_heads * D, config.num_kv_heads * D
    mask = T * S if T > 1 else 0  # decode steps need no mask
    persistent = 2 * T * H * e + 2 * T * D * e + mask
    attention = T * H * e + T * (q_width + 2 * kv_width) * e + 2 * T * q_width * e  # norm out, q/k/v, sdpa out + o
    # Multi-query steps in bf16/fp16 on CPU attend in fp32 (kvcache.base.attention): q, K, V and the output are
    # upcast copies, and the mask becomes additive in fp32.
    upcast = device == "cpu" and T > 1 and spec.compute_dtype != "fp32"
    attn_dtype = "fp32" if upcast else spec.compute_dtype
    attention += mask * FLOAT_DTYPES[attn_dtype].itemsize
    if upcast:
        attention += (2 * T * q_width + 2 * S * kv_width) * 4
    workspace, sdpa_largest = _sdpa_workspace(config, T, S, attn_dtype, device)
    attention += workspace
    converted = 0
    if not spec.quantized and spec.dtype != spec.compute_dtype:
        converted = S * kv_width * e  # K and V each read from the pool and converted to the compute dtype
        attention += 2 * converted
    scores = 0
    if observes:
        scores = config.num_heads * min(T, SCORE_QUERIES) * S * 4  # eviction scores: logits, softmax, in fp32
        attention += 2 * scores + S * kv_width * 4  # (the keys are read in fp32 for them)
    mlp = T * H * e + 3 * T * I * e
    logits = config.vocab_size * (e + 4)  # the last position's logits, then as float32
    largest = max(mask * e, sdpa_largest, converted, scores, T * I * e, T * H * 4, logits)
    return persistent + max(attention, mlp) + logits, largest


def _sdpa_workspace(config: ModelConfig, T: int, S: int, compute: str, device: str) -> tuple[int, int]:
    """(bytes, largest tensor) of F.scaled_dot_product_attention's scratch beyond its output with a boolean mask
    and grouped KV heads, as torch.profiler / max_memory_allocated measured it (torch 2.11-2.13):

    CPU flash kernel: per-split accumulators, about half a query block; bf16 with 64+ queries also packs K and V
    for its brgemm kernels (a copy of both). CUDA: bf16/fp16 run cuDNN attention (flash and memory-efficient
    refuse a mask with grouped heads), whose scratch is small; fp32 falls back to the math path, which expands
    K and V to every query head and materializes the scores and probabilities (H, T, S).
    """
    e = FLOAT_DTYPES[compute].itemsize
    q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    workspace, largest = T * q_width * e // 2, T * q_width * e // 2
    if device == "cpu" and compute == "bf16" and T >= 64:
        workspace, largest = workspace + 2 * S * kv_width * e, max(largest, S * kv_width * e)
    if device == "cuda" and compute == "fp32":
        scores = config.num_heads * T * S * e
        workspace += 2 * scores + 3 * S * q_width * e + (T * S * e if T > 1 else 0)
        largest = max(largest, scores)
    return workspace, largest
