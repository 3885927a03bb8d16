"""The shared-pool entry points of the Python API: a budget smaller than one block is refused (never rounded up),
and a raw completion can draw its KV from a shared pool and gives every block back."""

from __future__ import annotations

import pytest

import kvbound
from tests.helpers_tiny import save_hf_dir, tiny_case_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return kvbound.load(save_hf_dir(tiny_case_model("llama"), tmp_path_factory.mktemp("pool")), device="cpu")


def test_a_budget_below_one_block_is_refused(llm) -> None:
    one_block = llm.kv_spec.bytes_per_block
    with pytest.raises(kvbound.KVBudgetExceeded, match="less than one 32-token block"):
        llm.shared_pool(one_block - 1)
    assert llm.shared_pool(one_block).num_blocks == 1


def test_raw_completion_draws_from_the_shared_pool_and_returns_it(llm) -> None:
    pool = llm.shared_pool(8 * llm.kv_spec.bytes_per_block)
    holder = llm.chat(pool=pool)
    holder.send("hello there", temperature=0, max_new_tokens=4)
    held = pool.used_blocks
    completion = llm.stream_raw("once upon a time", pool=pool, temperature=0, max_new_tokens=8)
    first = next(iter(completion))
    assert isinstance(first, str) and pool.used_blocks > held  # the completion's blocks come from the pool
    for _ in completion:
        pass
    assert completion.reply is not None and pool.used_blocks == held
