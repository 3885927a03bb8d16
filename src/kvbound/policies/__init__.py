"""Eviction policies behind a registry by name. A policy scores held tokens; the shared base turns scores
into a choice of victims that never includes a pinned token. A policy with an `inner` field composes with
another by name: `turns+h2o` orders whole turns oldest first and lets h2o's scores decide inside a turn."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from kvbound.policies.base import Policy, register, registry
# the policy modules register themselves on import
from kvbound.policies import compactor, h2o, keydiff, snapkv, tova, turns, window  # noqa: F401


def make_policy(name: str, **options: Any) -> Policy:
    """The policy called `name` ("h2o", "turns+snapkv", ...) with the `options` its fields take (others are
    ignored, so one CacheConfig's settings can be passed to any policy)."""
    name = (name or "none").strip().lower()
    outer, plus, inner = name.partition("+")
    cls = registry().get(outer)
    if cls is None or (plus and "inner" not in _fields(cls)):
        raise ValueError(f"unknown policy '{name}'; choose one of {', '.join(policy_names())}")
    if "inner" in _fields(cls):
        inner_policy = make_policy(inner or "window", **options)
        if "inner" in _fields(type(inner_policy)):
            raise ValueError(f"'{outer}' cannot wrap '{inner}'; use turns+h2o, turns+window, ...")
        return cls(inner=inner_policy, **_take(cls, options))
    return cls(**_take(cls, options))


def policy_names() -> list[str]:
    """Every registered policy, and `turns` around each one that scores by attention or keys."""
    names = registry()
    scorers = [n for n, cls in sorted(names.items()) if cls.needs_attention or cls.needs_keys or cls.scores_writes]
    return sorted(names) + [f"turns+{n}" for n in scorers]


def policy_options(policy: Policy) -> dict[str, Any]:
    """The scalar settings of a policy and of the policy it wraps (sink_tokens, recent_turns, ...), so
    `make_policy(policy.name, **options)` rebuilds it."""
    options: dict[str, Any] = {}
    for obj in (getattr(policy, "inner", None), policy):
        if is_dataclass(obj):
            options.update({f.name: getattr(obj, f.name) for f in fields(obj) if type(getattr(obj, f.name)) in (int, float)})
    return options


def _fields(cls: type) -> dict:
    return getattr(cls, "__dataclass_fields__", {})


def _take(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in _fields(cls) and k != "inner"}


__all__ = ["Policy", "make_policy", "policy_names", "policy_options", "register"]
