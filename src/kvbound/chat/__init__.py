"""Chat sessions: messages, the session's KV cache, and turn-by-turn prefill of only the new tokens."""

from kvbound.chat.reply import Reply
from kvbound.chat.session import Chat

__all__ = ["Chat", "Reply"]
