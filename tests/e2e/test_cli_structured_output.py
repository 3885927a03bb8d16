"""`kvbound generate --json-schema FILE` / `--json-object` as a user runs them: a reply the schema accepts, an
honest word when --max-tokens cuts the document, and bad flags refused in one line before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_cli import assert_user_error, kvbound

pytest.importorskip("llguidance", reason="structured output needs llguidance: pip install -e '.[serve]'")
jsonschema = pytest.importorskip("jsonschema")

CAPITAL = {"type": "object", "additionalProperties": False, "required": ["country", "capital"],
           "properties": {"country": {"type": "string", "maxLength": 30},
                          "capital": {"type": "string", "maxLength": 30}}}


@pytest.mark.model
def test_generate_answers_with_json_the_schema_accepts(tmp_path: Path) -> None:
    schema_file = tmp_path / "capital.json"
    schema_file.write_text(json.dumps(CAPITAL))
    result = kvbound("generate", "--prompt", "What is the capital of France?", "--json-schema", schema_file,
                     "--greedy", "--max-tokens", "60", "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["finish_reason"] == "stop"
    answer = json.loads(reply["text"])
    jsonschema.validate(answer, CAPITAL)
    assert answer["capital"] == "Paris"


@pytest.mark.model
def test_a_document_cut_by_max_tokens_says_so() -> None:
    result = kvbound("generate", "--prompt", "List three fruits with their colours.", "--system", "Answer in JSON.",
                     "--json-object", "--greedy", "--max-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("{")
    assert "length" in result.stderr and "the JSON was cut at 6 tokens" in result.stderr


def test_bad_schema_flags_are_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "wat"}')
    not_json = tmp_path / "schema.txt"
    not_json.write_text("type: object")
    assert_user_error(kvbound("generate", "-p", "x", "--json-schema", bad), str(bad), "wat")
    assert_user_error(kvbound("generate", "-p", "x", "--json-schema", not_json), "not JSON")
    assert_user_error(kvbound("generate", "-p", "x", "--json-schema", tmp_path / "none.json"), "no such file")
    assert_user_error(kvbound("generate", "-p", "x", "--json-schema", bad, "--json-object"), "not both")
