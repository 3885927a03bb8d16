"""`load()` and the LLM handle: model + tokenizer + runner; makes chats and one-shot generations."""

from __future__ import annotations

import gc
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

import torch

from kvbound.chat import passages
from kvbound.chat.archive import Archive
from kvbound.chat.reply import Reply
from kvbound.chat.session import Chat
from kvbound.config import CacheConfig, ModelConfig
from kvbound.engine.generate import Decoder, Generation, Turn
from kvbound.engine.runner import DEFAULT_CHUNK, Runner, complete, prefill_chunk
from kvbound.engine.sampler import sampling_params
from kvbound.errors import ContextOverflowError, KVBudgetExceeded
from kvbound.kvcache.factory import build_cache, build_pool, cache_spec, reserved_bytes
from kvbound.kvcache.pool import BlockPool
from kvbound.kvcache.paged import PagedCache
from kvbound.kvcache.spec import KVSpec, format_bytes, parse_size
from kvbound.loading import open_checkpoint
from kvbound.memory import allocator
from kvbound.memory.devices import usage_bytes
from kvbound.memory.guard import DEFAULT_THRESHOLDS, MemoryEvent, MemoryGuard
from kvbound.memory.ledger import ProcessMemory, process_memory
from kvbound.models.weights import check_dtype, plan_weights


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for but CUDA is not available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device '{device}'; use auto, cpu or cuda[:N]")
    return torch.device(device)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    format: str
    arch: str
    parameters: int
    dtype: str
    weights: str  # storage mode asked for (auto, fp32, bf16, fp16, int8, int4)
    weights_storage: dict  # storage → number of matrices, e.g. {"int4": 210, "int8": 1}
    device: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_context: int
    vocab_size: int
    kv_bytes_per_token: int
    weights_bytes: int
    file_tensor_types: dict


class LLM:
    def __init__(self, path: str | Path | None = None, *, dtype: str = "auto", device: str = "auto",
                 chunk: int = DEFAULT_CHUNK, memory_budget: int | str | None = None,
                 thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS, weights: str = "auto", compile: bool = False,
                 tune_allocator: bool = False):
        # The process budget is checked before anything loads, so a bad value costs nothing.
        self.guard = MemoryGuard(memory_budget, thresholds) if memory_budget is not None else None
        self.thresholds = thresholds
        self._callbacks: list[Callable[[MemoryEvent], None]] = []
        self._chats: weakref.WeakSet = weakref.WeakSet()
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        self.device = pick_device(device)
        check_dtype(dtype)  # before reading the file
        self.checkpoint = open_checkpoint(path)
        self.config: ModelConfig = self.checkpoint.config
        self.plan = plan_weights(self.config, self.checkpoint.file_types, weights, dtype, self.device.type)
        self.dtype_name = self.plan.compute
        self.tokenizer = self.checkpoint.make_tokenizer()
        with allocator.loading_heap(tune_allocator):
            self.model = self.checkpoint.load_model(self.plan, self.device)
        # Drop the file reader: its memory map and parsed metadata would otherwise stay resident (~160 MB for
        # the default GGUF) beside weights that are already materialized.
        self.checkpoint.close()
        gc.collect()
        allocator.trim_heap()  # loading's freed temporaries go back to the OS (an action, not a setting)
        if compile:  # compiles on the first decode step (seconds), not here
            self.model.compile_decode()
        if self.guard is not None:  # loading may already cross a threshold
            self.guard.check(usage_bytes(self.device))
        self.runner = Runner(self.model, chunk=chunk)
        self.kv_spec = KVSpec.for_model(self.config, self.dtype_name)

    # -- sessions ---------------------------------------------------------------------------------------------
    def new_cache(self, cache: CacheConfig | None = None, *, pool: BlockPool | None = None,
                  **options: Any) -> PagedCache:
        """A KV cache bounded by `cache` (or CacheConfig(**options)); default: the model's full context.
        With `pool` (from `shared_pool`), sequences share one budget and identical prefix blocks."""
        if cache is None:
            cache = CacheConfig(**options)
        elif options:
            raise TypeError("give either a CacheConfig or cache options, not both")
        if self.guard is not None and pool is None:  # the pool is preallocated: admit it before allocating
            self.guard.admit(usage_bytes(self.device) + reserved_bytes(self.config, cache, self.dtype_name))
        return build_cache(self.config, cache, self.dtype_name, self.model.inv_freq, device=self.device, pool=pool)

    def shared_pool(self, budget: int | str, dtype: str = "auto", block_size: int = 32) -> BlockPool:
        """One KV budget for many chats: pass it as `llm.chat(..., pool=pool)`; equal system prompts share blocks."""
        config = CacheConfig(budget=budget, dtype=dtype, block_size=block_size)
        spec = cache_spec(self.config, config, self.dtype_name)
        capacity = spec.tokens_in(parse_size(budget), sequences=0)
        if capacity < spec.block_size:
            raise KVBudgetExceeded(
                f"a shared KV budget of {format_bytes(parse_size(budget))} holds less than one {spec.block_size}-token "
                f"block ({format_bytes(spec.bytes_per_block)} with {spec.dtype} KV); raise the budget",
                needed=spec.block_size, available=capacity)
        return build_pool(self.config, config, self.dtype_name, self.device, capacity=capacity)

    def chat(self, system: str | None = None, *, cache: CacheConfig | None = None, pool: BlockPool | None = None,
             recall: str | bool = "auto", archive: Archive | None = None, **options: Any) -> Chat:
        """A new conversation with its own KV cache. Options: budget='64MiB' | tokens=N, dtype, policy, ...

        `recall`: "auto" (on when the policy can evict), "on"/True or "off"/False: keep the text of evicted turns
        and bring the best matches for each new message back into the cache for that turn (chat/archive.py).
        `archive`: where that text goes: in process if None, or `SessionStore.archive(session_id)` (its file)."""
        if system is not None and not isinstance(system, str):
            raise ValueError("system must be a string")
        recall_on = _recall_choice(recall)
        kv = self.new_cache(cache, pool=pool, **options)
        return Chat(self, kv, system=system or None, recall=kv.policy.evicts if recall_on is None else recall_on,
                    archive=archive)

    def track(self, chat: Chat) -> None:
        """Count `chat` in `memory()` (until it is garbage) and send its KV guard's events to every
        `on_memory_event` callback, present and future. Each Chat calls it once, as it is made."""
        self._chats.add(chat)
        for fn in self._callbacks:
            chat.kv_guard.on_event(fn)

    # -- memory ---------------------------------------------------------------------------------------------------
    def memory(self) -> ProcessMemory:
        """The process's memory now: weights, every live chat's KV (each pool once), RSS, device figures."""
        return process_memory(self, [c.cache for c in list(self._chats)])

    def on_memory_event(self, fn: Callable[[MemoryEvent], None]) -> Callable[[MemoryEvent], None]:
        """Call `fn(event)` on every memory event (threshold crossings, refusals) of this LLM and its chats."""
        self._callbacks.append(fn)
        if self.guard is not None:
            self.guard.on_event(fn)
        for chat in list(self._chats):
            chat.kv_guard.on_event(fn)
        return fn

    def generate(self, prompt: str, *, system: str | None = None, raw: bool = False,
                 cache: CacheConfig | None = None, recall: str | bool = "auto", **sampling: Any) -> Reply:
        """One user message through the chat template (or `raw` text completion) in a fresh cache."""
        if raw:
            completion = self.stream_raw(prompt, cache=cache, recall=recall, **sampling)
            for _ in completion:
                pass
            return completion.reply
        return self.chat(system=system, cache=cache, recall=recall).send(prompt, **sampling)

    def stream_raw(self, prompt: str, *, cache: CacheConfig | None = None, pool: BlockPool | None = None,
                   recall: str | bool = "auto", **sampling: Any) -> "Completion":
        """A plain-text completion (no chat template): iterate it for text pieces; `.reply` holds the Reply after."""
        _check_prompt(prompt)
        _recall_choice(recall)
        sampling_params(self.config.vocab_size, **sampling)  # bad options fail here, not at the first piece
        completion = Completion()
        completion.pieces = completion.run(
            lambda: self.start_raw(prompt, cache=cache, pool=pool, recall=recall, **sampling))
        return completion

    def start_raw(self, prompt: str, *, cache: CacheConfig | None = None, pool: BlockPool | None = None,
                  recall: str | bool = "auto", **sampling: Any) -> Turn:
        """Prefill `prompt` (no chat template) into a fresh cache and return the completion ready to decode; its
        `commit()` returns the Reply and frees the cache, as `abort()` does.

        `recall` ("auto": on when the policy can evict): passages of the prompt the cache evicts are searched with
        the prompt's last sentences and the best come back just before them (chat/passages.py)."""
        return complete(self.begin_raw(prompt, cache=cache, pool=pool, recall=recall, **sampling))

    def begin_raw(self, prompt: str, *, cache: CacheConfig | None = None, pool: BlockPool | None = None,
                  recall: str | bool = "auto", **sampling: Any) -> Generator[None, None, Turn]:
        """`start_raw` one prefill chunk per step (a scheduler interleaves it with other sequences' decode steps).
        The arguments are checked now; the cache is made at the first step and freed if it is closed midway."""
        _check_prompt(prompt)
        recall_on = _recall_choice(recall)
        params = sampling_params(self.config.vocab_size, **sampling)
        return self._prefill_raw(prompt, cache, pool, recall_on, params)

    def _prefill_raw(self, prompt: str, cache: CacheConfig | None, pool: BlockPool | None, recall_on: bool | None,
                     params: Any) -> Generator[None, None, Turn]:
        started = time.perf_counter()
        ids = self.tokenizer.encode(prompt, add_special=True)
        kv = self.new_cache(cache, pool=pool)
        try:
            if not kv.policy.evicts and len(ids) + 1 > kv.capacity:
                raise ContextOverflowError(f"the prompt is {len(ids)} tokens and the KV cache holds {kv.capacity}; "
                                           "shorten the prompt, raise the KV budget or choose an evicting policy",
                                           needed=len(ids) + 1, available=kv.capacity)
            chunk = prefill_chunk(self.runner.chunk, kv.capacity, kv.policy.evicts)
            if recall_on or (recall_on is None and kv.policy.evicts):  # a no-op unless the prompt gets evicted
                logits, recalled = yield from passages.prefill(self.runner, self.tokenizer, kv, prompt, ids, chunk,
                                                               reserve=params.max_new_tokens)
            else:
                logits, recalled = (yield from self.runner.prefill_steps(ids, kv, chunk)), {}
            result = Generation(prefill_s=time.perf_counter() - started)
            decoder = Decoder(self.runner, self.tokenizer, kv, logits, params, ids, result)
        except BaseException:
            kv.free()
            raise

        def commit() -> Reply:
            decoded = max(len(result.token_ids) - 1, 0)
            reply = Reply(
                text=result.text, token_ids=result.token_ids, prompt_tokens=len(ids), context_tokens=kv.num_tokens,
                kv_bytes=kv.nbytes, elapsed_s=time.perf_counter() - started,
                finish_reason=result.finish_reason, ttft_s=result.prefill_s,
                decode_tokens_per_s=decoded / result.decode_s if result.decode_s > 0 else 0.0,
                receipt=asdict(kv.receipt()), recall=recalled, logprobs=result.logprobs)
            kv.free()
            return reply

        return Turn(decoder, commit, kv.free)

    def info(self) -> ModelInfo:
        c = self.config
        return ModelInfo(
            name=c.name, path=str(self.checkpoint.path), format=self.checkpoint.format, arch=c.arch,
            parameters=c.num_params, dtype=self.dtype_name, weights=self.plan.mode,
            weights_storage=self.plan.counts(), device=str(self.device), layers=c.num_layers, heads=c.num_heads, kv_heads=c.num_kv_heads,
            head_dim=c.head_dim, max_context=c.max_context, vocab_size=c.vocab_size,
            kv_bytes_per_token=int(self.kv_spec.bytes_per_token),
            weights_bytes=self.model.weights_bytes(),
            file_tensor_types=dict(self.checkpoint.tensor_types))


RECALL_CHOICES = {"auto": None, "on": True, "off": False, True: True, False: False}


def _recall_choice(recall: str | bool) -> bool | None:
    """True/False, or None for "auto" (on when the cache's policy can evict)."""
    if not isinstance(recall, (str, bool)) or recall not in RECALL_CHOICES:
        raise ValueError(f"recall must be one of auto, on, off (or True/False), got {recall!r}")
    return RECALL_CHOICES[recall]


def _check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("the prompt is empty; give some text to complete")


class Completion:
    """The text pieces of a raw completion as they are generated; `reply` is set once they are exhausted."""

    def __init__(self) -> None:
        self.pieces: Iterator[str] = iter(())
        self.reply: Reply | None = None
        self.cache: PagedCache | None = None  # the KV cache while the completion runs (from its first piece on)

    def run(self, start: Callable[[], Turn]) -> Iterator[str]:
        turn = start()
        self.cache = turn.decoder.cache
        try:
            self.reply = yield from turn.run()
        finally:
            self.cache = None

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def close(self) -> None:
        self.pieces.close()


def load(model: str | Path | None = None, *, dtype: str = "auto", device: str = "auto",
         chunk: int = DEFAULT_CHUNK, memory_budget: int | str | None = None, weights: str = "auto",
         compile: bool = False, tune_allocator: bool = False) -> LLM:
    """Load a model: a .gguf path, a safetensors directory, or a known name (default: smollm2-135m).

    `weights` chooses how matrices are stored: `auto` keeps a quantized GGUF quantized (4-bit types as int4, 8-bit
    as int8, computing in bf16), `int8`/`int4` quantize any checkpoint on load, `fp32`/`bf16`/`fp16` are dense.

    `memory_budget` ('1GiB') bounds the whole process: each turn's predicted peak is checked before it runs
    (a smaller prefill chunk is tried first), and a turn that cannot fit raises MemoryBudgetExceeded.

    `compile=True` compiles the decode step with torch.compile (CUDA graphs on GPU; models/compiled.py): the same
    tokens, a few seconds of compiling on the first step; measured 0.93-0.98x eager on CPU.

    After loading, the heap's free pages go back to the OS (glibc's malloc_trim: it changes no setting); that keeps
    ~145 MiB of loading's freed temporaries out of the RSS (memory/allocator.py). `tune_allocator=True` also sets
    glibc's mmap threshold while loading (a process-wide setting, so a library leaves it off and the process's owner
    turns it on: the CLI does)."""
    return LLM(model, dtype=dtype, device=device, chunk=chunk, memory_budget=memory_budget, weights=weights,
               compile=compile, tune_allocator=tune_allocator)
