"""First come, first served admission to the shared KV pool: a large refused turn that keeps retrying is not
starved by smaller turns that take each block as it frees up (the load benchmark saw one turn refused 144 times)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvbound.server.admission import WAITER_TTL_S, PoolAdmission
from kvbound.server.errors import ServerBusy

BLOCK = 16  # tokens per block


class FakePool:
    def __init__(self, blocks: int):
        self.free_blocks = blocks
        self.spec = SimpleNamespace(block_size=BLOCK, bytes_per_block=1024,
                                    blocks_for=lambda tokens: -(-tokens // BLOCK))


class FakeRegistry:
    capacity = 100 * BLOCK
    evicts = False

    def offload_idle(self, exclude=None) -> bool:
        return False


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def session(name: str):
    return SimpleNamespace(id=name, kv_blocks=0)


@pytest.fixture
def world():
    pool, clock = FakePool(10), Clock()
    return pool, clock, PoolAdmission(pool, FakeRegistry(), clock=clock)


def run(pool, admission, s, blocks: int) -> None:
    """Admit a turn of `blocks` blocks and let it take them."""
    admission.admit(s, 0, blocks * BLOCK - 1, 0)
    pool.free_blocks -= blocks
    s.kv_blocks = blocks


def finish(pool, admission, s) -> None:
    admission.release(s)
    pool.free_blocks += s.kv_blocks
    s.kv_blocks = 0


def test_a_refused_large_turn_goes_before_later_small_ones(world):
    pool, clock, admission = world
    a, big, small = session("a"), session("big"), session("small")
    run(pool, admission, a, 6)  # 4 blocks left
    with pytest.raises(ServerBusy):
        admission.admit(big, 0, 8 * BLOCK - 1, 0)  # needs 8: waits
    clock.now += 1
    with pytest.raises(ServerBusy, match="earlier request has waited"):
        admission.admit(small, 0, 2 * BLOCK - 1, 0)  # 2 would fit, but would leave less than big's 8
    finish(pool, admission, a)  # 10 free
    clock.now += 1
    assert admission.admit(big, 0, 8 * BLOCK - 1, 0) == 8  # the waiter goes first
    pool.free_blocks -= 8
    big.kv_blocks = 8
    assert admission.admit(small, 0, 2 * BLOCK - 1, 0) == 2  # then the room left is anyone's


def test_without_the_queue_the_small_turn_would_take_the_room(world):
    """The rule is what makes the difference: a small turn that fits beside no waiter is admitted."""
    pool, clock, admission = world
    a, small = session("a"), session("small")
    run(pool, admission, a, 6)
    assert admission.admit(small, 0, 2 * BLOCK - 1, 0) == 2


def test_a_waiter_that_stops_retrying_loses_its_place(world):
    pool, clock, admission = world
    a, big, small = session("a"), session("big"), session("small")
    run(pool, admission, a, 6)
    with pytest.raises(ServerBusy):
        admission.admit(big, 0, 8 * BLOCK - 1, 0)
    clock.now += WAITER_TTL_S + 1
    assert admission.admit(small, 0, 2 * BLOCK - 1, 0) == 2


def test_a_turn_whose_retry_comes_as_another_session_keeps_no_place(world):
    pool, clock, admission = world
    a, new, small = session("a"), session("new-1"), session("small")
    run(pool, admission, a, 6)
    with pytest.raises(ServerBusy):
        admission.admit(new, 0, 8 * BLOCK - 1, 0, queue=False)
    assert admission.admit(small, 0, 2 * BLOCK - 1, 0) == 2


def test_waiters_are_served_in_order_of_first_refusal(world):
    pool, clock, admission = world
    a, first, second = session("a"), session("first"), session("second")
    run(pool, admission, a, 9)  # 1 block left
    for s in (first, second):
        with pytest.raises(ServerBusy):
            admission.admit(s, 0, 4 * BLOCK - 1, 0)
        clock.now += 1
    finish(pool, admission, a)
    with pytest.raises(ServerBusy, match="earlier request"):
        admission.admit(second, 0, 8 * BLOCK - 1, 0)  # second now asks for 8: 10 - 8 < first's 4
    assert admission.admit(first, 0, 4 * BLOCK - 1, 0) == 4
