"""Public error types. Every message names what was wrong, the numbers involved, and what to do next."""

from __future__ import annotations


class KvboundError(Exception):
    """Base class of every error kvbound raises on purpose (the CLI prints these without a traceback)."""


class ModelNotFoundError(KvboundError):
    """No model at the given path or name."""


class ModelFormatError(KvboundError):
    """The model file is missing pieces, truncated or corrupt."""


class UnsupportedModelError(KvboundError):
    """The architecture or tensor type is not one kvbound runs."""


class ContextOverflowError(KvboundError):
    """More tokens than the model's trained context (or the cache's capacity) can hold."""

    def __init__(self, message: str, *, needed: int = 0, available: int = 0):
        super().__init__(message)
        self.needed, self.available = needed, available


class KVBudgetExceeded(ContextOverflowError):
    """The KV cache budget cannot hold the tokens of this step, and the policy may not evict."""


class MemoryBudgetExceeded(KvboundError):
    """The predicted process peak would cross the memory budget."""

    def __init__(self, message: str, *, needed: int = 0, available: int = 0, budget: int = 0):
        super().__init__(message)
        self.needed, self.available, self.budget = needed, available, budget


class SnapshotError(KvboundError, ValueError):
    """A saved sequence or session state does not fit this model / KV layout, or cannot be read."""


class SessionNotFoundError(KvboundError, LookupError):
    """No session with this id in the store."""
