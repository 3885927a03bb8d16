"""The single-token decode step as one native call (kvcache/kernels/step.c), for the models it covers: every layer
matrix int4 in PyTorch's CPU packing (Int4Linear), bf16 activations and norms, SwiGLU, KV on the CPU (float, or
int8/int4 between the steps that fill a block).

The eager step of the default model is ~3,000 PyTorch operators, most of them too small to pay for their own
dispatch; the native step runs the same arithmetic, rounding to bf16 where the eager operators do, in one call. The
eager step stays the reference and the fallback: other weights modes, compute dtypes, devices and steps (a
quantized block's last token, sliding windows, multi-token steps) run it unchanged; a decode batch takes the native
step once per sequence (engine/runner.py).
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_float, c_int, c_int64, c_void_p
from typing import TYPE_CHECKING

import torch

from kvbound.kvcache import native
from kvbound.kvcache.base import DecodePlan
from kvbound.models.linear import Int4Linear, Int8Linear

if TYPE_CHECKING:
    from kvbound.models.llama import LlamaModel


class _Int4(ctypes.Structure):
    _fields_ = [("packed", c_void_p), ("sz", c_void_p), ("bias", c_void_p), ("n", c_int64), ("k", c_int64),
                ("padded", c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", c_void_p), ("post_norm", c_void_p), ("qkv", _Int4), ("o", _Int4), ("gate_up", _Int4),
                ("down", _Int4)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", c_int), ("hidden", c_int), ("n_heads", c_int), ("n_kv", c_int), ("head_dim", c_int),
                ("inter", c_int), ("eps", c_float), ("layers", POINTER(_Layer)), ("final_norm", c_void_p),
                ("head_kind", c_int), ("head_w", c_void_p), ("head_scale", c_void_p), ("head4", _Int4),
                ("vocab", c_int64), ("k_pool", c_void_p), ("v_pool", c_void_p), ("kv_kind", c_int), ("block", c_int),
                ("slots", c_int64), ("k_scale", c_void_p), ("k_zero", c_void_p), ("v_scale", c_void_p),
                ("v_zero", c_void_p), ("bits", c_int), ("group", c_int), ("num_blocks", c_int64), ("res_k", c_void_p),
                ("res_v", c_void_p), ("res_kind", c_int), ("rest", c_int64)]


HEAD_NONE, HEAD_INT8, HEAD_INT4 = 0, 1, 2


def _int4(m: Int4Linear) -> _Int4:
    bias = m.bias.data_ptr() if m.bias is not None else None
    return _Int4(m.packed.data_ptr(), m.scales_zeros.data_ptr(), bias, m.out_features, m.in_features, m.padded)


def _covered(model: LlamaModel) -> bool:
    bf16 = torch.bfloat16
    if model.device.type != "cpu" or model.dtype != bf16 or model.compiled is not None:
        return False
    for block in model.layers:
        mats = (block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj)
        if not all(isinstance(m, Int4Linear) and not m.cuda and m.scales_zeros.dtype == bf16 and
                   m.packed.is_contiguous() and m.scales_zeros.is_contiguous() and
                   (m.bias is None or (m.bias.dtype == bf16 and m.bias.is_contiguous())) for m in mats):
            return False
        if block.input_layernorm.weight.dtype != bf16 or block.post_attention_layernorm.weight.dtype != bf16:
            return False
    return True


class NativeStep:
    """The model's decode step in C; `build` says whether this model is covered (None: use the eager step)."""

    def __init__(self, model: LlamaModel):
        cfg = model.config
        self.layers = (_Layer * cfg.num_layers)(*(
            _Layer(b.input_layernorm.weight.data_ptr(), b.post_attention_layernorm.weight.data_ptr(),
                   _int4(b.self_attn.qkv_proj), _int4(b.self_attn.o_proj), _int4(b.mlp.gate_up_proj),
                   _int4(b.mlp.down_proj)) for b in model.layers))
        self.desc = _Model(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.rms_norm_eps, self.layers, model.norm.weight.data_ptr())
        head = model.embed_tokens if model.lm_head is None else model.lm_head
        if (isinstance(head, Int8Linear) and head.kernel and head.bias is None and head.scale.dtype == torch.bfloat16
                and head.weight.is_contiguous()):
            self.desc.head_kind, self.desc.head_w, self.desc.head_scale = (
                HEAD_INT8, head.weight.data_ptr(), head.scale.data_ptr())
        elif isinstance(head, Int4Linear) and not head.cuda and head.bias is None:
            self.desc.head_kind, self.desc.head4 = HEAD_INT4, _int4(head)
        self.desc.vocab = cfg.vocab_size
        self.model = model  # the tensors the descriptor points into live as long as the model

    @classmethod
    def build(cls, model: LlamaModel) -> NativeStep | None:
        return cls(model) if native.available() and _covered(model) else None

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: DecodePlan
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """x (1, 1, hidden) bf16, the token's embedding; cos/sin (1, head_dim) bf16. Returns the last layer's
        output (1, 1, hidden), each layer's raw attention logits (layers, n_kv, g, held) when the plan asks for them,
        and the logits (1, 1, vocab) fp32 when the model's output matrix is one the step reads (else None: compute
        them from the output); or None when the step is past the kernel's sizes (run the eager step: the cache
        rows it wrote are rewritten)."""
        quantized = plan.k_scale is not None
        kind = 0 if quantized else native.KINDS.get(plan.k.dtype)
        res_kind = native.KINDS.get(plan.res_k.dtype) if quantized else 1
        if kind not in (0, 1, 2) or res_kind not in (1, 2) or cos.dtype != torch.bfloat16 or x.dtype != torch.bfloat16:
            return None
        cfg = self.model.config
        d = self.desc
        d.k_pool, d.v_pool, d.kv_kind = plan.k.data_ptr(), plan.v.data_ptr(), kind
        d.block, d.slots = plan.block, plan.k.shape[2]
        if quantized:
            d.k_scale, d.k_zero, d.v_scale, d.v_zero = (t.data_ptr() for t in (plan.k_scale, plan.k_zero,
                                                                               plan.v_scale, plan.v_zero))
            d.bits, d.group, d.num_blocks = plan.bits, plan.group, plan.k_scale.shape[2]
            d.res_k, d.res_v, d.res_kind, d.rest = plan.res_k.data_ptr(), plan.res_v.data_ptr(), res_kind, plan.rest
        hidden = x.reshape(-1).contiguous().clone()  # (hidden,): written in place with the output
        cos, sin = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
        g = cfg.num_heads // cfg.num_kv_heads
        scores = torch.empty(cfg.num_layers, cfg.num_kv_heads, g, plan.held) if plan.observe else None
        logits = torch.empty(1, 1, cfg.vocab_size) if d.head_kind != HEAD_NONE else None
        rc = native.library().kvb_decode_step(
            ctypes.byref(d), hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(), plan.slot, plan.table.data_ptr(),
            plan.table.numel(), plan.held, scores.data_ptr() if scores is not None else None,
            logits.data_ptr() if logits is not None else None, torch.get_num_threads())
        return None if rc != 0 else (hidden.view(1, 1, -1), scores, logits)
