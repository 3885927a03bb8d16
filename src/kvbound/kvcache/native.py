"""The native decode-attention kernels (kernels/qattn.c), compiled on first use and loaded with ctypes.

A decode step reads every held token once per layer. SDPA needs the layer's K/V as one tensor: a quantized cache
dequantized its whole layer into a float scratch first (int8 KV ran 2.3x slower than bf16 at 8k tokens), and a
float cache whose blocks are not consecutive gathered them into a scratch. The kernels walk the block table
themselves and attend block by block with an online softmax: quantized blocks are dequantized into an L1-sized
tile, float blocks are read in place (fp32) or widened into the tile (bf16/fp16), so each KV byte is read once.

It is plain C (no PyTorch headers: it compiles in about a second) built with the system's C compiler for this CPU
(`-O3 -march=native`) into a per-user cache, keyed by the source, the flags and the CPU, and written atomically so
concurrent processes can race safely. Without a compiler, or with KVBOUND_NATIVE=0, caches use the eager path; the
results are the same up to float rounding (tested).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("kvbound")

KERNELS = Path(__file__).with_name("kernels")
SOURCES = ("qattn.c", "step.c", "pool.c")  # decode attention; the whole decode step (models/native_step.py); threads
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c11", "-ffp-contract=fast", "-pthread", "-shared", "-fPIC")
_Q = [ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int]  # q, kind, scale, n_kv, g, D
_QUANT_ARGTYPES = [*_Q, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # kc, ks, kz
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # vc, vs, vz
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,  # slots, blocks, B, G, bits
                   ctypes.c_void_p, ctypes.c_int64,  # table, nblocks
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,  # rk, rv, rest,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]  # res_stride, res_kind; out, scores, threads
_FLOAT_ARGTYPES = [*_Q, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,  # kv kind, kf, vf
                   ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # slots, B, table,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]  # nblocks, held; out, scores, threads
_STEP_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # model, x, cos, sin
                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # slot, table, nblocks, held
                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]  # scores, logits, threads
KINDS = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}  # the kernel's float kinds (0 is quantized)


def cache_dir() -> Path:
    root = os.environ.get("KVBOUND_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "kvbound")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the architecture and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def _build(compiler: str) -> Path:
    source = b"".join((KERNELS / name).read_bytes() for name in (*SOURCES, "kvb.h"))
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, _cpu_signature())).encode()).hexdigest()[:16]
    target = cache_dir() / f"qattn-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, f"-I{KERNELS}", *(str(KERNELS / n) for n in SOURCES), "-o", str(out),
                               "-lm"], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: a racing process either sees no file or a whole one
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (KVBOUND_NATIVE=0, no C compiler, or a failed build; the reason is logged)."""
    if os.environ.get("KVBOUND_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        logger.info("no C compiler found: decode steps run on the eager path")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("the native decode kernels could not be built (%s); using the eager path", exc)
        return None
    for fn, argtypes in ((lib.kvb_qattn_decode, _QUANT_ARGTYPES), (lib.kvb_fattn_decode, _FLOAT_ARGTYPES),
                         (lib.kvb_decode_step, _STEP_ARGTYPES)):
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along its last dimension and rows D apart (a no-op for the usual layouts)."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def _usable(q: torch.Tensor) -> bool:
    return library() is not None and q.device.type == "cpu" and q.dtype in KINDS


def _outputs(q: torch.Tensor, n_kv: int, tokens: int, with_scores: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_heads, D = q.shape
    out = torch.empty(n_heads, D, dtype=q.dtype)  # (H, D)
    return out, torch.empty(n_kv, n_heads // n_kv, tokens, dtype=torch.float32) if with_scores else None


def _threads(threads: int | None) -> int:
    return torch.get_num_threads() if threads is None else threads


def decode_attention(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                     v: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, *, block: int, group: int,
                     bits: int, table: torch.Tensor, res_k: torch.Tensor, res_v: torch.Tensor,
                     with_scores: bool = False, threads: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One query per query head over one layer of a quantized pool and a residual window.

    q (n_heads, D) fp32/bf16/fp16; k/v (n_kv, slots, D') uint8 and their scales/zeros as BlockPool stores one layer
    (contiguous); table (nblocks,) int64 block ids in sequence order; res_k/res_v (n_kv, rest, D) float, rows
    contiguous (a slice of the residual window is fine). Returns (out (n_heads, D) in q's dtype, raw scaled logits
    (n_kv, n_heads // n_kv, S) fp32 or None), or None when the kernel is unavailable or the shapes are past its tile
    sizes (use the eager path then). Long sequences are split among `threads` threads (default: PyTorch's intra-op
    thread count), each taking at least 32 blocks."""
    if not _usable(q) or res_k.dtype not in KINDS:
        return None
    if table.dtype != torch.int64 or not all(t.is_contiguous() for t in (k, k_scale, k_zero, v, v_scale, v_zero,
                                                                          table)):
        raise ValueError("the native KV kernel needs contiguous pool tensors and an int64 block table")
    q, res_k, res_v = _rows(q), _rows(res_k), _rows(res_v.to(res_k.dtype))
    if res_v.stride() != res_k.stride():
        res_k, res_v = res_k.contiguous(), res_v.contiguous()
    n_kv, slots, _ = k.shape
    n_heads, D = q.shape
    nblocks, rest = table.numel(), res_k.shape[1]
    out, scores = _outputs(q, n_kv, nblocks * block + rest, with_scores)
    rc = library().kvb_qattn_decode(
        _ptr(q), KINDS[q.dtype], D ** -0.5, n_kv, n_heads // n_kv, D, _ptr(k), _ptr(k_scale), _ptr(k_zero), _ptr(v),
        _ptr(v_scale), _ptr(v_zero), slots, k_scale.shape[1], block, group, bits, _ptr(table), nblocks, _ptr(res_k),
        _ptr(res_v), rest, res_k.stride(0) // D if n_kv > 1 else rest, KINDS[res_k.dtype], _ptr(out), _ptr(scores),
        _threads(threads))
    return None if rc != 0 else (out, scores)


def decode_attention_float(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, table: torch.Tensor,
                           held: int, with_scores: bool = False, threads: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One query per query head over one layer of a float pool, its blocks read in place.

    q (n_heads, D) fp32/bf16/fp16; k/v (n_kv, slots, D) fp32/bf16/fp16 as BlockPool stores one layer (contiguous);
    table (nblocks,) int64 block ids in sequence order, holding `held` tokens (the last block may be partial).
    Returns (out (n_heads, D) in q's dtype, raw scaled logits (n_kv, n_heads // n_kv, held) fp32 or None), or None
    when the kernel is unavailable or the shapes are past its tile sizes."""
    if not _usable(q) or k.dtype not in KINDS:
        return None
    if table.dtype != torch.int64 or k.dtype != v.dtype or not all(t.is_contiguous() for t in (k, v, table)):
        raise ValueError("the native KV kernel needs contiguous pool tensors of one dtype and an int64 block table")
    q = _rows(q)
    n_kv, slots, _ = k.shape
    n_heads, D = q.shape
    out, scores = _outputs(q, n_kv, held, with_scores)
    rc = library().kvb_fattn_decode(
        _ptr(q), KINDS[q.dtype], D ** -0.5, n_kv, n_heads // n_kv, D, KINDS[k.dtype], _ptr(k), _ptr(v), slots, block,
        _ptr(table), table.numel(), held, _ptr(out), _ptr(scores), _threads(threads))
    return None if rc != 0 else (out, scores)
