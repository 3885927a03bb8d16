"""KV caches behind one small interface (base.KVCache); the model reaches the cache only through it."""

from kvbound.kvcache.base import KVCache
from kvbound.kvcache.contiguous import ContiguousCache

__all__ = ["KVCache", "ContiguousCache"]
