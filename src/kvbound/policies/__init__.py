"""Eviction policies behind a registry by name. A policy scores held tokens; the shared base turns scores
into a choice of victims that never includes a pinned token. `turns+NAME` composes chat-aware turn order
with any scoring policy inside a turn."""

from __future__ import annotations

from kvbound.policies.base import Policy, register, registry
from kvbound.policies import h2o, snapkv, tova, turns, window  # noqa: F401  (they register themselves)


def make_policy(name: str, **options) -> Policy:
    name = (name or "none").strip().lower()
    if name == "summarize":
        return turns.TurnsPolicy(inner=make_policy("window", **options), summarize=True,
                                 **_take(turns.TurnsPolicy, options))
    if name.startswith("turns+") or name == "turns":
        inner = name.partition("+")[2] or "window"
        if inner.startswith("turns"):
            raise ValueError("'turns' cannot wrap itself; use turns+h2o, turns+window, ...")
        return turns.TurnsPolicy(inner=make_policy(inner, **options), **_take(turns.TurnsPolicy, options))
    cls = registry().get(name)
    if cls is None:
        raise ValueError(f"unknown policy '{name}'; choose one of {', '.join(policy_names())}")
    return cls(**_take(cls, options))


def policy_names() -> list[str]:
    return sorted(registry()) + ["turns", "turns+h2o", "turns+snapkv", "turns+tova", "summarize"]


def _take(cls, options: dict) -> dict:
    fields = getattr(cls, "__dataclass_fields__", {})
    return {k: v for k, v in options.items() if k in fields}


__all__ = ["Policy", "make_policy", "policy_names", "register"]
