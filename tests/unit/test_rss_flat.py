"""RSS stays flat over many prefills of different lengths in bf16 (and with int4 weights): PyTorch's CPU kernels
for low-precision GEMM and flash attention keep a compiled kernel per shape, so unbounded shapes grew RSS ~2.5 MB
per prefill on this tiny model (measured before the fix: 363 → 560 MiB over 100 prefills; after: flat)."""

from __future__ import annotations

import random
from pathlib import Path

import psutil
import pytest
import torch

import kvbound
from tests.helpers_tiny import save_hf_dir, tiny_case_model

PREFILLS = 100
ALLOWED_GROWTH = 12 << 20  # after warm-up; the unbucketed code grew ~200 MiB here


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_hf_dir(tiny_case_model("llama"), tmp_path_factory.mktemp("flat"))


@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_prefills_of_every_length_do_not_grow_rss(tiny_dir: Path, weights: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = kvbound.load(tiny_dir, weights=weights, device="cpu")
        process, rng = psutil.Process(), random.Random(0)
        after_warmup = None
        for i in range(PREFILLS):
            cache = llm.new_cache(tokens=256)
            llm.runner.prefill([rng.randrange(3, 128) for _ in range(rng.randint(17, 250))], cache)
            cache.free()
            if i == 20:  # every row bucket has been seen by now
                after_warmup = process.memory_info().rss
        growth = process.memory_info().rss - after_warmup
        assert growth <= ALLOWED_GROWTH, f"RSS grew {growth / 2**20:.1f} MiB over {PREFILLS - 21} prefills"
    finally:
        torch.set_num_threads(threads)
