"""Option groups shared by the commands (model loading, sampling, KV cache), each defined once.

A group is a dataclass whose fields carry their typer options; `@with_options(name=Group)` adds the group's flags
to a command and hands the command one built object. A new cache flag is one field + one line in `cache_config()`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console

from kvbound.config import CacheConfig
from kvbound.kvcache.spec import parse_size
from kvbound.engine.sampler import SamplingParams
from kvbound.llm import LLM, load
from kvbound.models.weights import DTYPES, WEIGHT_MODES

Command = TypeVar("Command", bound=Callable[..., Any])


# An Enum of models.weights.DTYPES, so the parser rejects a typo (and lists the choices) before the model loads.
Dtype = Enum("Dtype", [(name, name) for name in DTYPES], type=str)


DtypeOption = Annotated[Dtype, typer.Option(
    "--dtype", help="Compute dtype of activations and dense weights (auto: bf16 with quantized weights or on CUDA, "
                    "else fp32).", rich_help_panel="Model")]
Weights = Enum("Weights", [(name, name) for name in WEIGHT_MODES], type=str)
WeightsOption = Annotated[Weights, typer.Option(
    "--weights", help="How weights are held: auto keeps a quantized GGUF quantized (int4/int8), int8/int4 quantize "
                      "on load, fp32/bf16/fp16 are dense.", rich_help_panel="Model")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Model")]


@dataclass
class ModelOptions:
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="A .gguf file, a safetensors directory, or a known name (default smollm2-135m).",
        rich_help_panel="Model")] = None
    dtype: DtypeOption = Dtype["auto"]
    weights: WeightsOption = Weights["auto"]
    device: DeviceOption = "auto"
    memory_budget: Annotated[Optional[str], typer.Option(
        "--memory-budget", help="Memory for the whole process (e.g. 1GiB): a turn or a KV pool that would cross it "
                                "is refused before it runs.", rich_help_panel="Model")] = None
    compile: Annotated[bool, typer.Option(
        "--compile", help="Compile the decode step (torch.compile; CUDA graphs on GPU). Same tokens; seconds of "
                          "compiling first; measured slower on CPU (0.93-0.98x).", rich_help_panel="Model")] = False

    def load(self, console: Console | None = None) -> LLM:
        if self.memory_budget is not None:
            parse_size(self.memory_budget)  # a typo fails before the model loads
        return load_model(self.model, self.dtype, self.device, console, self.memory_budget, self.weights,
                          self.compile)


def load_model(model: str | None, dtype: Enum, device: str, console: Console | None = None,
               memory_budget: str | None = None, weights: Enum = Weights["auto"], compile: bool = False) -> LLM:
    """`kvbound.load` with a spinner on an interactive terminal (loading reads and packs every weight: seconds).
    The CLI owns its process, so it lets loading tune glibc's allocator (memory/allocator.py)."""
    options = dict(dtype=dtype.value, device=device, memory_budget=memory_budget, weights=weights.value,
                   compile=compile, tune_allocator=True)
    if console is None or not console.is_terminal:
        return load(model, **options)
    with console.status(f"loading {model or 'the default model'}…"):
        return load(model, **options)


# SamplingParams field → the flag that sets it, so its validation messages name what the user typed.
_SAMPLING_FLAGS = {"max_new_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k",
                   "top_p": "--top-p", "min_p": "--min-p", "repetition_penalty": "--repetition-penalty",
                   "stop strings": "--stop values"}


@dataclass
class SamplingOptions:
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", "--max-new-tokens", "-n", help="Most tokens to generate per reply (default 256).",
        rich_help_panel="Sampling")] = None
    greedy: Annotated[bool, typer.Option(
        "--greedy", help="Always pick the most likely token (same as --temperature 0).",
        rich_help_panel="Sampling")] = False
    temperature: Annotated[Optional[float], typer.Option(
        help=">= 0; 0 is greedy (default 0.7).", rich_help_panel="Sampling")] = None
    top_k: Annotated[Optional[int], typer.Option(help="Keep the k most likely tokens; 0 disables.",
                                                 rich_help_panel="Sampling")] = None
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling, in (0, 1]; 1 disables.",
                                                   rich_help_panel="Sampling")] = None
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below min-p × the top probability, in [0, 1).",
                                                   rich_help_panel="Sampling")] = None
    repetition_penalty: Annotated[Optional[float], typer.Option(help="> 0; 1 disables.",
                                                                rich_help_panel="Sampling")] = None
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.",
                                                rich_help_panel="Sampling")] = None
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this text appears (repeatable).",
                                                      rich_help_panel="Sampling")] = None

    def kwargs(self) -> dict[str, Any]:
        """Sampling keyword arguments for `Chat.send/stream`, validated now (before a model loads)."""
        if self.greedy and self.temperature not in (None, 0.0):
            raise ValueError(f"--greedy means temperature 0, but --temperature {self.temperature} was given; "
                             "drop one of them")
        given = {"max_new_tokens": self.max_tokens, "temperature": 0.0 if self.greedy else self.temperature,
                 "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                 "repetition_penalty": self.repetition_penalty, "seed": self.seed, "stop": self.stop or None}
        kwargs = {name: value for name, value in given.items() if value is not None}
        try:
            SamplingParams(**kwargs).validate()
        except ValueError as e:
            message = str(e)
            for field, flag in _SAMPLING_FLAGS.items():
                if message.startswith(field):
                    message = flag + message[len(field):]
            raise ValueError(message) from None
        return kwargs


class KVDtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"
    int4 = "int4"


class Recall(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


ModelFlag = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="The same as the MODEL argument (as the other commands take it).", rich_help_panel="Model")]


def one_model(argument: str | None, flag: str | None) -> str | None:
    """The model named by a command's MODEL argument or its --model flag (not both)."""
    if argument is not None and flag is not None and argument != flag:
        raise ValueError(f"two models given ({argument!r} and --model {flag!r}); give one")
    return argument if argument is not None else flag


RecallOption = Annotated[Recall, typer.Option(
    "--recall", help="Keep the text the cache evicts (chat turns; passages of a --raw prompt) and bring the best "
                     "matches for the new message (the prompt's last sentences) back for that turn: auto (on "
                     "whenever the policy evicts), on, off.", rich_help_panel="KV cache")]


@dataclass
class CacheOptions:
    kv_budget: Annotated[Optional[str], typer.Option(
        "--kv-budget", help="KV cache budget in bytes, e.g. 64MiB, 512MB, 1GiB; reserved up front, never exceeded.",
        rich_help_panel="KV cache")] = None
    kv_tokens: Annotated[Optional[int], typer.Option(
        "--kv-tokens", "--context", min=1, help="KV cache capacity in tokens (instead of --kv-budget).",
        rich_help_panel="KV cache")] = None
    kv_dtype: Annotated[KVDtype, typer.Option(
        "--kv-dtype", help="KV storage: auto (the compute dtype), fp32, fp16, bf16, int8, int4. int8 holds ~1.8x the "
                           "tokens of bf16 in a budget at about the same quality, int4 ~3x (+1.2% perplexity); on CPU "
                           "both decode about as fast as bf16 from 2k tokens of context on.",
        rich_help_panel="KV cache")] = KVDtype.auto
    policy: Annotated[str, typer.Option(
        "--policy", help="What happens when the budget is full: none (refuse), window, h2o, snapkv, tova, keydiff, "
                         "compactor, turns, turns+h2o, turns+snapkv, turns+tova, turns+keydiff, turns+compactor, "
                         "summarize. For a chat start with turns+keydiff (whole oldest turns first, the most "
                         "distinctive keys kept inside one).",
        rich_help_panel="KV cache")] = "none"

    def cache_config(self) -> CacheConfig:
        """The `cache=` argument of `LLM.chat`/`LLM.stream_raw`: the only place the cache flags become API
        arguments. Built (and so validated) before the model loads."""
        from kvbound.kvcache.spec import parse_size
        from kvbound.policies import make_policy

        if self.kv_budget is not None:
            parse_size(self.kv_budget)
        make_policy(self.policy)  # an unknown name fails here, before the model loads
        return CacheConfig(budget=self.kv_budget, tokens=self.kv_tokens, dtype=self.kv_dtype.value,
                           policy=self.policy)

    def overflow_hint(self, max_context: int) -> str:
        """What else than a shorter prompt would make room, given these flags (appended to an error)."""
        if self.kv_tokens is not None and self.kv_tokens < max_context:
            return f" or raise --kv-tokens (the model allows {max_context:,})"
        if self.policy == "none":
            return " or choose an evicting --policy (turns+keydiff, window, ...)"
        return ""


def with_options(**groups: type) -> Callable[[Command], Command]:
    """Add each group's fields to a command's flags; the command receives `name=Group(...)` instead.

        @app.command()
        @with_options(load=ModelOptions, cache=CacheOptions)
        def chat(system: str = "", *, load: ModelOptions, cache: CacheOptions): ...
    """
    flags: list[inspect.Parameter] = []
    for group in groups.values():
        hints = typing.get_type_hints(group, include_extras=True)
        flags += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
                  for f in dataclasses.fields(group)]
    names = [p.name for p in flags]
    assert len(names) == len(set(names)), f"option groups share a field name: {names}"

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name not in groups]
        clash = {p.name for p in own} & set(names)
        assert not clash, f"{command.__name__} defines {clash}, which an option group also defines"

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for key, group in groups.items():
                kwargs[key] = group(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)})
            return command(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + flags)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own + flags}
        return wrapper  # type: ignore[return-value]

    return decorate
