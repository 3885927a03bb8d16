"""Text <-> token ids: builds a HF `tokenizers` pipeline from GGUF metadata or a tokenizer.json directory.
Owns special/stop-token ids and the chat template; knows nothing of weights, devices or the KV cache."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from kvbound.errors import ModelFormatError
from kvbound.tokenizer.chat_template import ChatTemplate

# Split regexes from llama.cpp's llama-vocab.cpp pre-type table (and the models' own tokenizer.json files).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # SmolLM2's own tokenizer.json; llama.cpp's equivalent is the regex "\p{N}" applied before GPT-2's.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(regex: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    return lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )


# tokenizer.ggml.pre -> pre-tokenizer. Extend here when a new byte-level family needs support.
BPE_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2,
    "gpt2": _gpt2,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "llama3": _split_then_bytes(_LLAMA3_SPLIT),
    "llama-v3": _split_then_bytes(_LLAMA3_SPLIT),
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _split_then_bytes(_QWEN2_SPLIT),
}
# llama.cpp looks a whole pre-token up in the vocab before merging for these (Llama 3's "ignore_merges").
_IGNORE_MERGES = frozenset({"llama3", "llama-v3", "llama-bpe"})
# Tokens that end a turn in common chat formats; any present in the vocab stop generation alongside eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")
# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_SPECIAL_TYPES, _USER_DEFINED = frozenset({2, 3}), 4


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's token for one raw byte


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character a byte-level BPE token writes → that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging: a pair merges when its concatenation
    is a token, higher score first (same rule as transformers' `generate_merges`)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [
        (score, len(token[:cut]), len(token[cut:]), token[:cut], token[cut:])
        for token, score in zip(tokens, scores)
        for cut in range(1, len(token))
        if token[:cut] in vocab and token[cut:] in vocab
    ]
    merges.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(left, right) for *_, left, right in merges]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what a chat engine needs around it: bos/eos/stop ids and the template."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 chat_template: str | None = None, vocab_size: int | None = None) -> None:
        self._backend = backend
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self._vocab_size = max(vocab_size or 0, backend.get_vocab_size(with_added_tokens=True))
        present = (self.token_to_id(token) for token in END_OF_TURN_TOKENS)
        self.stop_ids: set[int] = {i for i in (eos_id, *present) if i is not None}
        bos_text, eos_text = (backend.id_to_token(i) or "" if i is not None else "" for i in (bos_id, eos_id))
        self.chat_template: ChatTemplate | None = (
            ChatTemplate(chat_template, bos_token=bos_text, eos_token=eos_text) if chat_template else None
        )
        self._fallback_template = ChatTemplate.chatml(bos_token=bos_text, eos_token=eos_text)

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_reader: str | Path | Any) -> Tokenizer:
        """From a GGUF path or an open `GGUFIndex` (only tokenizer.* fields are read)."""
        from kvbound.loading.gguf_index import GGUFIndex

        reader = path_or_reader if isinstance(path_or_reader, GGUFIndex) else GGUFIndex(path_or_reader)
        return cls.from_gguf_fields({key: value for key, value in reader.fields.items() if key.startswith("tokenizer.")})

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, object]) -> Tokenizer:
        """From GGUF metadata already read into Python values (key -> value)."""
        model = fields.get("tokenizer.ggml.model")
        tokens = [str(token) for token in _list(fields, "tokenizer.ggml.tokens")]
        if not tokens:
            raise ModelFormatError("GGUF has no tokenizer.ggml.tokens; the file is incomplete or not a language model")
        token_types = [int(kind) for kind in _list(fields, "tokenizer.ggml.token_type")] or [1] * len(tokens)
        if model == "gpt2":
            backend, add_bos_default = cls._byte_level_bpe(fields, tokens), False
        elif model == "llama":
            backend, add_bos_default = cls._sentencepiece_bpe(fields, tokens), True
        else:
            raise ModelFormatError(
                f"GGUF tokenizer.ggml.model is {model!r}; kvbound reads 'gpt2' (byte-level BPE) and 'llama' "
                "(SentencePiece BPE). Use a model with one of those tokenizers, or its HF tokenizer.json"
            )
        # Added tokens are matched whole before pre-tokenization, so text like "<|im_end|>" is never split.
        backend.add_tokens([
            AddedToken(token, special=kind in _SPECIAL_TYPES, normalized=False)
            for token, kind in zip(tokens, token_types) if kind in _SPECIAL_TYPES or kind == _USER_DEFINED
        ])
        add_bos = fields.get("tokenizer.ggml.add_bos_token")
        template = fields.get("tokenizer.chat_template")
        return cls(
            backend,
            bos_id=_optional_int(fields.get("tokenizer.ggml.bos_token_id")),
            eos_id=_optional_int(fields.get("tokenizer.ggml.eos_token_id")),
            add_bos=add_bos_default if add_bos is None else bool(add_bos),
            chat_template=template if isinstance(template, str) else None,
            vocab_size=len(tokens),
        )

    @staticmethod
    def _byte_level_bpe(fields: dict[str, object], tokens: list[str]) -> tokenizers.Tokenizer:
        pre = str(fields.get("tokenizer.ggml.pre") or "default")  # old files have no pre; llama.cpp says "default"
        if pre not in BPE_PRE_TOKENIZERS:
            raise ModelFormatError(
                f"GGUF tokenizer.ggml.pre is {pre!r}, a pre-tokenizer kvbound does not know; known: "
                f"{sorted(BPE_PRE_TOKENIZERS)}. Add its split regex (see llama.cpp llama-vocab.cpp) to "
                "kvbound.tokenizer.tokenizer.BPE_PRE_TOKENIZERS"
            )
        merges = [tuple(merge.split(" ", 1)) for merge in _list(fields, "tokenizer.ggml.merges")]
        vocab = {token: index for index, token in enumerate(tokens)}
        backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
        backend.pre_tokenizer = BPE_PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        return backend

    @staticmethod
    def _sentencepiece_bpe(fields: dict[str, object], tokens: list[str]) -> tokenizers.Tokenizer:
        # llama.cpp's SPM: score-ordered merges, unknown bytes fall back to <0xXX> tokens, and a space is
        # prepended to every text fragment (also after a special token, as the original sentencepiece did).
        scores = [float(s) for s in _list(fields, "tokenizer.ggml.scores")] or [-float(i) for i in range(len(tokens))]
        merges = _spm_merges(tokens, scores)
        unk_id = _optional_int(fields.get("tokenizer.ggml.unknown_token_id"))
        vocab = {token: index for index, token in enumerate(tokens)}
        unk = tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None
        backend = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Prepend("\u2581")] if space_prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
        strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
        )
        return backend

    @classmethod
    def from_files(cls, tokenizer_json: Path, tokenizer_config_json: Path | None = None) -> Tokenizer:
        """From a HF model directory's tokenizer.json (+ tokenizer_config.json / chat_template.jinja)."""
        tokenizer_json = Path(tokenizer_json)
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as error:  # tokenizers raises a bare Exception on bad JSON / unknown components
            raise ModelFormatError(f"cannot read {tokenizer_json}: {error}") from error
        config: dict[str, Any] = json.loads(Path(tokenizer_config_json).read_text()) if tokenizer_config_json else {}
        bos_id, eos_id = (backend.token_to_id(_token_text(config.get(key))) for key in ("bos_token", "eos_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = tokenizer_json.parent / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # many tokenizer.json files add bos in their post-processor instead
            add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(backend, bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos), chat_template=template)

    # ---- use ----------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of `text`; control tokens written in the text stay whole. `add_special` prepends bos
        when the model wants one."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_special and self.add_bos and self.bos_id is not None else ids

    def char_ends(self, text: str) -> list[int]:
        """For each token of `encode(text)` (no bos), the offset in `text` where its characters end."""
        return [end for _, end in self._backend.encode(text, add_special_tokens=False).offsets]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: a byte-level token may hold part of a UTF-8 character, which `decode`
        would show as U+FFFD (what OpenAI's logprobs report as `bytes`). b"" for an id outside the vocabulary."""
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode()
        if self._byte_level:
            alphabet = _byte_level_alphabet()
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
        elif (byte := _BYTE_FALLBACK.fullmatch(piece)) is not None:
            return bytes([int(byte[1], 16)])
        return piece.replace("\u2581", " ").encode()  # SentencePiece writes a space as U+2581

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._backend.get_added_tokens_decoder())

    @cached_property
    def _byte_level(self) -> bool:
        """Whether the pipeline decodes with GPT-2's byte-level alphabet (read from its JSON once)."""
        decoder = json.loads(self._backend.to_str()).get("decoder") or {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        return any(part.get("type") == "ByteLevel" for part in parts)

    @property
    def special_ids(self) -> set[int]:
        """Ids of control tokens (never part of ordinary text)."""
        return {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def to_json(self) -> str:
        """The pipeline as HF tokenizer.json text (what other tokenizer consumers, such as llguidance, read)."""
        return self._backend.to_str()

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Prompt text for a conversation; ChatML when the model ships no template."""
        template = self.chat_template or self._fallback_template
        return template.render(messages, add_generation_prompt=add_generation_prompt, **extra)


def _list(fields: dict[str, object], key: str) -> list[Any]:
    value = fields.get(key)
    return [] if value is None else list(value)  # type: ignore[call-overload]


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _token_text(token: object) -> str:
    """tokenizer_config.json writes special tokens as "text" or {"content": "text", ...}."""
    return token.get("content", "") if isinstance(token, dict) else str(token or "")
