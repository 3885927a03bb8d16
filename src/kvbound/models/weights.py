"""Which storage each matrix gets (the one place), how many bytes that costs, and building a meta-device model
from a checkpoint's tensor stream: q/k/v and gate/up arrive as separate tensors and are fused here, one layer at a
time, so at most one layer's parts are held beside the finished model.

Modes: `fp32`/`bf16`/`fp16` keep every matrix dense in that dtype; `int8`/`int4` quantize every matrix (the
embedding too) and compute in bf16/fp16; `auto` keeps what a GGUF stores: 4-bit types as int4, 5- to 8-bit types as
int8, float types dense — unless an fp32 compute dtype is asked for, which dequantizes everything as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from kvbound.config import ModelConfig
from kvbound.errors import ModelFormatError
from kvbound.models.linear import CPU_BLOCK_N, ROWS_PER_PASS, DenseLinear, Int4Linear, Int8Linear, Scratch, concat

WEIGHT_MODES = ("auto", "fp32", "bf16", "fp16", "int8", "int4")
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = ("auto", *COMPUTE_DTYPES)  # what --dtype / load(dtype=) accept; auto is decided by plan_weights
INT4_FILE_TYPES = {"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"}  # ≤4 bits per weight
INT8_FILE_TYPES = {"Q8_0", "Q8_1", "Q8_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}  # 5-8 bits: int8 keeps them near-exact
STORAGE_RANK = {"int4": 0, "int8": 1, "dense": 2}  # a fused matrix takes its most precise part's storage

# HF tensor name → (module, parameter, part index, number of parts) for the fused projections.
_FUSED = {"q_proj": ("qkv_proj", 0, 3), "k_proj": ("qkv_proj", 1, 3), "v_proj": ("qkv_proj", 2, 3),
          "gate_proj": ("gate_up_proj", 0, 2), "up_proj": ("gate_up_proj", 1, 2)}
_PART = re.compile(r"^(layers\.\d+\.(?:self_attn|mlp))\.(\w+)\.(weight|bias)$")


def uses_scratch(module: str) -> bool:
    """Whether an int4 matrix dequantizes into the shared scratch for multi-row inputs: the layers' matrices do;
    the vocabulary matrices (embedding, output) always use the kernel, as their scratch would be ~50 MB."""
    return module not in ("embed_tokens", "lm_head")


def file_storage(file_type: str | None) -> str:
    if file_type in INT4_FILE_TYPES:
        return "int4"
    if file_type in INT8_FILE_TYPES:
        return "int8"
    return "dense"


def matrix_modules(config: ModelConfig) -> dict[str, tuple[int, int, bool, list[str]]]:
    """Every matrix of the model: module name → (out rows N, inputs K, has bias, HF names of its parts)."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    modules = {"embed_tokens": (c.vocab_size, c.hidden_size, False, ["embed_tokens.weight"])}
    if not c.tie_embeddings:
        modules["lm_head"] = (c.vocab_size, c.hidden_size, False, ["lm_head.weight"])
    for i in range(c.num_layers):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        modules[f"{a}.qkv_proj"] = (q + 2 * kv, c.hidden_size, c.attention_bias,
                                    [f"{a}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")])
        modules[f"{a}.o_proj"] = (c.hidden_size, q, c.output_bias, [f"{a}.o_proj.weight"])
        modules[f"{m}.gate_up_proj"] = (2 * c.intermediate_size, c.hidden_size, c.mlp_bias,
                                        [f"{m}.{p}.weight" for p in ("gate_proj", "up_proj")])
        modules[f"{m}.down_proj"] = (c.hidden_size, c.intermediate_size, c.mlp_bias, [f"{m}.down_proj.weight"])
    return modules


@dataclass
class WeightsPlan:
    """The storage of every matrix and the compute dtype, decided before any weight is read."""

    mode: str
    compute: str  # "fp32" | "bf16" | "fp16": activations and dense weights
    storage: dict[str, str] = field(default_factory=dict)  # module name → "dense" | "int8" | "int4"
    device: str = "cpu"

    @property
    def quantized(self) -> bool:
        return any(s != "dense" for s in self.storage.values())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.storage.values():
            out[s] = out.get(s, 0) + 1
        return out

    def nbytes(self, config: ModelConfig) -> int:
        """Bytes the weights take in memory: exactly what `materialize` allocates (tested)."""
        item = COMPUTE_DTYPES[self.compute].itemsize
        total = 0
        for name, (N, K, bias, _) in matrix_modules(config).items():
            total += matrix_bytes(self.storage[name], N, K, item, self.device, lookup=name == "embed_tokens")
            total += N * item if bias else 0
        norms = (2 * config.num_layers + 1) * config.hidden_size
        return total + norms * item

    def load_transient_bytes(self, config: ModelConfig) -> int:
        """What quantizing on load holds above the finished weights at the load's peak. Converting the biggest
        matrix holds its raw 1-byte values and one pass of rows in fp32 (the source, the scaled copy, the rounded
        copy) beside its own stored bytes. Tensors stream one at a time and that matrix (the vocabulary) comes
        first in GGUF and safetensors files alike, so the peak is either that moment or the end, with all the
        weights in: only what the first exceeds the second by counts."""
        if not self.quantized:
            return 0
        item = COMPUTE_DTYPES[self.compute].itemsize
        name, (N, K) = max(((name, (N, K)) for name, (N, K, _, _) in matrix_modules(config).items()
                            if self.storage[name] != "dense"), key=lambda x: x[1])
        stored = matrix_bytes(self.storage[name], N, K, item, self.device, lookup=name == "embed_tokens")
        return max(0, N * K + 3 * 4 * ROWS_PER_PASS * K + stored - self.nbytes(config))

    def scratch_bytes(self, config: ModelConfig) -> int:
        """The dequantization buffer int4 matrices share for multi-row inputs (the largest one, CPU only)."""
        if self.device == "cuda":
            return 0
        item = COMPUTE_DTYPES[self.compute].itemsize
        sizes = [-(-N // CPU_BLOCK_N) * CPU_BLOCK_N * K * item for name, (N, K, _, _) in
                 matrix_modules(config).items() if self.storage[name] == "int4" and uses_scratch(name)]
        return max(sizes, default=0)


def matrix_bytes(storage: str, N: int, K: int, item: int, device: str = "cpu", lookup: bool = False) -> int:
    if storage == "dense":
        return N * K * item
    if storage == "int8":
        return N * K + N * item  # int8 values + one scale per row
    rows = N if device == "cuda" else -(-N // CPU_BLOCK_N) * CPU_BLOCK_N  # CPU packing pads to 64-row blocks
    packed = rows * K // 2
    # tinygemm's tiles cannot be read back per row: on CUDA the embedding keeps its nibbles too.
    return packed + (K // 32) * rows * 2 * item + (N * K // 2 if device == "cuda" and lookup else 0)


def check_dtype(dtype: str) -> None:
    """Reject a compute dtype that is not one of DTYPES (before anything is read)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")


def plan_weights(config: ModelConfig, file_types: dict[str, str] | None, mode: str = "auto", dtype: str = "auto",
                 device: str = "cpu") -> WeightsPlan:
    """Decide each matrix's storage and the compute dtype. `file_types`: HF tensor name → storage type in the
    checkpoint ("Q4_1", "F32", ...); None when only a config is known (everything counts as dense)."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode '{mode}'; choose one of {', '.join(WEIGHT_MODES)}")
    check_dtype(dtype)
    file_types = file_types or {}
    modules = matrix_modules(config)
    if mode in COMPUTE_DTYPES:
        if dtype not in ("auto", mode):
            raise ValueError(f"--weights {mode} stores dense weights in {mode} and computes in it; --dtype {dtype} "
                             "contradicts it: drop one of the two")
        return WeightsPlan(mode, mode, {name: "dense" for name in modules}, device)
    if mode in ("int8", "int4"):
        storage = {name: mode for name in modules}
    else:  # auto: what the file holds
        storage = {}
        for name, (_, _, _, parts) in modules.items():
            kinds = [file_storage(file_types.get(p)) for p in parts]
            storage[name] = max(kinds, key=STORAGE_RANK.__getitem__)
        if dtype == "fp32" or not any(s != "dense" for s in storage.values()):
            compute = dtype if dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
            return WeightsPlan(mode, compute, {name: "dense" for name in modules}, device)
    if dtype == "fp32":
        raise ValueError(f"--weights {mode} computes in bf16 or fp16 (PyTorch's int8/int4 matmul kernels are 10-30x "
                         "slower with fp32 activations); use --dtype bf16, or --weights fp32 for dense fp32")
    return WeightsPlan(mode, "bf16" if dtype == "auto" else dtype, storage, device)


def materialize(model: nn.Module, config: ModelConfig, tensors: Iterable[tuple[str, object]], plan: WeightsPlan,
                device: torch.device) -> None:
    """Fill a meta-device model from (HF name, tensor or quantized source) pairs, fusing and storing per `plan`."""
    dtype = COMPUTE_DTYPES[plan.compute]
    modules = matrix_modules(config)
    part_of: dict[str, tuple[str, int]] = {}
    for module, (_, _, _, parts) in modules.items():
        for i, p in enumerate(parts):
            part_of[p] = (module, i)
    pending: dict[str, dict[str, list]] = {}
    params = {name for name, _ in model.named_parameters()}
    done: set[str] = set()
    scratch = Scratch()  # one dequantization buffer for every int4 matrix (prefill)

    def finish(module: str) -> None:
        N, K, bias, parts = modules[module]
        got = pending.pop(module)
        weight = concat(got["weight"])
        b = torch.cat(got["bias"]).to(dtype) if bias else None
        if tuple(weight.shape) != (N, K):
            raise ModelFormatError(f"{module} has shape {tuple(weight.shape)}, expected {(N, K)}")
        kind = plan.storage[module]
        if kind == "int4":
            built = Int4Linear(weight, b, dtype, device, scratch if uses_scratch(module) else None,
                               lookup=module == "embed_tokens")
        elif kind == "int8":
            built = Int8Linear(weight, b, dtype, device)
        else:
            w = weight if isinstance(weight, torch.Tensor) else weight.dequantize()
            with torch.device("meta"):
                built = DenseLinear(K, N, bias=bias)
            built.weight = nn.Parameter(w.to(dtype).to(device), requires_grad=False)
            if bias:
                built.bias = nn.Parameter(b.to(device), requires_grad=False)
        parent, _, attr = module.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, built)
        done.add(module)

    for name, tensor in tensors:
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # some files store the tied output matrix again
        fused = _PART.match(name)
        if fused and fused.group(2) in _FUSED:
            module_name, index, count = _FUSED[fused.group(2)]
            module, index, kind = f"{fused.group(1)}.{module_name}", index, fused.group(3)
        elif name.endswith((".weight", ".bias")) and name.rsplit(".", 1)[0] in modules:
            module, kind = name.rsplit(".", 1)
            index, count = 0, 1
        elif name in params:
            if not isinstance(tensor, torch.Tensor):
                tensor = tensor.dequantize()
            target = model.get_parameter(name)
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelFormatError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            _set_param(model, name, tensor.to(dtype).to(device))
            done.add(name)
            continue
        else:
            raise ModelFormatError(f"the checkpoint has a tensor '{name}' this {config.arch} model does not use; "
                                   "the architecture differs from what its config says")
        if module not in modules or (kind == "bias" and not modules[module][2]):
            raise ModelFormatError(f"the checkpoint has a tensor '{name}' this {config.arch} model does not use; "
                                   "the architecture differs from what its config says")
        slots = pending.setdefault(module, {"weight": [None] * count, "bias": [None] * count})
        slots[kind][index] = tensor
        if all(x is not None for x in slots["weight"]) and (not modules[module][2] or
                                                           all(x is not None for x in slots["bias"])):
            finish(module)
    missing = sorted((set(modules) - done) | {p for p in params if "norm" in p} - done)
    if missing:
        raise ModelFormatError(f"the checkpoint lacks {len(missing)} weights (first: {missing[0]})")


def weights_bytes(model: nn.Module) -> int:
    """Bytes of every weight tensor the model holds (parameters and quantized buffers; RoPE tables excluded)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if t is not getattr(model, "inv_freq", None)}
    return sum(t.nbytes for t in tensors.values())


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
