"""The Llama-family decoder (Llama, SmolLM2, Qwen2 with q/k/v bias, Mistral) over the KVCache interface: embedding,
the blocks (models/block.py), final norm and output projection; picks the eager, compiled or native decode step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from kvbound.config import ModelConfig
from kvbound.kvcache.base import KVCache
from kvbound.models.block import Block
from kvbound.models.compiled import CompiledBlocks
from kvbound.models.layers import RMSNorm, rope_cos_sin, rope_inv_freq
from kvbound.models.linear import DenseLinear
from kvbound.models.weights import COMPUTE_DTYPES, WeightsPlan, materialize, matrix_modules, weights_bytes

if TYPE_CHECKING:
    from kvbound.models.native_step import NativeStep

class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # The embedding table is a matrix like the others (`rows` looks tokens up), so a tied output projection
        # is the same stored matrix, quantized or not.
        self.embed_tokens = DenseLinear(config.hidden_size, config.vocab_size, bias=False)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_embeddings else DenseLinear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling),
                             persistent=False)
        self.compiled: CompiledBlocks | None = None  # a compiled single-sequence decode step (compile_decode)
        self.native_decode = True  # single-token steps through models/native_step.py where it covers the model
        self._native: NativeStep | None | bool = False  # built on the first decode step (False: not yet)

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Iterable[tuple[str, object]],
                     device: torch.device | str = "cpu", plan: WeightsPlan | None = None) -> "LlamaModel":
        """Build on the meta device and adopt each tensor as it arrives: no second copy of the weights in RAM.
        `plan` chooses each matrix's storage (models/weights.py); without one, everything stays dense in the
        dtype of the tensors given."""
        device = torch.device(device)
        tensors = iter(tensors)
        first = next(tensors, None)
        if plan is None:
            dtype = first[1].dtype if first is not None and isinstance(first[1], torch.Tensor) else torch.float32
            name = {v: k for k, v in COMPUTE_DTYPES.items()}.get(dtype, "fp32")
            plan = WeightsPlan(name, name, {m: "dense" for m in matrix_modules(config)}, device.type)
        with torch.device("meta"):
            model = cls(config)
        # Not itertools.chain([first], tensors): chain keeps its arguments, so the first tensor (the default GGUF's
        # 31 MB embedding source) would stay alive until the last one is read.
        head = [first] if first is not None else []
        del first

        def stream():
            while head:
                yield head.pop()
            yield from tensors

        def without_rope(items):
            for name, tensor in items:
                if name == "rope_freqs":
                    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, None, tensor)
                else:
                    yield name, tensor

        materialize(model, config, without_rope(stream()), plan, device)
        if model.inv_freq.is_meta:
            model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        model.inv_freq = model.inv_freq.to(device)
        model.plan = plan
        return model.eval()

    def compile_decode(self) -> None:
        """Compile the decode step (one token of one sequence): torch.compile (inductor) fuses each block's norms,
        RoPE, residuals and SwiGLU around its matmuls, CUDA graphs replay them on GPU; attention stays eager (it
        reads the cache). Prefill and batched decode stay eager. See models/compiled.py for what it measured."""
        self.compiled = CompiledBlocks(self.device)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations; dense weights)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def weights_bytes(self) -> int:
        return weights_bytes(self)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """input_ids: (1, T) → logits (1, T, V) if all_logits else (1, 1, V) for the last token.

        The cache chooses the positions (after any eviction it does to make room)."""
        positions = cache.begin(input_ids.shape[1])  # (T,)
        x = self.embed_tokens.rows(input_ids)  # (1, T, hidden)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # (T, D)
        step = self.compiled if self.compiled is not None and input_ids.shape[1] == 1 else None
        logits = None
        try:
            done = self._native_step(x, cos, sin, cache) if input_ids.shape[1] == 1 and step is None else None
            if done is not None:
                x, scores, logits = done
                for layer in range(len(self.layers) if scores is not None else 0):
                    cache.observe(layer, scores[layer])
            else:
                for block in self.layers:
                    x = block(x, cos, sin, cache.attend) if step is None else step(block, x, cos, sin, cache.attend)
        except BaseException:
            cache.rollback(0)
            raise
        cache.end()
        return logits if logits is not None else self._logits(x if all_logits else x[:, -1:])

    def native_step_ready(self) -> bool:
        """Whether single-token steps of this model run as one native call (models/native_step.py)."""
        if not self.native_decode:
            return False
        if self._native is False:
            from kvbound.models.native_step import NativeStep

            self._native = NativeStep.build(self)
        return self._native is not None

    def _native_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """The whole single-token step in one native call, when the model and the cache's step are covered."""
        plan = cache.decode_plan() if self.native_step_ready() else None
        return self._native(x, cos, sin, plan) if plan is not None else None

    @torch.inference_mode()
    def forward_batch(self, token_ids: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
        """One decode step of B sequences at once: token_ids (B,) is the next token of the sequence held in
        caches[i] → logits (B, V).

        Embeddings, norms, projections and the MLP run on the B rows together (one matmul per matrix instead of
        B); attention runs per sequence through its own cache, which picks that row's position and holds its own
        length, blocks, storage type and policy. Either every cache commits its token or none does."""
        if len({id(cache) for cache in caches}) != len(caches):
            raise ValueError("every sequence of a decode batch needs a cache of its own")
        begun: list[KVCache] = []
        try:
            positions = []
            for cache in caches:
                positions.append(cache.begin(1))  # (1,)
                begun.append(cache)
            x = self.embed_tokens.rows(token_ids[:, None])  # (B, 1, hidden)
            cos, sin = rope_cos_sin(torch.cat(positions), self.inv_freq, x.dtype)  # (B, D)
            cos, sin = cos[:, None, None], sin[:, None, None]  # (B, 1, 1, D): each row rotates by its own position

            def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                rows = [cache.attend(layer, q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i, cache in enumerate(caches)]
                return torch.cat(rows)  # (B, H, 1, D)

            for block in self.layers:
                x = block(x, cos, sin, attend)
        except BaseException:
            for cache in begun:
                cache.rollback(0)
            raise
        for cache in caches:
            cache.end()
        return self._logits(x)[:, -1]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection (the tied embedding matrix when there is no lm_head), in fp32."""
        return (self.embed_tokens if self.lm_head is None else self.lm_head)(self.norm(x)).float()
