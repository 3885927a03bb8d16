"""Facts told early, asked late, under a KV budget that holds a few percent of the chat: does recall bring the
turn that told the fact back, and does the model then answer? The 200-turn dev chat (eight facts told in the
first turns, asked in the last ~90; or a second chat made from another book, benchmarks/make_chat.py), replayed
greedy through one chat per configuration:

- `off`: the policy alone (recall off); `on`: the same with recall; `summarize` and `summarize + recall`;
- `ceiling`: the same model with the fact just told (a fresh chat: the telling turn, then the question), which is
  as well as this model can answer at all.

Per question: whether the reply contains the expected answer, and (recall on) whether the telling turn was among
the recalled ones. Each configuration runs in its own process.

    python -m benchmarks.recall [--quick] [--budget 64MiB] [--policy turns+keydiff] [--max-new-tokens 48]
    python -m benchmarks.recall --script conversations/sense-200-turns.jsonl --no-summarize   # the second chat
    python -m benchmarks.recall --script conversations/heldout-200-turns.jsonl --no-summarize  # the held-out one
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

SUITE = "recall"


DEV_CHAT = "conversations/dev-200-turns.jsonl"
# The second chat, made from another book with other facts by `python -m benchmarks.make_chat`.
SENSE_CHAT = "conversations/sense-200-turns.jsonl"
# The held-out chat: Pride and Prejudice passages and a third set of facts (make_chat --facts heldout). The recall
# note's format was chosen on the two chats above; nothing was chosen on this one.
HELDOUT_CHAT = "conversations/heldout-200-turns.jsonl"


def script(path: str = DEV_CHAT) -> tuple[str, list[dict[str, Any]]]:
    lines = common.read_jsonl(common.data_file(path))
    return lines[0]["system"], [line for line in lines[1:] if "user" in line]


def telling_turn(turns: list[dict[str, Any]], expect: list[str], before: int) -> int | None:
    """The first turn (1-based) before `before` whose message states one of the expected answers."""
    for number, turn in enumerate(turns[:before - 1], 1):
        if any(e.lower() in turn["user"].lower() for e in expect):
            return number
    return None


def run_chat(config: dict[str, Any], max_new: int, limit: int | None, chat_file: str = DEV_CHAT) -> dict[str, Any]:
    import warnings

    import kvbound

    warnings.simplefilter("ignore")
    common.pin_threads()
    llm = kvbound.load(tune_allocator=True)
    system, turns = script(chat_file)
    turns = turns[:limit] if limit else turns
    chat = llm.chat(system=system, budget=config["budget"], dtype=config.get("dtype", "auto"),
                    policy=config["policy"], recall=config["recall"])
    questions, recalled_tokens, held = [], 0, 0
    for number, turn in enumerate(turns, 1):
        reply = chat.send(turn["user"], max_new_tokens=max_new, temperature=0.0)
        recalled_tokens += reply.recall.get("tokens", 0)
        held = max(held, reply.context_tokens)
        if turn.get("expect"):
            told = telling_turn(turns, turn["expect"], number)
            questions.append({"turn": number, "told_at": told, "answered": any(
                e.lower() in reply.text.lower() for e in turn["expect"]),
                "recalled_turns": reply.recall.get("turns", []), "recalled": told in reply.recall.get("turns", []),
                "reply": reply.text})
    memory = chat.memory()
    return {"questions": questions, "turns": len(turns), "max_context_tokens": held,
            "recalled_tokens": recalled_tokens, "archive_bytes": memory.archive_bytes,
            "kv_reserved_bytes": memory.kv_reserved_bytes, "evicted_tokens": memory.tokens_evicted,
            "peak_rss_mib": common.mib(common.peak_rss_bytes())}


def run_ceiling(max_new: int, chat_file: str = DEV_CHAT) -> dict[str, Any]:
    """Each question asked right after the turn that told its fact, in a fresh chat with the full cache."""
    import warnings

    import kvbound

    warnings.simplefilter("ignore")
    common.pin_threads()
    llm = kvbound.load(tune_allocator=True)
    system, turns = script(chat_file)
    questions = []
    for number, turn in enumerate(turns, 1):
        if not turn.get("expect"):
            continue
        told = telling_turn(turns, turn["expect"], number)
        chat = llm.chat(system=system, recall="off")
        chat.send(turns[told - 1]["user"], max_new_tokens=max_new, temperature=0.0)
        reply = chat.send(turn["user"], max_new_tokens=max_new, temperature=0.0)
        questions.append({"turn": number, "told_at": told, "reply": reply.text,
                          "answered": any(e.lower() in reply.text.lower() for e in turn["expect"])})
    return {"questions": questions}


def worker(argv: list[str]) -> int:
    kind, payload, out = argv[0], json.loads(argv[1]), Path(argv[2])
    chat_file = payload.get("script", DEV_CHAT)
    result = run_ceiling(payload["max_new"], chat_file) if kind == "ceiling" else \
        run_chat(payload["config"], payload["max_new"], payload["limit"], chat_file)
    out.write_text(json.dumps(result))
    return 0


def configurations(budget: str, policy: str, dtype: str) -> dict[str, dict[str, Any]]:
    base = {"budget": budget, "dtype": dtype}
    return {f"{policy}, recall off": {**base, "policy": policy, "recall": "off"},
            f"{policy}, recall on": {**base, "policy": policy, "recall": "on"},
            "summarize, recall off": {**base, "policy": "summarize", "recall": "off"},
            "summarize, recall on": {**base, "policy": "summarize", "recall": "on"}}


def spawn(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        common.run_python(sys.executable, ["-m", "benchmarks.recall", "--worker", kind, json.dumps(payload), str(out)])
        return json.loads(out.read_text())


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for name, r in result["runs"].items():
        qs = r["questions"]
        asked = len(qs)
        recalled = sum(q.get("recalled", False) for q in qs)
        rows.append([name, f"{sum(q['answered'] for q in qs)}/{asked}",
                     f"{recalled}/{asked}" if "recall on" in name else "–",
                     f"{r.get('max_context_tokens', '–'):,}" if "max_context_tokens" in r else "full",
                     f"{r['evicted_tokens']:,}" if "evicted_tokens" in r else "0",
                     f"{r['recalled_tokens']:,}" if "recalled_tokens" in r else "–",
                     f"{r['archive_bytes'] / 1024:.0f} KiB" if "archive_bytes" in r else "–"])
    table = common.markdown_table(["configuration", "answered", "telling turn recalled", "most tokens held",
                                   "tokens evicted", "tokens recalled", "archive"], rows)
    return (f"{chat_name(result)}: {result['turns']} turns, {result['chat_tokens']:,} tokens through the model, "
            f"KV budget {result['budget']} ({result['dtype']} KV), greedy, {result['max_new_tokens']} new tokens per "
            f"reply. `ceiling`: each question right after its fact, full cache.\n\n{table}")


def headlines(result: dict[str, Any]) -> list[str]:
    runs = result["runs"]
    parts = []
    for name, r in runs.items():
        qs = r["questions"]
        parts.append(f"{name} {sum(q['answered'] for q in qs)}/{len(qs)}"
                     + (f" (telling turn recalled {sum(q.get('recalled', False) for q in qs)}/{len(qs)})"
                        if "recall on" in name else ""))
    return [f"Facts told early and asked late in {chat_name(result, lower=True)}, {result['turns']} turns, KV "
            f"budget {result['budget']}, answers right: " + "; ".join(parts) + "."]


def chat_name(result: dict[str, Any], lower: bool = False) -> str:
    name = result.get("script", DEV_CHAT)
    text = {DEV_CHAT: "The dev chat",
            HELDOUT_CHAT: f"The held-out chat, `{Path(name).name}` (facts and passages no setting was chosen on)",
            }.get(name, f"The second chat, `{Path(name).name}` (from another book)")
    return text[0].lower() + text[1:] if lower else text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 new tokens per reply, recall off and on only")
    parser.add_argument("--budget", default="64MiB")
    parser.add_argument("--policy", default="turns+keydiff")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--script", default=DEV_CHAT, help=f"the chat, under data/ (default {DEV_CHAT}; "
                        f"--script {SENSE_CHAT} is the second one)")
    parser.add_argument("--no-summarize", action="store_true", help="recall off and on only (and the ceiling)")
    parser.add_argument("--name", help="results file name (default: recall, or recall_sense for the second chat)")
    args = parser.parse_args(argv)
    max_new = 16 if args.quick else args.max_new_tokens
    runs: dict[str, Any] = {"ceiling": spawn("ceiling", {"max_new": max_new, "script": args.script})}
    configs = configurations(args.budget, args.policy, args.dtype)
    for name, config in list(configs.items())[: 2 if args.quick or args.no_summarize else None]:
        common.log(f"recall: {name}")
        runs[name] = spawn("chat", {"config": config, "max_new": max_new, "limit": None, "script": args.script})
    _, turns = script(args.script)
    first = runs[next(iter(configs))]  # recall off: what went through the cache, evicted or held at the end
    result = {"runs": runs, "turns": len(turns), "budget": args.budget, "dtype": args.dtype, "policy": args.policy,
              "max_new_tokens": max_new, "chat_tokens": first["evicted_tokens"] + first["max_context_tokens"],
              "script": args.script}
    name = args.name or (SUITE if args.script == DEV_CHAT else f"{SUITE}_{Path(args.script).stem.split('-')[0]}")
    return common.finish(name, result, args.quick, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
