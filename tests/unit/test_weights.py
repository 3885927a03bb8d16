"""Weight storage modes (models/linear.py, models/weights.py) on tiny random models: each mode against dense fp32,
quantized GGUFs against their own dequantized values, the kernel and the dequantize-into-scratch paths against
each other, and the bytes the plan predicts against what the model allocates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvbound
from kvbound.kvcache import ContiguousCache
from kvbound.models.linear import KERNEL_ROWS, Int4Linear, Int4Source, Int8Linear, Int8Source, Scratch
from kvbound.models.weights import plan_weights
from kvbound.loading import open_checkpoint
from kvbound.memory.estimate import estimate
from tests.helpers_tiny import random_ids, reference_logits, save_hf_dir, tiny_case_model, write_gguf

CASES = ["llama", "qwen2-gqa4", "llama-tied"]
# Largest logit error as a fraction of the largest |logit| vs dense fp32, on these random-weight models (whose
# logits are large and whose weights are not quantization-friendly). Measured: bf16 ≤0.045, fp16 ≤0.0072,
# int8 ≤0.13; bounds are ~1.5× that.
MODE_BOUNDS = {"bf16": 0.07, "fp16": 0.012, "int8": 0.2}
BF16_COMPUTE = 0.07  # bf16 activations alone (measured ≤0.045): the bound for "same weights, bf16 compute"


def logits(llm, ids: list[int]) -> torch.Tensor:
    cache = ContiguousCache(llm.model.config, len(ids), dtype=llm.model.dtype)
    return llm.model(torch.tensor([ids]), cache, all_logits=True)[0].float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=CASES)
def tiny(request, tmp_path_factory) -> tuple[str, object, Path]:
    hf = tiny_case_model(request.param)
    return request.param, hf, save_hf_dir(hf, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("mode", list(MODE_BOUNDS))
def test_each_mode_stays_close_to_fp32(tiny, mode: str) -> None:
    _, _, path = tiny
    ids = random_ids(40, seed=1)
    ref = logits(kvbound.load(path, weights="fp32"), ids)
    llm = kvbound.load(path, weights=mode)
    assert llm.dtype_name == ("bf16" if mode == "int8" else mode)
    assert rel(logits(llm, ids), ref) <= MODE_BOUNDS[mode]


def test_int4_computes_its_own_4bit_values(tiny) -> None:
    """weights=int4 quantizes on load; the model must compute exactly the function of those 4-bit values."""
    _, _, path = tiny
    llm = kvbound.load(path, weights="int4")
    assert set(llm.plan.counts()) == {"int4"}
    ids = random_ids(40, seed=1)
    ours = logits(llm, ids)
    # The same network with every matrix replaced by its dequantized int4 values, dense, in fp32.
    dense = kvbound.load(path, weights="fp32")
    with torch.no_grad():
        for name, module in llm.model.named_modules():
            if isinstance(module, Int4Linear):
                dense.model.get_submodule(name).weight.copy_(module.dequantize())
    expected = logits(dense, ids)
    assert rel(ours, expected) <= BF16_COMPUTE
    assert rel(expected, logits(kvbound.load(path, weights="fp32"), ids)) > 0.2  # the quantization is real


@pytest.mark.parametrize("qtype,storage", [("Q4_0", "int4"), ("Q8_0", "int8")])
def test_auto_keeps_a_quantized_gguf_quantized(tiny, qtype: str, storage: str, tmp_path: Path) -> None:
    case, hf, _ = tiny
    path = write_gguf(hf, tmp_path / f"{case}.gguf", qtype) and tmp_path / f"{case}.gguf"
    llm = kvbound.load(path)
    assert llm.plan.counts() == {storage: len(llm.plan.storage)} and llm.dtype_name == "bf16"
    ids = random_ids(40, seed=1)
    # The GGUF's own values, dequantized exactly, computed in bf16. Q4_0 maps exactly (only the scales' rounding
    # differs); Q8_0's groups are re-scaled to one scale per row, which int8's bound covers.
    same_values = logits(kvbound.load(path, weights="bf16"), ids)
    assert rel(logits(llm, ids), same_values) <= (BF16_COMPUTE if storage == "int4" else MODE_BOUNDS["int8"])
    assert rel(same_values, reference_logits(hf, ids)) > 0.05  # the file's quantization is real
    # Asking for fp32 compute dequantizes everything, as before.
    assert set(kvbound.load(path, dtype="fp32").plan.counts()) == {"dense"}


@pytest.mark.parametrize("mode", ["auto", "fp32", "bf16", "fp16", "int8", "int4"])
def test_plan_bytes_are_what_the_model_allocates(tiny, mode: str, tmp_path: Path) -> None:
    case, hf, path = tiny
    gguf_path = tmp_path / f"{case}.gguf"
    write_gguf(hf, gguf_path, "Q4_0")
    for source in (path, gguf_path):
        llm = kvbound.load(source, weights=mode)
        assert llm.plan.nbytes(llm.config) == llm.model.weights_bytes() == llm.info().weights_bytes
        est = estimate(open_checkpoint(source), context=64, weights=mode)
        assert est.weights_bytes == llm.model.weights_bytes()


def test_q4_1_blocks_map_exactly() -> None:
    """Q4_1 (w = q·d + m) → int4 with scale d and zero m + 8d: the kernel sees the same weights."""
    torch.manual_seed(0)
    N, K = 96, 128  # N not a multiple of the CPU's 64-row packing blocks: padded rows must not leak out
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    d = (torch.rand(N, K // 32) * 0.05).half().float()
    m = (torch.randn(N, K // 32) * 0.1).half().float()
    source = Int4Source(q, d, m)
    lin = Int4Linear(source, None, torch.float16, torch.device("cpu"), Scratch(), lookup=True)
    w = source.dequantize()
    assert (lin.dequantize() - w).abs().max() <= 1e-3  # fp16 rounding of the zero point only
    ids = torch.tensor([[0, 5, 63, 64, 95]])
    assert torch.allclose(lin.rows(ids).float(), w[ids], atol=1e-3)
    for rows in (1, KERNEL_ROWS, KERNEL_ROWS + 1, 70):  # kernel path, then the dequantize-into-scratch path
        x = torch.randn(rows, K).half()
        assert rel(lin(x).float(), x.float() @ w.T) <= 2e-3, rows


def test_int8_rows_and_matmul_agree() -> None:
    torch.manual_seed(0)
    w = torch.randn(80, 64) * 0.5  # within the int8 range at a 0.02 step
    lin = Int8Linear(Int8Source((w / 0.02).round().clamp(-127, 127).to(torch.int8), torch.full((80, 2), 0.02)),
                     torch.randn(80), torch.bfloat16, torch.device("cpu"))
    ref = lin.dequantize()
    assert (ref - w).abs().max() <= 0.02  # rescaled per row: within a row step of the group-quantized values
    x = torch.randn(3, 64)
    assert rel(lin(x.bfloat16()).float(), x @ ref.T + lin.bias.float()) <= 0.02
    assert torch.allclose(lin.rows(torch.tensor([1, 79])).float(), ref[[1, 79]], atol=0.02)


def test_scratch_is_shared_and_bounded(tiny) -> None:
    """Every int4 layer matrix dequantizes into the same buffer; the vocabulary matrix never does."""
    _, _, path = tiny
    llm = kvbound.load(path, weights="int4")
    layers = [m for n, m in llm.model.named_modules() if isinstance(m, Int4Linear) and n.startswith("layers.")]
    assert len({id(m.scratch) for m in layers}) == 1 and llm.model.embed_tokens.scratch is None
    logits(llm, random_ids(40, seed=1))  # a 40-row prefill uses the scratch
    assert layers[0].scratch.buffer.numel() * 2 == llm.plan.scratch_bytes(llm.config)


@pytest.mark.parametrize("kwargs,message", [
    ({"weights": "int3"}, "unknown weights mode"),
    ({"weights": "int4", "dtype": "fp32"}, "computes in bf16 or fp16"),
    ({"weights": "fp32", "dtype": "bf16"}, "contradicts"),
])
def test_bad_weight_options_are_clear_errors(tiny, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kvbound.load(tiny[2], **kwargs)


def test_plan_without_a_file_is_dense() -> None:
    from kvbound.config import ModelConfig

    config = ModelConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_context=256)
    assert set(plan_weights(config, None).storage.values()) == {"dense"}
    assert set(plan_weights(config, None, "int4").storage.values()) == {"int4"}
