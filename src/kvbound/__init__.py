"""kvbound — LLM chat whose memory never blows up, and that tells you where the memory goes.

    from kvbound import load
    chat = load().chat(system="Be brief.")
    print(chat.send("Hello!").text)
"""

import logging

from kvbound.chat.persistence import SessionStore
from kvbound.chat.reply import Reply
from kvbound.chat.session import Chat
from kvbound.config import ModelConfig
from kvbound.engine.sampler import SamplingParams
from kvbound.errors import (ContextOverflowError, KvboundError, KVBudgetExceeded, MemoryBudgetExceeded,
                            ModelFormatError, ModelNotFoundError, SessionNotFoundError, SnapshotError,
                            UnsupportedModelError)
from kvbound.llm import LLM, load

__all__ = [
    "load", "LLM", "Chat", "Reply", "ModelConfig", "SamplingParams", "KvboundError", "ModelNotFoundError",
    "ModelFormatError", "UnsupportedModelError", "ContextOverflowError", "KVBudgetExceeded", "MemoryBudgetExceeded",
    "SessionStore", "SnapshotError", "SessionNotFoundError",
]
__version__ = "0.1.0"

# A library's loggers stay silent until the application configures logging (Python's logging HOWTO): without this,
# logging's last-resort handler printed each memory event to stderr beside the warning the CLI prints itself.
logging.getLogger(__name__).addHandler(logging.NullHandler())
