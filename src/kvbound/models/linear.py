"""Weight storage for the model's matrices: dense, int8 per output channel, int4 in groups of 32 along the input.

Every storage class is a module with the same two verbs — `forward(x)` = x @ Wᵀ and `rows(ids)` = W[ids] (the
embedding lookup, so a tied embedding/output matrix is stored once) — and the model never asks which one it has.
Quantized matrices stay quantized in memory and run through PyTorch's low-bit matmul kernels:
`_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm` (CUDA) and `_weight_int8pack_mm`. Measured on this
project's CPU (2 threads, one decode row, bf16 activations): 3072×576 int4 52 µs vs fp32 129 µs; the 49152×576
output projection int4 0.82 ms, int8 0.96 ms vs fp32 3.5 ms. With fp32 activations the same kernels are 10-30×
slower, so quantized storage computes in bf16/fp16. For many rows at once (prefill) the kernels lose to a dense
bf16 GEMM (512 rows × 3072×576: int4 11.6 ms vs dequantize + bf16 GEMM 3.3 ms), so larger inputs dequantize the
matrix into one scratch buffer shared by every layer and multiply densely: bounded memory, no per-call allocation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32  # int4 group size along the input dimension (= GGUF's block of 32)
CPU_BLOCK_N = 64  # the CPU int4 packing interleaves output rows in blocks of 64
ROWS_PER_PASS = 4096  # rows re-quantized at a time on load (bounds the fp32 transient)
ROW_BUCKET = 64  # multi-row low-precision GEMMs run on row counts rounded up to this (see bucketed_mm)
KERNEL_ROWS = 16  # up to this many input rows use the low-bit kernel; more dequantize into the scratch buffer


@dataclass
class Int4Source:
    """Group-wise 4-bit values as GGUF's Q4_0/Q4_1 hold them: w = q · scale + low, q in 0..15, one scale and one
    `low` per 32 inputs. Concatenating two sources along N (rows) gives the source of the fused matrix."""

    q: torch.Tensor  # (N, K) uint8, 0..15
    scale: torch.Tensor  # (N, K/32) float32
    low: torch.Tensor  # (N, K/32) float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Int4Source":
        """Asymmetric min/max quantization per group of 32 (what Q4_1 does), for dense checkpoints."""
        N, K = w.shape
        g = w.float().reshape(N, K // GROUP, GROUP)  # (N, K/32, 32)
        low, high = g.amin(-1), g.amax(-1)
        scale = (high - low) / 15
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = ((g - low[..., None]) / safe[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        return cls(q.reshape(N, K), scale, low)

    def dequantize(self) -> torch.Tensor:
        N, K = self.q.shape
        g = self.q.reshape(N, K // GROUP, GROUP).float()
        return (g * self.scale[..., None] + self.low[..., None]).reshape(N, K)

    def take(self, rows: torch.Tensor) -> "Int4Source":
        return Int4Source(self.q[rows], self.scale[rows], self.low[rows])


@dataclass
class Int8Source:
    """8-bit values with one scale per group of 32 inputs (GGUF Q8_0): w = q · scale, q in -127..127."""

    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N, K/32) float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        N, K = self.q.shape
        return (self.q.reshape(N, K // GROUP, GROUP).float() * self.scale[..., None]).reshape(N, K)

    def take(self, rows: torch.Tensor) -> "Int8Source":
        return Int8Source(self.q[rows], self.scale[rows])


def concat(parts: list) -> torch.Tensor | Int4Source | Int8Source:
    """Stack matrices along their output rows (fused QKV / gate-up), keeping quantized ones quantized."""
    first = parts[0]
    if len(parts) == 1:
        return first  # no copy: a 100+ MB embedding table must not exist twice while loading
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, 0)
    if all(type(p) is type(first) for p in parts):
        fields = first.__dataclass_fields__
        return type(first)(**{f: torch.cat([getattr(p, f) for p in parts], 0) for f in fields})
    # Mixed storage types in one fused matrix (a GGUF that quantized q and v differently): meet in fp32.
    return torch.cat([p if isinstance(p, torch.Tensor) else p.dequantize() for p in parts], 0)


def bucketed_mm(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ w_t (K, N) (+ bias, added before the result is rounded to x's dtype, as F.linear does) with M
    padded to a multiple of ROW_BUCKET. A bf16/fp16 GEMM on CPU (oneDNN) compiles and keeps a kernel for every row
    count it sees; a chat's prefills have a new count each turn, and RSS grew ~0.5 MB per new shape without bound
    (measured). With buckets there are at most chunk / 64 shapes."""
    M = x.shape[0]
    padded = -(-M // ROW_BUCKET) * ROW_BUCKET
    if padded != M:
        full = x.new_zeros(padded, x.shape[1])
        full[:M] = x
        x = full
    y = x @ w_t if bias is None else torch.addmm(bias, x, w_t)
    return y[:M]


class Scratch:
    """One dense buffer that quantized matrices dequantize into for multi-row inputs; grows to the largest
    matrix once (a few MB) and is shared by every layer, so prefill allocates nothing per call."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        b = self.buffer
        if b is None or b.numel() < numel or b.dtype != dtype or b.device != device:
            self.buffer = b = torch.empty(numel, dtype=dtype, device=device)
        return b[:numel]


class DenseLinear(nn.Linear):
    """A plain matrix in the compute dtype (also the embedding table: `rows`)."""

    storage = "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or x.device.type != "cpu" or x.numel() == x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        y = bucketed_mm(x.reshape(-1, self.in_features), self.weight.t(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Int8Linear(nn.Module):
    """int8 weights, one scale per output row (symmetric). GGUF Q8_0 groups are re-scaled to one scale per row:
    the per-weight rounding error grows from half a group step to half a row step (measured on the default model's
    tied embedding: see BENCHMARKS.md, weights)."""

    storage = "int8"

    def __init__(self, source: torch.Tensor | Int8Source | Int4Source, bias: torch.Tensor | None,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        N, K = source.shape
        self.out_features, self.in_features = N, K
        weight, scale = torch.empty(N, K, dtype=torch.int8), torch.empty(N)
        # A few thousand rows at a time: the vocabulary matrix in fp32 would be a transient of 100+ MB.
        for start in range(0, N, ROWS_PER_PASS):
            rows = slice(start, start + ROWS_PER_PASS)
            w = (source[rows] if isinstance(source, torch.Tensor) else source.take(rows).dequantize()).float()
            scale[rows] = w.abs().amax(1).clamp_min(1e-12) / 127  # (rows,)
            weight[rows] = (w / scale[rows, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight", weight.to(device))
        self.register_buffer("scale", scale.to(dtype).to(device))
        self.register_buffer("bias", None if bias is None else bias.to(dtype).to(device))
        self.kernel = _int8_kernel_works(self.weight.device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.kernel:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)  # (M, N)
        else:  # no int8 kernel on this device: dequantize this matrix (bounded: one matrix, transient)
            y = F.linear(x2, self.weight.to(x.dtype) * self.scale[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scale.dtype) * self.scale[ids, None]

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]


class Int4Linear(nn.Module):
    """int4 weights in groups of 32 along the input, packed for PyTorch's int4 matmul (tinygemm layout on CUDA, the
    CPU kernel's layout on CPU); per group one scale and one zero point: w = (q - 8) · scale + zero. A GGUF Q4_1
    block (w = q · d + m) maps exactly: scale = d, zero = m + 8d (rounded to the compute dtype)."""

    storage = "int4"

    def __init__(self, source: torch.Tensor | Int4Source | Int8Source, bias: torch.Tensor | None,
                 dtype: torch.dtype, device: torch.device, scratch: Scratch | None = None, lookup: bool = False):
        super().__init__()
        if not isinstance(source, Int4Source):
            source = concat([Int4Source.quantize(source[r] if isinstance(source, torch.Tensor)
                                                 else source.take(r).dequantize())
                             for r in (slice(i, i + ROWS_PER_PASS) for i in range(0, source.shape[0], ROWS_PER_PASS))])
        N, K = source.shape
        if K % GROUP:
            raise ValueError(f"int4 storage needs the input size to be a multiple of {GROUP}, got {K}")
        self.out_features, self.in_features = N, K
        self.cuda = device.type == "cuda"
        # CPU packing works on blocks of 64 output rows; pad with zero rows and slice them off the output.
        self.padded = N if self.cuda else math.ceil(N / CPU_BLOCK_N) * CPU_BLOCK_N
        q = source.q
        scale, zero = source.scale, source.low + 8 * source.scale  # (N, K/32)
        if self.padded != N:
            pad = self.padded - N
            q = torch.cat([q, torch.full((pad, K), 8, dtype=torch.uint8)])
            scale = torch.cat([scale, torch.zeros(pad, K // GROUP)])
            zero = torch.cat([zero, torch.zeros(pad, K // GROUP)])
        if self.cuda:  # tinygemm wants (N, K/2) uint8, even inputs in the high nibble; K must divide by 32 tiles
            nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, 2)
            # tinygemm's tiles cannot be read back row by row: an embedding table keeps its nibbles as well.
            self.register_buffer("nibbles", nibbles if lookup else None)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.register_buffer("packed", packed.to(device))
        scales_zeros = torch.stack([scale.t(), zero.t()], -1)  # (K/32, N, 2)
        self.register_buffer("scales_zeros", scales_zeros.to(dtype).contiguous().to(device))
        self.register_buffer("bias", None if bias is None else bias.to(dtype).to(device))
        self.scratch = scratch  # None: always the kernel (the vocabulary matrix, whose scratch would be ~50 MB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.cuda or self.scratch is None or x2.shape[0] <= KERNEL_ROWS:
            if self.cuda:
                y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, GROUP, self.scales_zeros)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scales_zeros)
            if self.padded != self.out_features:
                y = y[:, : self.out_features]
        else:
            y = bucketed_mm(x2, self._dequantize_t(x2.dtype)[:, : self.out_features])  # (M, K) @ (K, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _dequantize_t(self, dtype: torch.dtype) -> torch.Tensor:
        """Wᵀ (K, N_padded) in `dtype`, written into the shared scratch buffer (CPU layout only).

        The CPU packing stores, per block of 64 output rows, for each input k one byte per row n < 32 of the
        block: the low nibble is row n, the high nibble row n + 32 — so Wᵀ falls out without a transpose."""
        K, N = self.in_features, self.padded
        blocks = self.packed.view(N // CPU_BLOCK_N, K, CPU_BLOCK_N // 2)  # (N/64, K, 32) bytes
        out = self.scratch.get(K * N, dtype, self.packed.device).view(K // GROUP, GROUP, N // CPU_BLOCK_N, 2,
                                                                       CPU_BLOCK_N // 2)
        src = blocks.view(N // CPU_BLOCK_N, K // GROUP, GROUP, CPU_BLOCK_N // 2).permute(1, 2, 0, 3)
        out[:, :, :, 0].copy_(src & 15)  # rows n < 32 of each block
        out[:, :, :, 1].copy_(src >> 4)  # rows n ≥ 32
        w = out.view(K // GROUP, GROUP, N)  # (K/32, 32, N) holding q
        scale, zero = self.scales_zeros[..., 0], self.scales_zeros[..., 1]  # (K/32, N)
        w.sub_(8).mul_(scale[:, None, :].to(dtype)).add_(zero[:, None, :].to(dtype))
        return w.view(K, N)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows: unpack only the asked-for rows."""
        dtype = self.scales_zeros.dtype
        K = self.in_features
        flat = ids.reshape(-1)
        if self.cuda:
            if self.nibbles is None:
                raise RuntimeError("this int4 matrix was packed for matmul only; build it with lookup=True")
            nib = self.nibbles[flat]  # (T, K/2)
            q = torch.stack([nib >> 4, nib & 15], -1).view(-1, K).to(dtype)
        else:
            block, within = flat // CPU_BLOCK_N, flat % CPU_BLOCK_N
            blocks = self.packed.view(-1, K, CPU_BLOCK_N // 2)  # (N/64, K, 32)
            bytes_ = blocks[block, :, within % (CPU_BLOCK_N // 2)]  # (T, K)
            q = torch.where((within < CPU_BLOCK_N // 2)[:, None], bytes_ & 15, bytes_ >> 4).to(dtype)
        sz = self.scales_zeros[:, flat].to(dtype)  # (K/32, T, 2)
        w = (q.view(-1, K // GROUP, GROUP) - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
        return w.view(*ids.shape, K)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features, device=self.packed.device)).float()


def _int8_kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `_weight_int8pack_mm` runs here (CPU always; other devices depend on the PyTorch build)."""
    try:
        torch.ops.aten._weight_int8pack_mm(torch.zeros(1, 32, dtype=dtype, device=device),
                                           torch.zeros(8, 32, dtype=torch.int8, device=device),
                                           torch.ones(8, dtype=dtype, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False
