"""Chat templates: validates a conversation and renders it to prompt text with the model's Jinja template.
Renders text only; turning it into ids is the Tokenizer's job. Mirrors transformers' sandboxed environment."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvbound.errors import ModelFormatError

ROLES = frozenset({"system", "user", "assistant", "tool"})

# What transformers used as its default template before templates became mandatory; also what llama.cpp
# falls back to. Used for models whose files carry no template.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant spans for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation (e.g. roles that do not alternate): a caller error.
    raise ValueError(f"chat template rejected the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt; transformers overrides it so.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Return `messages` unchanged if it is a list of {"role": one of ROLES, "content": str, ...}; else ValueError."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(
                f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{index}]['role'] is {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"messages[{index}]['content'] must be a str, got {type(message.get('content')).__name__}"
            )
    return messages


class ChatTemplate:
    """A compiled chat template plus the special-token strings templates refer to (bos_token, eos_token)."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ModelFormatError(
                f"the model's chat template does not parse (line {error.lineno}: {error.message}); "
                "pass a template of your own or fix the model's tokenizer_config.json / GGUF metadata"
            ) from error
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token

    @classmethod
    def chatml(cls, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        return cls(CHATML, bos_token=bos_token, eos_token=eos_token)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Prompt text for `messages`; `extra` reaches the template as variables (e.g. tools, date_string)."""
        return self._template.render(
            messages=validate_messages(messages),
            add_generation_prompt=add_generation_prompt,
            # transformers always passes tools/documents, so templates may test them with `is none`.
            **{"bos_token": self.bos_token, "eos_token": self.eos_token, "tools": None, "documents": None, **extra},
        )
