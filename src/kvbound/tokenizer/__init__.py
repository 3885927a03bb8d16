"""Tokenization: text <-> ids (Tokenizer), streaming detokenization (StreamDecoder), chat templates."""

from kvbound.tokenizer.chat_template import ChatTemplate
from kvbound.tokenizer.detokenizer import StreamDecoder
from kvbound.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "StreamDecoder", "Tokenizer"]
