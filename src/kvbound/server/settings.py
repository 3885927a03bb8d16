"""The server's settings (one frozen dataclass, checked when built) and the KV budget they resolve to. Owns no
model and no pool; `kvbound serve` builds one from its flags, tests build one directly."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbound.config import CacheConfig
from kvbound.errors import KVBudgetExceeded
from kvbound.kvcache.factory import cache_spec
from kvbound.policies import make_policy
from kvbound.kvcache.spec import KV_DTYPE_NAMES, format_bytes, parse_size

DEFAULT_MAX_BODY = 4 << 20  # 4 MiB of JSON: ~1M characters of conversation, far past any model's context
_MODEL_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


@dataclass(frozen=True)
class ServerSettings:
    kv_budget: int | str | None = None  # bytes or '64MiB' for the one pool all sessions share
    kv_tokens: int | None = None  # ... or its size in tokens; neither: one full model context
    kv_dtype: str = "auto"
    session_tokens: int | None = None  # the most KV tokens one session may hold (default: the whole pool)
    policy: str = "none"  # each session's eviction policy (kvbound.policies)
    recall: str = "auto"  # auto (on when the policy evicts) | on | off: bring back evicted turns (chat/archive.py)
    api_key: str | None = None  # a bearer key every route but /health requires
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_messages: int = 1000  # messages in one chat request; a longer one is refused (400) before any work
    body_timeout_s: float = 30.0  # a request body not whole by then is refused (408): a trickled body holds nothing
    max_sessions: int = 256  # past this, the least recently used idle implicit session is dropped
    # Named sessions one client (its API key, else its address) may hold in memory without --data-dir; default:
    # half the named slots, so one client cannot take them all
    sessions_per_client: int | None = None
    max_active: int = 8  # generations interleaved at once; later ones wait in the queue
    max_queued: int = 64  # requests waiting for a generation slot or for room in the pool; past this → 429
    queue_timeout_s: float = 60.0  # the longest a request waits for room in the KV pool before its 429
    default_max_tokens: int = 256  # reply length when a chat request gives none
    model_id: str | None = None  # the id /v1/models lists (default: the model file's name)
    data_dir: Path | None = None  # where a SessionStore keeps sessions (persistence)
    # Disk for offloaded sessions' KV (server/spill.py: restored without a prefill); 0 turns it off
    spill_budget: int | str = "1GiB"

    def __post_init__(self) -> None:
        if self.kv_budget is not None and self.kv_tokens is not None:
            raise ValueError("give either --kv-budget or --kv-tokens, not both")
        if self.kv_budget is not None:
            parse_size(self.kv_budget)
        try:
            self.spill_bytes()
        except ValueError as e:
            raise ValueError(f"--spill-budget: {e} (0 turns the spill off)") from None
        for name in ("kv_tokens", "session_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.kv_dtype != "auto" and self.kv_dtype not in KV_DTYPE_NAMES:
            raise ValueError(f"unknown --kv-dtype '{self.kv_dtype}'; choose auto or one of {', '.join(KV_DTYPE_NAMES)}")
        make_policy(self.policy)  # an unknown name fails here, before the model loads
        if self.recall not in ("auto", "on", "off"):
            raise ValueError(f"--recall must be auto, on or off, got {self.recall!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; give a non-empty --api-key (or unset KVBOUND_API_KEY)")
        if not isinstance(self.queue_timeout_s, (int, float)) or self.queue_timeout_s < 0:
            raise ValueError(f"queue_timeout_s must be >= 0 seconds, got {self.queue_timeout_s!r}")
        if not isinstance(self.body_timeout_s, (int, float)) or self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s must be a positive number of seconds, got {self.body_timeout_s!r}")
        if self.sessions_per_client is not None and (not isinstance(self.sessions_per_client, int)
                                                     or self.sessions_per_client < 1):
            raise ValueError(f"--sessions-per-client must be an integer >= 1, got {self.sessions_per_client!r}")
        for name in ("max_body_bytes", "max_messages", "max_sessions", "max_active", "max_queued",
                     "default_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.model_id is not None and not _MODEL_ID.match(self.model_id):
            raise ValueError(f"model id {self.model_id!r} must be 1-128 characters of letters, digits and ._:/-")

    def cache_options(self) -> dict[str, Any]:
        """Keyword options of `LLM.chat` for a session on the shared pool (its dtype must be the pool's)."""
        options: dict[str, Any] = {"dtype": self.kv_dtype, "policy": self.policy}
        if self.session_tokens is not None:
            options["tokens"] = self.session_tokens
        return options

    def spill_bytes(self) -> int:
        """The spill's byte cap; 0: offloaded sessions are rebuilt from their messages."""
        return 0 if str(self.spill_budget).strip() == "0" else parse_size(self.spill_budget)

    def named_sessions_cap(self) -> int:
        """Named sessions kept in memory without a store: an eighth of --max-sessions stays for the others."""
        return self.max_sessions - max(1, self.max_sessions // 8)

    def client_session_quota(self) -> int:
        return self.sessions_per_client or max(1, self.named_sessions_cap() // 2)

    def recall_on(self) -> bool:
        """Whether sessions keep and recall evicted turns."""
        return make_policy(self.policy).evicts if self.recall == "auto" else self.recall == "on"

    def pool_budget(self, llm: Any) -> int:
        """Bytes of the shared pool: the budget given, or `kv_tokens` (or one full context) worth of blocks.
        KVBudgetExceeded if it holds no whole block."""
        spec = cache_spec(llm.config, CacheConfig(dtype=self.kv_dtype), llm.dtype_name)
        if self.kv_budget is None:
            return spec.bytes_for(self.kv_tokens or llm.config.max_context)
        budget = parse_size(self.kv_budget)
        if budget < spec.bytes_per_block:
            raise KVBudgetExceeded(f"a KV budget of {format_bytes(budget)} holds no whole block of {spec.block_size} "
                                   f"tokens ({format_bytes(spec.bytes_per_block)} of {spec.dtype} KV for this model); "
                                   "raise --kv-budget", needed=spec.bytes_per_block, available=budget)
        return budget
