"""load() on a tiny random model: it leaves the host process's allocator alone unless asked (the CLI asks), and an
LLM tracks every chat it makes or restores (memory totals, memory-event callbacks)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

import kvbound
from kvbound.chat.session import Chat
from kvbound.cli import options
from kvbound.loading.checkpoint import Checkpoint
from kvbound.memory import allocator
from kvbound.memory.estimate import GLIBC_MMAP_THRESHOLD_MAX
from kvbound.memory.guard import MemoryWarning
from kvbound.memory.ledger import Ledger
from tests.helpers_tiny import save_hf_dir, tiny_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_hf_dir(tiny_hf_model("llama"), tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def libc_calls(monkeypatch) -> list[tuple]:
    """Every mallopt / malloc_trim call made through ctypes, and where loading the weights falls among them."""
    calls: list[tuple] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append(("malloc_trim", pad))
            return 1

    real_cdll, real_load_model = ctypes.CDLL, Checkpoint.load_model

    def cdll(name, *args, **kwargs):
        return FakeLibc() if "libc" in str(name) else real_cdll(name, *args, **kwargs)

    def load_model(self, plan, device):
        calls.append(("load_model",))
        return real_load_model(self, plan, device)

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(Checkpoint, "load_model", load_model)
    return calls


def test_load_changes_no_allocator_setting_by_default(model_dir, libc_calls):
    """Only the trim after loading (an action: free pages back to the OS), no mallopt."""
    llm = kvbound.load(model_dir, dtype="fp32", device="cpu")
    assert libc_calls == [("load_model",), ("malloc_trim", 0)]
    assert llm.generate("hi", max_new_tokens=2, temperature=0.0).token_ids  # the model loaded all the same


def test_tune_allocator_mmaps_loading_temporaries_then_trims(model_dir, libc_calls):
    kvbound.load(model_dir, dtype="fp32", device="cpu", tune_allocator=True)
    assert libc_calls == [("mallopt", allocator.M_MMAP_THRESHOLD, allocator.LOAD_MMAP_THRESHOLD), ("load_model",),
                          ("mallopt", allocator.M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX), ("malloc_trim", 0)]


def test_the_cli_tunes_the_allocator_of_its_own_process(monkeypatch):
    seen = {}
    monkeypatch.setattr(options, "load", lambda model, **kwargs: seen.update(kwargs))
    options.load_model(None, options.Dtype["auto"], "cpu")
    assert seen["tune_allocator"] is True


def test_every_chat_is_tracked_made_or_restored(model_dir):
    torch.set_num_threads(1)
    llm = kvbound.load(model_dir, dtype="fp32", device="cpu")
    made = llm.chat(tokens=128)
    made.send("hello there", max_new_tokens=4, temperature=0.0)
    events = []
    llm.on_memory_event(events.append)  # after the first chat, before the others
    restored = Chat.from_state(llm, made.export_state())
    rebuilt = Chat.from_messages(llm, made.messages, llm.new_cache(tokens=128))
    assert llm.memory().sessions == 3
    assert restored.ledger.turn_sizes == made.ledger.turn_sizes != ()
    with pytest.warns(MemoryWarning):
        for chat in (made, restored, rebuilt):
            chat.kv_guard.check(chat.kv_guard.budget_bytes)  # full: crosses 80% and 95%
    assert [e.kind for e in events] == ["warning", "critical"] * 3


def test_ledger_totals_round_trip():
    ledger = Ledger()
    for size in (5, 50, 60, 70):
        ledger.record_turn(size, {"evicted_tokens": 3})
    assert ledger.turn_sizes == (50, 60, 70)
    copy = Ledger()
    copy.restore(ledger.totals())
    assert copy.turn_sizes == ledger.turn_sizes and copy.turn_size == 60
    assert copy.turns == 4 and copy.tokens_evicted == 12
