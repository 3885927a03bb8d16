"""Bad input of every kind gets OpenAI's error JSON (Ollama's under /api/) with the right status and a message that
names the problem — never a 500, never a traceback — and the server stays healthy. Also the API key and the body
size limit."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

CHAT, COMPLETIONS, SESSIONS = "/v1/chat/completions", "/v1/completions", "/v1/sessions"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, **fields}


# case: (method, path, body — a dict is sent as JSON, bytes/str as is, None as no body —, status, words in message)
CASES: dict[str, tuple[str, str, Any, int, tuple[str, ...]]] = {
    "not_json": ("POST", CHAT, b'{"model": "tiny", "messages": [', 400, ("not valid JSON",)),
    "json_array": ("POST", CHAT, [1, 2], 400, ("JSON object",)),
    "json_string": ("POST", CHAT, "just text", 400, ("not valid JSON",)),
    "empty_body": ("POST", CHAT, None, 400, ("empty",)),
    "no_messages": ("POST", CHAT, {"model": "tiny"}, 400, ("messages", "required")),
    "no_model": ("POST", CHAT, {"messages": USER}, 400, ("model is required",)),
    "too_many_messages": ("POST", CHAT, chat(messages=[{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}] * 600 + USER), 400,
                          ("1,201 messages", "at most 1,000")),
    "no_model_completion": ("POST", COMPLETIONS, {"prompt": "hi"}, 400, ("model is required",)),
    "messages_empty": ("POST", CHAT, chat(messages=[]), 400, ("messages", "at least 1")),
    "messages_not_list": ("POST", CHAT, chat(messages="hi"), 400, ("messages",)),
    "message_not_object": ("POST", CHAT, chat(messages=["hi"]), 400, ("messages.0",)),
    "role_unknown": ("POST", CHAT, chat(messages=[{"role": "bot", "content": "x"}]), 400, ("messages.0.role",)),
    "role_tool": ("POST", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400,
                  ("messages.0.tool_call_id", "needs tool_call_id")),
    "role_missing": ("POST", CHAT, chat(messages=[{"content": "x"}]), 400, ("messages.0.role",)),
    "content_number": ("POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400,
                       ("messages.0.content:", "string")),
    "content_image": ("POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, ("messages.0.content",)),
    "last_is_assistant": ("POST", CHAT, chat(messages=[{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b"}]), 400, ("last message",)),
    "only_system_empty": ("POST", CHAT, chat(messages=[{"role": "system", "content": " "}]), 400,
                          ("system message is empty",)),
    "system_in_the_middle": ("POST", CHAT, chat(messages=[{"role": "user", "content": "a"},
                                                         {"role": "system", "content": "b"},
                                                         {"role": "user", "content": "c"}]), 400, ("system",)),
    "empty_user_message": ("POST", CHAT, chat(messages=[{"role": "user", "content": "   "}]), 400, ("empty",)),
    "temperature_negative": ("POST", CHAT, chat(temperature=-0.1), 400, ("temperature",)),
    "temperature_too_high": ("POST", CHAT, chat(temperature=2.5), 400, ("temperature", "2")),
    "temperature_string": ("POST", CHAT, chat(temperature="hot"), 400, ("temperature", "number")),
    "temperature_bool": ("POST", CHAT, chat(temperature=True), 400, ("temperature",)),
    "top_p_zero": ("POST", CHAT, chat(top_p=0), 400, ("top_p",)),
    "top_p_over_one": ("POST", CHAT, chat(top_p=1.5), 400, ("top_p",)),
    "max_tokens_zero": ("POST", CHAT, chat(max_tokens=0), 400, ("max_tokens",)),
    "max_tokens_negative": ("POST", CHAT, chat(max_tokens=-5), 400, ("max_tokens",)),
    "max_tokens_over_context": ("POST", CHAT, chat(max_tokens=10 ** 9), 400, ("max_tokens", "context")),
    "max_tokens_string": ("POST", CHAT, chat(max_tokens="10"), 400, ("max_tokens", "integer")),
    "max_tokens_float": ("POST", CHAT, chat(max_tokens=2.5), 400, ("max_tokens",)),
    "max_completion_tokens_zero": ("POST", CHAT, chat(max_completion_tokens=0), 400, ("max_completion_tokens",)),
    "max_completion_over_context": ("POST", CHAT, chat(max_completion_tokens=5000), 400,
                                    ("max_completion_tokens", "context")),
    "n_two": ("POST", CHAT, chat(n=2), 400, ("n must be 1",)),
    "n_zero": ("POST", CHAT, chat(n=0), 400, ("n must be 1",)),
    "stream_string": ("POST", CHAT, chat(stream="yes"), 400, ("stream", "boolean")),
    "stop_number": ("POST", CHAT, chat(stop=5), 400, ("stop",)),
    "stop_empty_string": ("POST", CHAT, chat(stop=[""]), 400, ("stop", "non-empty")),
    "stop_too_many": ("POST", CHAT, chat(stop=list("abcde")), 400, ("stop", "4")),
    "seed_string": ("POST", CHAT, chat(seed="x"), 400, ("seed",)),
    "seed_float": ("POST", CHAT, chat(seed=1.5), 400, ("seed",)),
    "logit_bias_not_token": ("POST", CHAT, chat(logit_bias={"hello": 1}), 400, ("logit_bias", "token ids")),
    "logit_bias_out_of_range": ("POST", CHAT, chat(logit_bias={"5": 500}), 400, ("logit_bias", "-100")),
    "presence_penalty": ("POST", CHAT, chat(presence_penalty=1.0), 400, ("presence_penalty",)),
    "functions": ("POST", CHAT, chat(functions=[{"name": "f", "parameters": {}}]), 400, ("functions", "send tools")),
    "function_call": ("POST", CHAT, chat(function_call="auto"), 400, ("function_call", "send tool_choice")),
    "logit_bias_outside_vocabulary": ("POST", CHAT, chat(logit_bias={"128": 5}), 400,
                                      ("token 128", "vocabulary of 128")),
    "response_format_unknown": ("POST", CHAT, chat(response_format={"type": "xml"}), 400, ("response_format.type",)),
    "response_format_string": ("POST", CHAT, chat(response_format="json"), 400, ("response_format",)),
    "json_schema_missing": ("POST", CHAT, chat(response_format={"type": "json_schema"}), 400,
                            ("json_schema", "needs")),
    "json_schema_no_name": ("POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "schema": {"type": "object"}}}), 400, ("response_format.json_schema.name",)),
    "json_schema_invalid": ("POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "wat"}}}), 400, ("not a valid JSON schema", "wat")),
    "json_schema_bad_pattern": ("POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(("}}}), 400, ("not a valid JSON schema",)),
    "json_schema_not_object": ("POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": "object"}}), 400, ("schema",)),
    "completion_json_schema_invalid": ("POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}}, 400, ("wat",)),
    "top_k_negative": ("POST", CHAT, chat(top_k=-1), 400, ("top_k",)),
    "min_p_one": ("POST", CHAT, chat(min_p=1.0), 400, ("min_p",)),
    "repetition_penalty_zero": ("POST", CHAT, chat(repetition_penalty=0), 400, ("repetition_penalty",)),
    "model_unknown": ("POST", CHAT, chat(model="gpt-4"), 404, ("gpt-4", "does not exist")),
    "model_number": ("POST", CHAT, chat(model=5), 400, ("model",)),
    "session_id_traversal": ("POST", CHAT, chat(session_id="../../etc/passwd"), 400, ("session_id",)),
    "session_id_too_long": ("POST", CHAT, chat(session_id="x" * 65), 400, ("session_id",)),
    "session_id_number": ("POST", CHAT, chat(session_id=7), 400, ("session_id",)),
    "prompt_over_budget": ("POST", CHAT, chat(messages=[{"role": "user", "content": "word " * 400}]), 413,
                           ("tokens",)),
    "completion_no_prompt": ("POST", COMPLETIONS, {"model": "tiny"}, 400, ("prompt",)),
    "completion_empty_prompt": ("POST", COMPLETIONS, {"model": "tiny", "prompt": ""}, 400, ("prompt", "empty")),
    "completion_token_prompt": ("POST", COMPLETIONS, {"model": "tiny", "prompt": [1, 2, 3]}, 400, ("prompt",)),
    "completion_two_prompts": ("POST", COMPLETIONS, {"model": "tiny", "prompt": ["a", "b"]}, 400, ("one prompt",)),
    "completion_echo": ("POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "echo": True}, 400, ("echo",)),
    "completion_best_of": ("POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "best_of": 3}, 400, ("best_of",)),
    "completion_suffix": ("POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "suffix": "z"}, 400, ("suffix",)),
    "completion_max_tokens_zero": ("POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "max_tokens": 0}, 400,
                                   ("max_tokens",)),
    "completion_over_budget": ("POST", COMPLETIONS, {"model": "tiny", "prompt": "word " * 400}, 413, ("tokens",)),
    "session_create_bad_id": ("POST", SESSIONS, {"session_id": "a/b"}, 400, ("session_id",)),
    "session_create_system_type": ("POST", SESSIONS, {"system": 5}, 400, ("system",)),
    "session_get_bad_id": ("GET", SESSIONS + "/bad.id", None, 400, ("not valid",)),
    "session_get_unknown": ("GET", SESSIONS + "/nobody", None, 404, ("no session",)),
    "session_delete_unknown": ("DELETE", SESSIONS + "/nobody", None, 404, ("no session",)),
    "unknown_route": ("GET", "/v1/engines", None, 404, ("no route",)),
    "wrong_method": ("GET", CHAT, None, 405, ("not allowed",)),
    "model_lookup_unknown": ("GET", "/v1/models/gpt-4", None, 404, ("gpt-4",)),
}


# Tools, tool messages and logprobs, malformed: a 400 that names the field.
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "integer"}}}}}
CALLED = [{"role": "user", "content": "a"},
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}]


def tool(name: str = "f", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


CASES |= {
    "tool_result_answers_nothing": ("POST", CHAT, chat(messages=[
        {"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "call_x", "content": "5"}]), 400,
        ("'call_x'", "no assistant message")),
    "tool_result_answers_another_call": ("POST", CHAT, chat(messages=[
        *CALLED, {"role": "tool", "tool_call_id": "call_2", "content": "5"}]), 400, ("'call_2'",)),
    "tool_result_after_a_user_message": ("POST", CHAT, chat(messages=[
        *CALLED, {"role": "user", "content": "b"}, {"role": "tool", "tool_call_id": "call_1", "content": "5"}]), 400,
        ("'call_1'", "no assistant message")),
    "tool_result_content_number": ("POST", CHAT, chat(messages=[
        *CALLED, {"role": "tool", "tool_call_id": "call_1", "content": 5}]), 400, ("messages.2.content",)),
    "tool_calls_on_a_user_message": ("POST", CHAT, chat(messages=[{"role": "user", "content": "a", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), 400,
        ("only an assistant message has tool_calls",)),
    "tool_call_type_unknown": ("POST", CHAT, chat(messages=[{"role": "user", "content": "a"}, {
        "role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "function": {"name": "f", "arguments": ""}}]},
        {"role": "user", "content": "b"}]), 400, ("messages.1.tool_calls.0.type",)),
    "tool_call_arguments_object": ("POST", CHAT, chat(messages=[{"role": "user", "content": "a"}, {
        "role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": {"x": 1}}}]}, {"role": "user", "content": "b"}]), 400,
        ("messages.1.tool_calls.0.function.arguments",)),
    "tool_call_without_id": ("POST", CHAT, chat(messages=[{"role": "user", "content": "a"}, {
        "role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "b"}]), 400, ("messages.1.tool_calls.0.id",)),
    "tools_not_a_list": ("POST", CHAT, chat(tools=TOOL), 400, ("tools",)),
    "tools_list_of_strings": ("POST", CHAT, chat(tools=["f"]), 400, ("tools.0",)),
    "tools_type_unknown": ("POST", CHAT, chat(tools=[{"type": "retrieval"}]), 400, ("tools.0.type",)),
    "tools_no_function": ("POST", CHAT, chat(tools=[{"type": "function"}]), 400, ("tools.0.function",)),
    "tools_no_name": ("POST", CHAT, chat(tools=[{"type": "function", "function": {"parameters": {}}}]), 400,
                      ("tools.0.function.name",)),
    "tools_name_with_space": ("POST", CHAT, chat(tools=[tool("get weather")]), 400, ("tools.0.function.name",)),
    "tools_name_too_long": ("POST", CHAT, chat(tools=[tool("f" * 65)]), 400, ("tools.0.function.name",)),
    "tools_name_twice": ("POST", CHAT, chat(tools=[tool("f"), tool("g"), tool("f")]), 400,
                         ("tools[2].function.name", "twice")),
    "tools_too_many": ("POST", CHAT, chat(tools=[tool(f"f{i}") for i in range(129)]), 400, ("at most 128",)),
    "tools_parameters_not_object": ("POST", CHAT, chat(tools=[tool(parameters={"type": "string"})]), 400,
                                    ("tools[0].function.parameters", "JSON object")),
    "tools_parameters_invalid": ("POST", CHAT, chat(tools=[tool(parameters={"type": "object", "properties": {
        "x": {"type": "wat"}}})]), 400, ("tools[0].function.parameters", "wat")),
    "tools_parameters_bad_pattern": ("POST", CHAT, chat(tools=[tool(parameters={"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(("}}})]), 400, ("tools[0].function.parameters",)),
    "tools_parameters_a_string": ("POST", CHAT, chat(tools=[tool(parameters="object")]), 400,
                                  ("tools.0.function.parameters",)),
    "tools_description_number": ("POST", CHAT, chat(tools=[tool(description=5)]), 400,
                                 ("tools.0.function.description",)),
    "tool_choice_without_tools": ("POST", CHAT, chat(tool_choice="required"), 400, ("tool_choice needs tools",)),
    "tool_choice_auto_without_tools": ("POST", CHAT, chat(tool_choice="auto"), 400, ("tool_choice needs tools",)),
    "tool_choice_unknown_function": ("POST", CHAT, chat(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "nope"}}), 400, ("'nope'", "not in tools")),
    "tool_choice_unknown_word": ("POST", CHAT, chat(tools=[TOOL], tool_choice="always"), 400, ("tool_choice",)),
    "tool_choice_number": ("POST", CHAT, chat(tools=[TOOL], tool_choice=1), 400, ("tool_choice",)),
    "tool_choice_type_unknown": ("POST", CHAT, chat(tools=[TOOL], tool_choice={
        "type": "retrieval", "function": {"name": "f"}}), 400, ("tool_choice",)),
    "tool_choice_no_name": ("POST", CHAT, chat(tools=[TOOL], tool_choice={"type": "function", "function": {}}), 400,
                            ("tool_choice",)),
    "parallel_tool_calls_string": ("POST", CHAT, chat(tools=[TOOL], parallel_tool_calls="yes"), 400,
                                   ("parallel_tool_calls",)),
    "logprobs_string": ("POST", CHAT, chat(logprobs="yes"), 400, ("logprobs",)),
    "logprobs_number": ("POST", CHAT, chat(logprobs=5), 400, ("logprobs",)),
    "top_logprobs_without_logprobs": ("POST", CHAT, chat(top_logprobs=3), 400, ("top_logprobs needs logprobs",)),
    "top_logprobs_over_20": ("POST", CHAT, chat(logprobs=True, top_logprobs=21), 400, ("top_logprobs", "20")),
    "top_logprobs_negative": ("POST", CHAT, chat(logprobs=True, top_logprobs=-1), 400, ("top_logprobs",)),
    "top_logprobs_float": ("POST", CHAT, chat(logprobs=True, top_logprobs=2.5), 400, ("top_logprobs",)),
    "completion_logprobs_over_5": ("POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "logprobs": 6}, 400,
                                   ("logprobs", "5")),
    "completion_logprobs_negative": ("POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "logprobs": -1}, 400,
                                     ("logprobs",)),
    "completion_logprobs_bool": ("POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "logprobs": True}, 400,
                                 ("logprobs",)),
}


# Ollama's routes (server/ollama.py): the same checks, answered in Ollama's shape, {"error": "..."}.
OLLAMA_CHAT, GENERATE = "/api/chat", "/api/generate"


def ollama(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, **fields}


CASES |= {
    "ollama_not_json": ("POST", OLLAMA_CHAT, b'{"model": "tiny", "messages": [', 400, ("not valid JSON",)),
    "ollama_empty_body": ("POST", OLLAMA_CHAT, None, 400, ("empty",)),
    "ollama_no_model": ("POST", OLLAMA_CHAT, {"messages": USER}, 400, ("model is required",)),
    "ollama_model_unknown": ("POST", OLLAMA_CHAT, ollama(model="llama3:8b"), 404, ("llama3:8b", "not found")),
    "ollama_messages_not_list": ("POST", OLLAMA_CHAT, ollama(messages="hi"), 400, ("messages",)),
    "ollama_role_unknown": ("POST", OLLAMA_CHAT, ollama(messages=[{"role": "bot", "content": "x"}]), 400,
                            ("messages.0.role",)),
    "ollama_role_developer": ("POST", OLLAMA_CHAT, ollama(messages=[{"role": "developer", "content": "x"}]), 400,
                              ("messages.0.role",)),
    "ollama_content_list": ("POST", OLLAMA_CHAT, ollama(messages=[{"role": "user", "content": [
        {"type": "text", "text": "x"}]}]), 400, ("messages.0.content",)),
    "ollama_images": ("POST", OLLAMA_CHAT, ollama(messages=[{"role": "user", "content": "x", "images": ["aGk="]}]),
                      400, ("messages[0].images", "text only")),
    "ollama_thinking": ("POST", OLLAMA_CHAT, ollama(messages=[{"role": "user", "content": "x"}, {
        "role": "assistant", "content": "y", "thinking": "hmm"}, {"role": "user", "content": "z"}]), 400,
        ("messages[1].thinking",)),
    "ollama_last_is_assistant": ("POST", OLLAMA_CHAT, ollama(messages=USER + [{"role": "assistant", "content": "b"}]),
                                 400, ("last message",)),
    "ollama_system_in_the_middle": ("POST", OLLAMA_CHAT, ollama(messages=USER + [
        {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]), 400, ("messages[1]", "system")),
    "ollama_empty_user_message": ("POST", OLLAMA_CHAT, ollama(messages=[{"role": "user", "content": " "}]), 400,
                                  ("empty",)),
    "ollama_tool_result_answers_nothing": ("POST", OLLAMA_CHAT, ollama(messages=USER + [
        {"role": "tool", "content": "5"}]), 400, ("tool result", "no such call")),
    "ollama_tool_result_of_another_function": ("POST", OLLAMA_CHAT, ollama(messages=[
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "5", "tool_name": "g"}]), 400, ("tool result of 'g'",)),
    "ollama_tool_call_arguments_text": ("POST", OLLAMA_CHAT, ollama(messages=[
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "b"}]), 400, ("arguments",)),
    "ollama_user_tool_calls": ("POST", OLLAMA_CHAT, ollama(messages=[{"role": "user", "content": "a", "tool_calls": [
        {"function": {"name": "f", "arguments": {}}}]}]), 400, ("only an assistant",)),
    "ollama_tools_bad_schema": ("POST", OLLAMA_CHAT, ollama(tools=[tool(parameters={"type": "wat"})]), 400,
                                ("tools",)),
    "ollama_too_many_messages": ("POST", OLLAMA_CHAT, ollama(messages=[{"role": "user", "content": "a"},
                                                                       {"role": "assistant", "content": "b"}] * 600
                                                             + USER), 400, ("1,201 messages", "oldest turns")),
    "ollama_stream_string": ("POST", OLLAMA_CHAT, ollama(stream="yes"), 400, ("stream",)),
    "ollama_options_not_object": ("POST", OLLAMA_CHAT, ollama(options=[1]), 400, ("options",)),
    "ollama_num_ctx": ("POST", OLLAMA_CHAT, ollama(options={"num_ctx": 4096}), 400, ("options.num_ctx", "tokens")),
    "ollama_num_keep": ("POST", OLLAMA_CHAT, ollama(options={"num_keep": 4}), 400, ("options.num_keep",)),
    "ollama_unknown_option": ("POST", OLLAMA_CHAT, ollama(options={"warp_speed": 9}), 400, ("options.warp_speed",)),
    "ollama_mirostat": ("POST", OLLAMA_CHAT, ollama(options={"mirostat": 2}), 400, ("options.mirostat",)),
    "ollama_typical_p": ("POST", OLLAMA_CHAT, ollama(options={"typical_p": 0.5}), 400, ("options.typical_p",)),
    "ollama_presence_penalty": ("POST", OLLAMA_CHAT, ollama(options={"presence_penalty": 1.5}), 400,
                                ("options.presence_penalty",)),
    "ollama_num_predict_zero": ("POST", OLLAMA_CHAT, ollama(options={"num_predict": 0}), 400, ("num_predict",)),
    "ollama_num_predict_minus_three": ("POST", OLLAMA_CHAT, ollama(options={"num_predict": -3}), 400,
                                       ("num_predict",)),
    "ollama_num_predict_over_context": ("POST", OLLAMA_CHAT, ollama(options={"num_predict": 10 ** 9}), 400,
                                        ("num_predict", "context")),
    "ollama_temperature_negative": ("POST", OLLAMA_CHAT, ollama(options={"temperature": -1}), 400,
                                    ("options.temperature",)),
    "ollama_temperature_string": ("POST", OLLAMA_CHAT, ollama(options={"temperature": "hot"}), 400,
                                  ("options.temperature",)),
    "ollama_top_p_zero": ("POST", OLLAMA_CHAT, ollama(options={"top_p": 0}), 400, ("options.top_p",)),
    "ollama_top_k_negative": ("POST", OLLAMA_CHAT, ollama(options={"top_k": -1}), 400, ("options.top_k",)),
    "ollama_min_p_one": ("POST", OLLAMA_CHAT, ollama(options={"min_p": 1}), 400, ("options.min_p",)),
    "ollama_repeat_penalty_zero": ("POST", OLLAMA_CHAT, ollama(options={"repeat_penalty": 0}), 400,
                                   ("options.repeat_penalty",)),
    "ollama_seed_string": ("POST", OLLAMA_CHAT, ollama(options={"seed": "x"}), 400, ("options.seed",)),
    "ollama_stop_empty": ("POST", OLLAMA_CHAT, ollama(options={"stop": [""]}), 400, ("stop", "non-empty")),
    "ollama_stop_number": ("POST", OLLAMA_CHAT, ollama(options={"stop": 5}), 400, ("options.stop",)),
    "ollama_format_xml": ("POST", OLLAMA_CHAT, ollama(format="xml"), 400, ("format",)),
    "ollama_format_bad_schema": ("POST", OLLAMA_CHAT, ollama(format={"type": "wat"}), 400,
                                 ("format", "not a valid JSON schema")),
    "ollama_think": ("POST", OLLAMA_CHAT, ollama(think=True), 400, ("think", "does not think")),
    "ollama_think_level": ("POST", OLLAMA_CHAT, ollama(think="high"), 400, ("think",)),
    "ollama_top_logprobs_alone": ("POST", OLLAMA_CHAT, ollama(top_logprobs=2), 400, ("top_logprobs", "logprobs")),
    "ollama_top_logprobs_over_20": ("POST", OLLAMA_CHAT, ollama(logprobs=True, top_logprobs=21), 400,
                                    ("top_logprobs",)),
    "ollama_keep_alive_object": ("POST", OLLAMA_CHAT, ollama(keep_alive={"m": 5}), 400, ("keep_alive",)),
    "ollama_prompt_over_budget": ("POST", OLLAMA_CHAT, ollama(messages=[{"role": "user", "content": "word " * 400}]),
                                  413, ("tokens",)),
    "generate_no_model": ("POST", GENERATE, {"prompt": "x"}, 400, ("model is required",)),
    "generate_prompt_number": ("POST", GENERATE, {"model": "tiny", "prompt": 5}, 400, ("prompt",)),
    "generate_context": ("POST", GENERATE, {"model": "tiny", "prompt": "x", "context": [1, 2]}, 400,
                         ("context", "/api/chat")),
    "generate_suffix": ("POST", GENERATE, {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, ("suffix",)),
    "generate_template": ("POST", GENERATE, {"model": "tiny", "prompt": "x", "template": "{{ .Prompt }}"}, 400,
                          ("template", "raw: true")),
    "generate_images": ("POST", GENERATE, {"model": "tiny", "prompt": "x", "images": ["aGk="]}, 400, ("images",)),
    "generate_raw_with_system": ("POST", GENERATE, {"model": "tiny", "prompt": "x", "raw": True, "system": "s"}, 400,
                                 ("system", "raw")),
    "generate_raw_string": ("POST", GENERATE, {"model": "tiny", "prompt": "x", "raw": "yes"}, 400, ("raw",)),
    "generate_empty_templated": ("POST", GENERATE, {"model": "tiny", "prompt": "  "}, 400, ("empty",)),
    "generate_over_budget": ("POST", GENERATE, {"model": "tiny", "prompt": "word " * 400, "raw": True}, 413,
                             ("tokens",)),
    "show_unknown_model": ("POST", "/api/show", {"model": "llama3"}, 404, ("llama3",)),
    "show_no_model": ("POST", "/api/show", {}, 400, ("model is required",)),
    "ollama_unknown_route": ("POST", "/api/pull", {"model": "tiny"}, 404, ("no route",)),
    "ollama_wrong_method": ("GET", OLLAMA_CHAT, None, 405, ("not allowed",)),
}


# Every sampling field with a wrong type or an out-of-range value, on both generation routes: a 400 that names it.
BAD_FIELDS: dict[str, list[Any]] = {
    "max_tokens": ["10", -1, 1.5, True, [], {"n": 1}],
    "temperature": ["hot", -0.1, 2.5, [], "0.5x"],
    "top_p": ["x", 0, 1.5, -1],
    "seed": ["x", 1.5, [1]],
    "stop": [5, [1, 2], {"a": 1}],
    "stream": ["yes", 3, []],
    "logit_bias": [[], {"x": 1}, {"1": 500}, {"1": "big"}, "bias"],
    "frequency_penalty": ["x", 3, -2.5],
    "presence_penalty": ["x", -3, 2.5],
    "n": [2, "x"],
    "user": [5, ["me"]],
}
for _field, _values in BAD_FIELDS.items():
    for _i, _value in enumerate(_values):
        CASES[f"chat_{_field}_{_i}"] = ("POST", CHAT, chat(**{_field: _value}), 400, (_field,))
        CASES[f"completion_{_field}_{_i}"] = ("POST", COMPLETIONS, {"model": "tiny", "prompt": "a", _field: _value},
                                              400, (_field,))


@pytest.fixture(scope="module")
def small_server(tiny_llm):
    from kvbound.server import ServerSettings, create_app
    from tests.server.conftest import LiveServer

    with LiveServer(create_app(tiny_llm, ServerSettings(kv_budget="256KiB"))) as live:  # 512 tokens
        yield live


def send(http: httpx.Client, method: str, path: str, body: Any) -> httpx.Response:
    if body is None:
        return http.request(method, path)
    if isinstance(body, (bytes, str)):
        return http.request(method, path, content=body, headers={"content-type": "application/json"})
    return http.request(method, path, json=body)


def test_malformed_requests_get_clear_errors_and_the_server_stays_healthy(small_server) -> None:
    assert len(CASES) >= 150
    failures = []
    with small_server.http() as http:
        for case, (method, path, body, status, words) in CASES.items():
            response = send(http, method, path, body)
            try:
                error = response.json()["error"]
                if path.startswith("/api/"):  # Ollama's shape: the message alone
                    assert set(response.json()) == {"error"} and isinstance(error, str)
                    error = {"message": error}
                else:
                    assert set(error) == {"message", "type", "param", "code"}
                assert response.status_code == status
                assert all(w.lower() in error["message"].lower() for w in words), words
                assert "Traceback" not in response.text
            except (AssertionError, KeyError, ValueError) as e:
                failures.append(f"{case}: {response.status_code} {response.text[:300]} ({e})")
        assert not failures, "\n".join(failures)
        ok = http.post(CHAT, json=chat(max_tokens=3))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert http.get("/health").json()["status"] == "ok"
        metrics = http.get("/metrics").text
    bad = sum(1 for _, path, _, status, _ in CASES.values() if status == 400 and path == CHAT)
    assert f'kvbound_requests_total{{route="{CHAT}",status="400"}} {bad}.0' in metrics
    assert 'status="500"' not in metrics


def test_api_key(serve) -> None:
    server = serve(api_key="s3cret")
    with server.http() as http:
        missing = http.get("/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert "no API key" in missing.json()["error"]["message"]
        wrong = http.get("/v1/models", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]["message"]
        assert http.get("/v1/models", headers={"authorization": "Basic s3cret"}).status_code == 401
        assert http.get("/metrics").status_code == 401
        assert http.get("/health").status_code == 200  # liveness stays open
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="nope").models.list()
    reply = server.openai(api_key="s3cret").chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    assert reply.usage.completion_tokens >= 1


def test_body_size_limit(serve) -> None:
    server = serve(max_body_bytes=2048)
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 4000}])).encode()
    with server.http() as http:
        declared = http.post(CHAT, content=big, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and "2,048" in declared.json()["error"]["message"]
        chunked = http.post(CHAT, content=iter([big[:1500], big[1500:]]),  # no Content-Length: counted as it comes
                            headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
        assert http.post(CHAT, json=chat(max_tokens=2)).status_code == 200


def test_a_trickled_body_times_out_with_408(serve) -> None:
    """A client that sends part of a body and stalls gets 408 when the body timeout passes; the connection is
    released and the server keeps serving."""
    import socket
    import time
    from urllib.parse import urlparse

    server = serve(body_timeout_s=1.0)
    where = urlparse(server.url)
    started = time.monotonic()
    with socket.create_connection((where.hostname, where.port), timeout=10) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{\"model\": ")
        answer = conn.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer
    assert time.monotonic() - started < 8
    with server.http() as http:
        assert http.post(CHAT, json=chat(max_tokens=2)).status_code == 200


def test_unexpected_failure_is_a_500_without_internals(tiny_llm, caplog) -> None:
    from kvbound.server import ServerSettings, create_app
    from tests.server.conftest import LiveServer

    app = create_app(tiny_llm, ServerSettings(kv_budget="64KiB"))

    async def boom() -> None:
        raise RuntimeError("internal detail 0xdeadbeef")

    app.add_api_route("/boom", boom)
    with LiveServer(app) as live, live.http() as http:
        response = http.get("/boom")
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and "deadbeef" not in response.text and "Traceback" not in response.text
        assert http.post(CHAT, json=chat(max_tokens=2)).status_code == 200  # still serving
        assert 'kvbound_requests_total{route="/boom",status="500"} 1.0' in http.get("/metrics").text
    assert "deadbeef" in caplog.text  # the details went to the log
