"""An optional compiled decode step (`load(..., compile=True)`, `--compile`).

Each block's two halves around attention — norm, fused q/k/v projection and RoPE; then o_proj, residual, norm,
gate/up, SwiGLU, down, residual — go through `torch.compile` (inductor, static shapes). The functions are the
model's own `Block.attention_inputs` / `Block.finish`, taking the block as an argument, so one graph per half
serves every layer (dynamo lifts the block's weights into graph inputs). Attention stays eager: it reads and
writes the paged cache, whose length changes every step. On CUDA the halves run as CUDA graphs
(`mode="reduce-overhead"`), which removes the kernel-launch cost that dominates a small model's decode step.

Measured on this project's 2-core CPU (SmolLM2-135M, default weights, one thread; `python -m benchmarks.weights
--contexts 512 2048 --compiled --no-peers --name weights_compiled`): 0.93x eager's decode rate at 512 tokens of
context and 0.98x at 2,048, with 63 MiB more peak RSS (inductor). The step's time is in the int4/int8 matmul kernels
and attention, which compilation calls as they are, while each compiled call adds guard and wrapper overhead. So it
is off by default; the greedy tokens are the same as eager's (tested).
"""

from __future__ import annotations

from typing import Callable

import torch

from kvbound.models.block import Attend, Block


class CompiledBlocks:
    def __init__(self, device: torch.device):
        mode = "reduce-overhead" if device.type == "cuda" else None
        # dynamic=False: a decode step always has one row; a new shape would recompile rather than go dynamic.
        self.attention_inputs: Callable = torch.compile(Block.attention_inputs, dynamic=False, mode=mode)
        self.finish: Callable = torch.compile(Block.finish, dynamic=False, mode=mode)
        self.cuda = device.type == "cuda"

    def __call__(self, block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 attend: Attend) -> torch.Tensor:
        q, k, v = self.attention_inputs(block, x, cos, sin)
        if self.cuda:  # a CUDA graph's outputs are overwritten by its next replay: the cache keeps its own copy
            q, k, v = q.clone(), k.clone(), v.clone()
        out = self.finish(block, x, attend(block.self_attn.layer, q, k, v))
        return out.clone() if self.cuda else out
