"""Logprobs (engine/logprobs.py through the Decoder): the values are the model's own log-softmax — unchanged by
logit_bias, a grammar's mask or temperature —, the alternatives are the likeliest, sorted; they come out with the
text they make (held back with it while a stop string may be forming, a UTF-8 character's tokens together), stop
tokens and stop strings are not in them; and the same through the public API (chat, raw completion, a batch).
Most checks feed hand-made logits to a Decoder: no model needed."""

from __future__ import annotations

import math

import pytest
import torch

import kvbound
from kvbound.engine import batch
from kvbound.engine.generate import Decoder
from kvbound.engine.sampler import sampling_params
from kvbound.tokenizer import Tokenizer
from tests.helpers_tiny import save_hf_dir, tiny_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> kvbound.LLM:
    torch.set_num_threads(1)
    return kvbound.load(save_hf_dir(tiny_hf_model("llama"), tmp_path_factory.mktemp("tiny")), device="cpu")


def scripted(tokenizer: Tokenizer, ids: list[int], **options) -> tuple[Decoder, list[tuple[str, list]]]:
    """A Decoder fed logits that make ids[k] the likeliest at step k (3.0 above the rest, then 1.0 for the next id
    along, so the alternatives are known): the pieces it returned, each with the logprobs taken after it."""
    def logits(step: int) -> torch.Tensor:
        row = torch.zeros(tokenizer.vocab_size)
        row[(ids[step] + 1) % tokenizer.vocab_size] = 1.0
        row[ids[step]] = 3.0
        return row

    params = sampling_params(temperature=options.pop("temperature", 0.0), max_new_tokens=len(ids), **options)
    decoder = Decoder(None, tokenizer, None, logits(0), params, [])
    pieces, step = [], 1
    while not decoder.done:
        piece = decoder.feed(logits(min(step, len(ids) - 1)))
        pieces.append((piece, decoder.take_logprobs()))
        step += 1
    return decoder, pieces


def spelled(tokenizer: Tokenizer, entries: list) -> bytes:
    return b"".join(tokenizer.token_bytes(e.token_id) for e in entries)


def test_values_are_the_models_log_softmax_and_the_alternatives_the_likeliest(tokenizer) -> None:
    ids = tokenizer.encode("hello there")
    decoder, _ = scripted(tokenizer, ids, logprobs=3)
    entries = decoder.result.logprobs
    vocab = tokenizer.vocab_size
    norm = math.log(math.exp(3.0) + math.exp(1.0) + vocab - 2)  # log of the softmax's denominator
    assert [e.token_id for e in entries] == ids
    for e in entries:
        assert e.logprob == pytest.approx(3.0 - norm)
        assert [lp for _, lp in e.top] == pytest.approx([3.0 - norm, 1.0 - norm, -norm])
        assert [i for i, _ in e.top[:2]] == [e.token_id, (e.token_id + 1) % vocab]
    assert spelled(tokenizer, entries) == b"hello there"
    assert decoder.result.text == "hello there"


@pytest.mark.parametrize("options", [{"logit_bias": "ban"}, {"temperature": 5.0, "top_k": 2, "seed": 1},
                                     {"json_schema": {"type": "string"}}])
def test_sampling_changes_nothing_in_the_values(tokenizer, options) -> None:
    """Banned tokens, a hot temperature and a grammar's mask change which token is sampled, not the values reported:
    the model's raw distribution, whose likeliest token stays first among the alternatives."""
    ids = tokenizer.encode("hello")
    if options.get("logit_bias") == "ban":
        options = {"logit_bias": {ids[0]: float("-inf")}}
    decoder, _ = scripted(tokenizer, ids, logprobs=2, **options)
    first = decoder.result.logprobs[0]
    vocab = tokenizer.vocab_size
    norm = math.log(math.exp(3.0) + math.exp(1.0) + vocab - 2)
    assert first.top[0] == (ids[0], pytest.approx(3.0 - norm))  # the model's favourite, sampled or not
    expected = {ids[0]: 3.0 - norm, (ids[0] + 1) % vocab: 1.0 - norm}.get(first.token_id, -norm)
    assert first.logprob == pytest.approx(expected)
    if "logit_bias" in options or "json_schema" in options:
        assert first.token_id != ids[0]  # the banned / ungrammatical favourite was not taken


def test_logprobs_come_out_with_their_text_and_not_before(tokenizer) -> None:
    """A stop string that may be forming holds text back; the logprobs of its tokens wait with it."""
    ids = tokenizer.encode("to be or not to be")
    decoder, pieces = scripted(tokenizer, ids, logprobs=0, stop=["QQQQ"])  # never matches, holds back 3 characters
    assert any(not entries for _, entries in pieces[:3])  # the first tokens waited for their text
    for piece, entries in pieces:
        assert spelled(tokenizer, entries) == piece.encode()
        assert all(e.top == () for e in entries)
    assert "".join(p for p, _ in pieces) == decoder.result.text == "to be or not to be"


def test_a_stop_string_and_a_stop_token_are_not_in_the_logprobs(tokenizer) -> None:
    ids = tokenizer.encode("one two three")
    decoder, pieces = scripted(tokenizer, ids, logprobs=1, stop=[" three"])
    text = decoder.result.text
    assert text == "one two"
    assert spelled(tokenizer, decoder.result.logprobs) == b"one two"
    assert b"".join(spelled(tokenizer, entries) for _, entries in pieces) == b"one two"
    eos = sorted(tokenizer.stop_ids)[0]
    decoder, _ = scripted(tokenizer, [*tokenizer.encode("hi"), eos], logprobs=1)
    assert decoder.result.finish_reason == "stop" and decoder.result.token_ids[-1] == eos
    assert [e.token_id for e in decoder.result.logprobs] == tokenizer.encode("hi")


def test_no_logprobs_unless_asked(tokenizer) -> None:
    decoder, pieces = scripted(tokenizer, tokenizer.encode("hi there"))
    assert decoder.result.logprobs is None and all(entries == [] for _, entries in pieces)


def test_the_option_is_checked() -> None:
    for bad in (-1, 21, True, 2.0, "3"):
        with pytest.raises(ValueError, match="logprobs must be None or an integer from 0 to 20"):
            sampling_params(logprobs=bad)
    assert sampling_params(logprobs=20).logprobs == 20


@pytest.mark.model
def test_a_characters_tokens_come_out_together_and_spell_its_bytes(smollm2_tokenizer) -> None:
    """Byte-level tokens that each hold part of a UTF-8 character: token_bytes spells the raw bytes (decode would
    give U+FFFD), and their logprobs come out with the piece that completes the character."""
    text = "Tokyo 東京 🙂 café"
    ids = smollm2_tokenizer.encode(text)
    assert b"".join(smollm2_tokenizer.token_bytes(i) for i in ids) == text.encode()
    assert any(_partial(smollm2_tokenizer.token_bytes(i)) for i in ids)  # the case this test is about
    decoder, pieces = scripted(smollm2_tokenizer, ids, logprobs=1)
    assert decoder.result.text == text
    for piece, entries in pieces:
        assert spelled(smollm2_tokenizer, entries) == piece.encode()


def _partial(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_chat_raw_and_batched_replies_carry_logprobs(llm) -> None:
    reply = llm.chat().send("hello", temperature=0.0, max_new_tokens=12, logprobs=4)
    said = [t for t in reply.token_ids if t not in llm.tokenizer.stop_ids]
    assert [e.token_id for e in reply.logprobs] == said
    assert spelled(llm.tokenizer, reply.logprobs) == reply.text.encode()
    for e in reply.logprobs:  # greedy: the sampled token's value is the likeliest's (ties aside)
        assert len(e.top) == 4 and e.logprob == pytest.approx(e.top[0][1])
        assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
    assert llm.chat().send("hello", temperature=0.0, max_new_tokens=12).logprobs is None
    raw = llm.generate("once upon", raw=True, temperature=0.0, max_new_tokens=8, logprobs=0)
    assert spelled(llm.tokenizer, raw.logprobs) == raw.text.encode()
    # in a batch, each decoder's logprobs are those it gets alone
    turns = [llm.chat().start("hello", temperature=0.0, max_new_tokens=12, logprobs=4),
             llm.chat().start("other words", temperature=0.0, max_new_tokens=12)]
    batch.drive([t.decoder for t in turns])
    batched = turns[0].commit()
    assert [e.token_id for e in batched.logprobs] == [e.token_id for e in reply.logprobs]
    assert [e.logprob for e in batched.logprobs] == pytest.approx([e.logprob for e in reply.logprobs], abs=1e-4)
    assert turns[1].commit().logprobs is None
