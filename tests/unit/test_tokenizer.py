"""Tokenizer, streaming decoder and chat template on the default model's GGUF tokenizer (metadata only: fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbound.errors import ModelFormatError
from kvbound.tokenizer import ChatTemplate, StreamDecoder, Tokenizer

SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
STREAM_TEXTS = [
    "🙂👍🏽 family 👨‍👩‍👧",
    "日本語テキスト、中文字符。한국어",
    "naïve café — “quotes” … ½ ²",
    "plain ascii with digits 12345 and\nnewlines\n\n",
]


def _stream(tokenizer: Tokenizer, ids: list[int], **kwargs: bool) -> list[str]:
    decoder = StreamDecoder(tokenizer, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# ---- encode / decode / special tokens -----------------------------------------------------------------------


def test_special_ids_and_flags(smollm2_tokenizer: Tokenizer) -> None:
    tok = smollm2_tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    assert tok.stop_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("no such token") is None


def test_control_tokens_are_never_split(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm2_tokenizer.decode(ids, skip_special=True) == "user\nhi"


def test_add_special_follows_add_bos(smollm2_tokenizer: Tokenizer) -> None:
    assert smollm2_tokenizer.encode("hi", add_special=True) == smollm2_tokenizer.encode("hi")  # SmolLM2: no bos


def test_digits_split_individually(smollm2_tokenizer: Tokenizer) -> None:
    tok = smollm2_tokenizer
    assert tok.encode("3.14159") == [tok.token_to_id(c) for c in "3.14159"]
    assert tok.encode("  12") == [tok.token_to_id("ĠĠ"), tok.token_to_id("1"), tok.token_to_id("2")]


@pytest.mark.parametrize("text", STREAM_TEXTS + ["", "\r\n", "  leading", "a" * 500])
def test_roundtrip(smollm2_tokenizer: Tokenizer, text: str) -> None:
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text


# ---- streaming ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_never_emits_broken_utf8(smollm2_tokenizer: Tokenizer, text: str) -> None:
    ids = smollm2_tokenizer.encode(text)
    chunks = _stream(smollm2_tokenizer, ids)
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_stream_case_really_splits_characters(smollm2_tokenizer: Tokenizer) -> None:
    # Guards the test above: these texts do put single characters across several byte-level tokens.
    ids = smollm2_tokenizer.encode(STREAM_TEXTS[0] + STREAM_TEXTS[1])
    assert any(smollm2_tokenizer.decode([i]).endswith("\ufffd") for i in ids)


def test_stream_flush_releases_incomplete_character(smollm2_tokenizer: Tokenizer) -> None:
    first, *_ = smollm2_tokenizer.encode("🙂")
    decoder = StreamDecoder(smollm2_tokenizer)
    assert decoder.push(first) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.push(smollm2_tokenizer.encode("ok")[0]) == "ok"  # flush reset the decoder


def test_stream_skips_special_by_default(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("Hi!<|im_end|>")
    assert "".join(_stream(smollm2_tokenizer, ids)) == "Hi!"
    assert "".join(_stream(smollm2_tokenizer, ids, skip_special=False)) == "Hi!<|im_end|>"


def test_stream_matches_full_decode_on_long_text(smollm2_tokenizer: Tokenizer) -> None:
    text = "".join(STREAM_TEXTS) * 20
    ids = smollm2_tokenizer.encode(text)
    assert "".join(_stream(smollm2_tokenizer, ids)) == smollm2_tokenizer.decode(ids) == text


# ---- chat template ------------------------------------------------------------------------------------------


def test_chat_template_renders_smollm2_format(smollm2_tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert smollm2_tokenizer.apply_chat_template(messages) == (
        SYSTEM_DEFAULT + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == (
        SYSTEM_DEFAULT + "<|im_start|>user\nhi<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert smollm2_tokenizer.apply_chat_template(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize(
    "messages",
    [
        "hi",
        [("user", "hi")],
        [{"content": "hi"}],
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": ["hi"]}],
    ],
)
def test_bad_messages_raise(smollm2_tokenizer: Tokenizer, messages: object) -> None:
    with pytest.raises(ValueError, match="messages"):
        smollm2_tokenizer.apply_chat_template(messages)  # type: ignore[arg-type]


def test_template_helpers_match_transformers_environment() -> None:
    template = ChatTemplate(
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ bos_token }}{{ messages[0] | tojson }}{% generation %}{{ eos_token }}{% endgeneration %}"
        "{{ strftime_now('%Y')|length }}",
        bos_token="<s>", eos_token="</s>",
    )
    out = template.render([{"role": "user", "content": "<é>"}])
    assert out == '<s>{"role": "user", "content": "<é>"}</s>4'  # tojson keeps <, > and non-ASCII as is
    with pytest.raises(ValueError, match="one message only"):
        template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_chatml_fallback_and_broken_template() -> None:
    chatml = ChatTemplate.chatml().render([{"role": "user", "content": "hi"}])
    assert chatml == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ModelFormatError, match="chat template"):
        ChatTemplate("{% for m in messages %}")


# ---- construction -------------------------------------------------------------------------------------------


def _tiny_fields(**overrides: object) -> dict[str, object]:
    tokens = ["<|endoftext|>", "h", "i", "Ġ", "hi", "Ġhi"]
    fields: dict[str, object] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1], "tokenizer.ggml.merges": ["h i", "Ġ hi"],
        "tokenizer.ggml.eos_token_id": 0,
    }
    return {**fields, **overrides}


def test_tiny_byte_level_vocab_without_template_uses_chatml() -> None:
    tok = Tokenizer.from_gguf_fields(_tiny_fields())
    assert tok.encode("hi hi<|endoftext|>") == [4, 5, 0]
    assert tok.chat_template is None and tok.bos_id is None and tok.stop_ids == {0}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<|im_start|>user\nx")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model is 'bert'"),
        ({"tokenizer.ggml.pre": "made-up"}, "tokenizer.ggml.pre is 'made-up'"),
        ({"tokenizer.ggml.tokens": []}, "no tokenizer.ggml.tokens"),
    ],
)
def test_unsupported_gguf_tokenizers_raise(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ModelFormatError, match=match):
        Tokenizer.from_gguf_fields(_tiny_fields(**overrides))


def test_sentencepiece_vocab_with_byte_fallback() -> None:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "h", "i", "▁h", "▁hi"]
    tok = Tokenizer.from_gguf_fields({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * 5,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    })
    assert tok.add_bos  # SentencePiece GGUFs default to bos, as in llama.cpp
    assert tok.encode("hi", add_special=True) == [1, tokens.index("▁hi")]
    ids = tok.encode("hé")
    assert ids == [tokens.index("▁h"), 3 + 0xC3, 3 + 0xA9]  # é is not in the vocab: its UTF-8 bytes
    assert tok.decode(ids) == "hé" and "".join(_stream(tok, ids)) == "hé"
    # a token's own bytes: the byte-fallback tokens each hold half of é; "▁" is the space the decoder drops at the start
    assert [tok.token_bytes(i) for i in ids] == [b" h", b"\xc3", b"\xa9"]
    assert tok.token_bytes(1) == b"<s>" and tok.token_bytes(10 ** 6) == b""


def test_from_files_reads_hf_directory(smollm2_tokenizer: Tokenizer, tmp_path: Path) -> None:
    smollm2_tokenizer._backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_files(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.encode("Hello 123") == smollm2_tokenizer.encode("Hello 123")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"
